"""Checkpoints: one pytree + JSON metadata (``save_tree``/``load_tree``) and per-step
checkpoints (``StepCheckpoints``), both written with orbax.

Formats
-------
``save_tree(path, tree, metadata)`` writes a directory ``path`` holding an orbax
``CompositeCheckpointHandler`` checkpoint with two items:

* ``tree/``      -- the pytree (``StandardSave``: arrays, nested dicts/lists),
* ``metadata/``  -- the JSON metadata dict (``JsonSave``), plus the library version and
  ``"format": "elf_jax.tree/1"``.

The directory is first written to a hidden temporary sibling (``.<name>.tmp-<id>``) and
renamed onto ``path`` only when it is complete, so a crash or an error mid-save never leaves
a half-written ``path``; a previous good checkpoint at ``path`` is moved aside
(``.<name>.old-<id>``) and deleted only after the new one is in place.  ``load_tree`` falls
back to such an ``.old`` sibling if a crash happened in the (tiny) window between the two
renames.

``StepCheckpoints(directory)`` is an orbax ``CheckpointManager`` whose step directories
``<directory>/<step>/`` each hold the same two items, named ``state`` and ``metadata``.
orbax writes each step to a temporary directory and renames it when finished (atomic).

Both refuse to write trees holding NaN or Inf (``ValueError`` naming the leaf), so a
diverged run never replaces the last good checkpoint.

Also the library's one atomic JSON writer (``write_json_atomic``) and one content hash
(``fingerprint``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from elf_jax.hashing import fingerprint  # noqa: F401 (its home; importers of checkpoint use it)

__all__ = [
    "save_tree",
    "load_tree",
    "read_metadata",
    "check_finite",
    "CorruptCheckpoint",
    "check_expect",
    "write_json_atomic",
    "fingerprint",
    "StepCheckpoints",
    "TREE_FORMAT",
]

TREE_FORMAT = "elf_jax.tree/1"
log = logging.getLogger(__name__)
_TREE = "tree"
_META = "metadata"


# --------------------------------------------------------------------------- helpers
def _jsonable(x: Any) -> Any:
    """Converts numpy scalars/arrays, tuples and paths to plain JSON types."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if hasattr(x, "dtype") and hasattr(x, "name"):  # e.g. a numpy/jax dtype object
        return str(x)
    if isinstance(x, type) or hasattr(x, "__name__"):
        return getattr(x, "__name__", str(x))
    raise ValueError(
        f"metadata value {x!r} of type {type(x).__name__} is not JSON-serializable; "
        "store strings, numbers, bools, lists or dicts in checkpoint metadata")


def _normalize_meta(metadata: Optional[Mapping[str, Any]]) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    meta = _jsonable(metadata)
    json.dumps(meta)  # fail early with json's own message if still not serializable
    return meta


def write_json_atomic(path, obj) -> Path:
    """Writes ``obj`` (numpy values, tuples and paths converted) as indented JSON to ``path``
    through a temporary sibling and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:10]}")
    try:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_hash(path, chunk: int = 1 << 24) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (a multi-GB expert buffer)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _is_typed_key(x) -> bool:
    try:
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    except Exception:  # noqa: BLE001
        return False


def _prepare_tree(tree: Any) -> Any:
    """Typed PRNG keys are stored as their raw key data (uint32)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def check_finite(tree: Any, what: str = "tree") -> None:
    """Raises ``ValueError`` naming the first leaf of ``tree`` holding NaN or Inf."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for keypath, leaf in leaves:
        if _is_typed_key(leaf):
            continue
        arr = np.asarray(jax.device_get(leaf))
        if arr.dtype.kind not in "fc" and arr.dtype.name not in ("bfloat16", "float8_e4m3fn",
                                                                 "float8_e5m2", "float16"):
            continue
        finite = np.isfinite(arr.astype(np.float32) if arr.dtype.kind not in "fc" else arr)
        if not finite.all():
            bad = int(arr.size - finite.sum())
            name = jax.tree_util.keystr(keypath) or "<root>"
            raise ValueError(
                f"refusing to save {what}: leaf {name} (shape {arr.shape}) holds {bad} NaN/Inf "
                "value(s). The run has diverged; the last good checkpoint is kept. Lower the "
                "learning rate or restart from the last good checkpoint.")


def check_expect(metadata: Mapping[str, Any], expect: Optional[Mapping[str, Any]],
                 where: str, names: Optional[Mapping[str, str]] = None) -> None:
    """Raises ``ValueError`` if any ``expect[key]`` differs from ``metadata[key]``, naming
    what differs in words (``names``: what a key means, e.g. a hash's inputs)."""
    if not expect:
        return
    exp = _normalize_meta(expect)
    for key, want in exp.items():
        if key not in metadata:
            raise ValueError(
                f"{where}: metadata has no key {key!r} (expected {key}={want!r}); it was written "
                f"by another tool or an older version. Keys present: {sorted(metadata)}")
        have = metadata[key]
        if have != want:
            what = f"{key} ({names[key]})" if names and key in names else key
            raise ValueError(f"{where}: made with another {what} (saved vs asked): "
                             f"{what_differs(have, want)}")


def what_differs(have: Any, want: Any, limit: int = 6) -> str:
    """`a 0.01 vs 0.05; b ...` for the entries of two dicts that differ (the values
    themselves, shortened, otherwise)."""
    def short(v):
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    if isinstance(have, Mapping) and isinstance(want, Mapping):
        keys = [k for k in dict.fromkeys([*have, *want]) if have.get(k, _MISSING) != want.get(k, _MISSING)]
        parts = [f"{k} {short(have.get(k, '(absent)'))} vs {short(want.get(k, '(absent)'))}"
                 for k in keys[:limit]]
        return "; ".join(parts) + (f"; ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"{short(have)} vs {short(want)}"


_MISSING = object()


def _abstract(like: Any) -> Any:
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if _is_typed_key(x):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
    return jax.tree.map(one, like)


def _rewrap_keys(restored: Any, like: Any) -> Any:
    """Turns raw key data back into typed PRNG keys where ``like`` holds typed keys."""
    if like is None:
        return restored
    def one(l, r):
        if _is_typed_key(l):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(l))
        return r
    return jax.tree.map(one, like, restored)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files cannot be read back (truncated, damaged, half-deleted);
    ``reason`` is the underlying error in one short line."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _corrupt(path, err: BaseException) -> CorruptCheckpoint:
    # tensorstore errors run to several long lines; the first 200 characters name the cause
    reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    return CorruptCheckpoint(
        f"checkpoint at {path} is corrupt or incomplete ({reason}). "
        "Delete that directory and re-create it (re-run the step that wrote it).", reason)


# --------------------------------------------------------------------------- one tree
def save_tree(path, tree: Any, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically writes ``tree`` and ``metadata`` (a JSON dict) to directory ``path``.

    Refuses trees with NaN/Inf.  An existing checkpoint at ``path`` is replaced only once
    the new one is completely written.  Returns the absolute path.
    """
    path = Path(path).absolute()
    meta = _normalize_meta(metadata)
    tree = _prepare_tree(tree)
    check_finite(tree, what=f"checkpoint {path}")
    from elf_jax.version import __version__
    meta.setdefault("format", TREE_FORMAT)
    meta.setdefault("elf_jax_version", __version__)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:10]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        ckptr = _checkpointer()
        try:
            ckptr.save(tmp, args=ocp.args.Composite(**{
                _TREE: ocp.args.StandardSave(tree),
                _META: ocp.args.JsonSave(meta),
            }))
        finally:
            ckptr.close()
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        # remove the partial write (incl. orbax's own tmp dir); orbax may still be finishing
        # a concurrent item write, so sweep twice
        for attempt in range(2):
            for leftover in path.parent.glob(f".{path.name}.tmp-{tag}*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if attempt == 0:
                time.sleep(0.2)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.old-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    return path


def is_tree_dir(path) -> bool:
    """Whether `path` is a directory `save_tree` wrote (intact or not): it holds one of its
    items. An empty or unrelated directory is not (a damaged checkpoint is)."""
    path = Path(path)
    return path.is_dir() and any((path / item).exists() for item in (_TREE, _META))


def _resolve_existing(path: Path) -> Path:
    if path.is_dir():
        return path
    # crash between the two renames of save_tree: the previous good copy is a sibling
    olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
    if olds:
        return olds[-1]
    if path.exists():
        raise ValueError(f"{path} is a file, not a checkpoint directory written by save_tree")
    raise FileNotFoundError(
        f"no checkpoint at {path}: check the path (or workdir), or run the step that creates "
        "it first")


def read_metadata(path) -> dict:
    """Returns the metadata dict of a ``save_tree`` checkpoint without loading the tree."""
    path = _resolve_existing(Path(path).absolute())
    meta_file = path / _META / "metadata"
    try:
        with open(meta_file) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None


def load_tree(path, expect: Optional[Mapping[str, Any]] = None, like: Any = None):
    """Loads a ``save_tree`` checkpoint; returns ``(tree, metadata)``.

    ``expect``: dict of metadata entries that must match (``ValueError`` naming the key and
    both values otherwise).  ``like``: a pytree of arrays or ``jax.ShapeDtypeStruct`` giving
    the structure/dtypes/shardings to restore into (default: the saved structure, as
    ``jax.Array``).  Missing path: ``FileNotFoundError``; corrupt: ``ValueError``.
    """
    path = _resolve_existing(Path(path).absolute())
    meta = read_metadata(path)
    check_expect(meta, expect, where=f"checkpoint {path}")
    restore = ocp.args.StandardRestore(_abstract(like) if like is not None else None)
    ckptr = _checkpointer()
    try:
        tree = ckptr.restore(path, args=ocp.args.Composite(**{_TREE: restore}))[_TREE]
    except (FileNotFoundError, ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        if like is not None and isinstance(e, ValueError) and "shape" in str(e).lower():
            raise ValueError(
                f"checkpoint at {path} does not fit the requested structure `like`: {e}") from e
        raise _corrupt(path, e) from e
    except Exception as e:  # noqa: BLE001 - tensorstore raises its own error types
        raise _corrupt(path, e) from e
    finally:
        ckptr.close()
    return _rewrap_keys(tree, like), meta


# --------------------------------------------------------------------------- per step
class StepCheckpoints:
    """Per-step ``(state pytree, metadata dict)`` checkpoints under ``directory``.

    A thin wrapper of ``ocp.CheckpointManager`` (synchronous saves, ``max_to_keep`` most
    recent steps kept).  Step directories are ``<directory>/<step>/{state,metadata}``.
    """

    def __init__(self, directory, max_to_keep: Optional[int] = 2):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    # -- queries
    def all_steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        """The highest saved step, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def __contains__(self, step: int) -> bool:
        return int(step) in self.all_steps()

    # -- save / restore
    def save(self, step: int, state: Any, meta: Optional[Mapping[str, Any]] = None) -> None:
        """Saves ``state`` and ``meta`` as ``step``; refuses non-finite states and steps that
        already exist (``ValueError``)."""
        step = int(step)
        state = _prepare_tree(state)
        check_finite(state, what=f"step {step} in {self.directory}")
        m = _normalize_meta(meta)
        m.setdefault("step", step)
        if step in self.all_steps():
            raise ValueError(
                f"step {step} already exists in {self.directory}; steps must be new (resume "
                f"after step {self.latest_step()}) or delete the directory to start over")
        self._mngr.save(step, args=ocp.args.Composite(**{
            "state": ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(m),
        }), force=True)
        self._mngr.wait_until_finished()

    def read_meta(self, step: Optional[int] = None) -> dict:
        step = self._pick(step)
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(
                **{_META: ocp.args.JsonRestore()}))[_META]
        except Exception as e:  # noqa: BLE001
            raise _corrupt(self.directory / str(step), e) from e

    def _pick(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoints in {self.directory}: check the directory, or run the step "
                "that creates them first")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def restore(self, step: Optional[int] = None, like: Any = None):
        """Returns ``(state, meta)`` of ``step`` (default: the latest).

        ``like``: a pytree of arrays/``ShapeDtypeStruct`` with the expected structure
        (recommended: the freshly initialized state); without it the saved structure is
        returned.
        """
        step = self._pick(step)
        state_args = ocp.args.StandardRestore(_abstract(like) if like is not None else None)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**{
                "state": state_args, _META: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types
            raise _corrupt(self.directory / str(step), e) from e
        meta = out[_META]
        if meta is None:
            raise _corrupt(self.directory / str(step), RuntimeError("metadata missing"))
        return _rewrap_keys(out["state"], like), meta

    def restore_latest_good(self, like: Any = None,
                            check: Optional[Callable[[dict], None]] = None) -> Optional[tuple]:
        """``(step, state, meta)`` of the newest step that reads back, or ``None`` if there are
        no steps. ``check(meta)`` may refuse a step (its error propagates). A step that cannot be
        read (truncated or damaged files) is skipped with a logged warning naming it, and
        deleted once an older step has been restored (it is rewritten by the resumed run);
        when no step can be read, the oldest one's ``CorruptCheckpoint`` is raised."""
        steps = self.all_steps()
        bad = []
        for i, step in enumerate(reversed(steps)):
            try:
                meta = self.read_meta(step)
                if check is not None:
                    check(meta)
                state, meta = self.restore(step, like=like)
            except CorruptCheckpoint as e:
                if i == len(steps) - 1:
                    raise
                log.warning("checkpoint step %d in %s cannot be read (%s); falling back to the "
                            "step before it (it will be written again)", step, self.directory,
                            e.reason)
                bad.append(step)
                continue
            for b in bad:
                self._mngr.delete(b)
            return step, state, meta
        return None

    def close(self) -> None:
        self._mngr.close()

    def __repr__(self) -> str:
        return f"StepCheckpoints({str(self.directory)!r}, max_to_keep={self.max_to_keep})"
