"""A workdir one command at a time: checked usable, then locked for the command's duration.

Two commands writing one workdir would interleave checkpoints and results, so every command
that writes takes an exclusive `fcntl.flock` on `<workdir>/.elf_jax.lock` (the kernel drops
it when the process ends, even on SIGKILL: no stale locks). A second command is refused at
once with the first one's command line and pid. The lock is advisory and per host: on a
shared filesystem, processes of one multi-host run share the workdir and only process 0
takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path

LOCK_NAME = ".elf_jax.lock"


def check_usable(path: Path, *, create: bool) -> None:
    """`ValueError` (one line) when `path` cannot be a workdir: a file, not writable, or
    missing when `create` is False (a command that only reads it)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir {path} is a file, not a directory: choose another path")
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no workdir {path}: check --workdir (or run a stage first)")
        try:
            path.mkdir(parents=True)
        except OSError as err:
            raise ValueError(f"cannot create --workdir {path} ({err.strerror}): "
                             "choose a writable path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {path} is not writable (read-only?): choose a writable path")


@contextlib.contextmanager
def locked(path: Path, command: str):
    """Holds the workdir's lock while the block runs; `ValueError` naming the holder when
    another command has it."""
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--workdir {path} is in use by {_holder(lock)}: wait for it to "
                             "finish (or stop it), or use another workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "argv": sys.argv,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        os.close(fd)  # closing drops the lock; the file stays (harmless, reused)


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"`elf-jax {info['command']}` (pid {info['pid']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another elf-jax command"
