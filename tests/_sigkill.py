"""Killing a training subprocess with SIGKILL mid-run, for the resume tests."""

import signal
import time


def kill_when_written(proc, path, timeout: float = 300) -> str:
    """SIGKILLs ``proc`` (stdout piped) as soon as ``path`` exists (a committed checkpoint)
    and returns its output; fails the test when the checkpoint never came or the run ended
    before the kill (then it has to be longer)."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    assert path.exists(), f"no checkpoint was written:\n{log[-3000:]}"
    assert alive, "the run finished before it could be killed; make it longer"
    return log
