"""Synthetic (distilled) datasets: container, validation, hashing, storage.

A ``SyntheticSet`` holds

* ``images``  float32 ``[N, H, W, C]`` (NHWC, normalized space, ZCA-whitened if
  ``metadata["zca"]``),
* ``labels``  int32 ``[N]`` (hard) or float32 ``[N, K]`` (soft),
* ``lr``      optional learned learning rate (MTT/TESLA), a positive finite float,
* ``metadata`` a JSON dict with at least ``method``, ``dataset``, ``ipc``, ``arch``, ``zca``,
  ``iteration`` and ``num_classes`` (filled in with defaults when missing), and, for sets
  made or imported since the record exists, ``normalization``: the space the images live in.

Normalization record
--------------------
``metadata["normalization"] = {"mean": [...], "std": [...], "zca": bool}``: the images are
``(x01 - mean) / std`` of pixels ``x01`` in [0, 1], then ZCA-whitened when ``zca`` (data loaded
with ZCA are not mean/std normalized: mean 0, std 1). :func:`conform_normalization` brings a
set into a run's space: the same record passes, another mean/std is converted
(``x01 = x * std_old + mean_old``, ``x_new = (x01 - mean_new) / std_new``) with a log line
naming both, and a difference involving ZCA is refused (whitened pixels cannot be
renormalized per channel). A set without the record (older files) is assumed to be in the
space the caller names, and the log says so once.

Storage formats
---------------
* orbax (``save_synset``/``load_synset``): a ``checkpoint.save_tree`` directory whose tree is
  ``{"images", "labels"}`` and whose metadata is the set's metadata plus
  ``kind="synthetic_set"``, ``label_kind`` (``"hard"``/``"soft"``), ``lr`` (float or null),
  ``image_shape``, ``num_images`` and ``content_hash``; loading re-computes the hash and
  refuses a set whose content does not match it.
* ``.npz`` (``to_npz``/``from_npz``): arrays ``images``, ``labels``, optional ``lr`` and
  ``metadata_json`` (the metadata dict as a JSON string).
"""
from __future__ import annotations

import dataclasses
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

from elf_jax import checkpoint
from elf_jax.hashing import fingerprint
from elf_jax.data.sampler import take_rows

__all__ = [
    "SyntheticSet",
    "save_synset",
    "load_synset",
    "to_npz",
    "from_npz",
    "random_real_subset",
    "SYNSET_KIND",
    "normalization_record",
    "dataset_normalization",
    "describe_normalization",
    "conform_normalization",
]

SYNSET_KIND = "synthetic_set"
_REQUIRED_META = {
    "method": "unknown",
    "dataset": None,
    "ipc": None,
    "arch": None,
    "zca": False,
    "iteration": None,
}


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSet:
    """A validated synthetic set (see the module docstring).

    ``num_classes`` may be given explicitly (recommended for hard labels, since a set need
    not contain every class); otherwise it is taken from ``metadata["num_classes"]``, from
    the soft labels' width, or ``max(label) + 1``.
    """

    images: np.ndarray
    labels: np.ndarray
    lr: Optional[float] = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: Optional[int] = None

    def __post_init__(self):
        images = _host(self.images)
        if images.ndim != 4:
            raise ValueError(
                f"synthetic images must be NHWC [N, H, W, C], got shape {images.shape}; "
                "convert NCHW arrays with images.transpose(0, 2, 3, 1)")
        if images.shape[0] == 0:
            raise ValueError("synthetic set is empty (0 images)")
        if not np.issubdtype(images.dtype, np.floating) and images.dtype.name != "bfloat16":
            raise ValueError(
                f"synthetic images must be floating point (normalized), got {images.dtype}")
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            bad = int(images.size - np.isfinite(images).sum())
            raise ValueError(
                f"synthetic images hold {bad} NaN/Inf value(s) (shape {images.shape}): a "
                "diverged distillation or a damaged export; use an earlier (last good) "
                "checkpoint of the set, or export it again")
        n = images.shape[0]

        labels = _host(self.labels)
        meta = dict(self.metadata or {})
        k = self.num_classes if self.num_classes is not None else meta.get("num_classes")
        if labels.ndim == 1:
            if not (np.issubdtype(labels.dtype, np.integer)
                    or (np.issubdtype(labels.dtype, np.floating)
                        and np.all(labels == np.round(labels)))):
                raise ValueError(
                    f"hard labels must be integers, got dtype {labels.dtype}")
            labels = labels.astype(np.int32)
            if k is None:
                k = int(labels.max()) + 1
            k = int(k)
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"labels must lie in [0, {k - 1}] for {k} classes, found range [{lo}, {hi}]; "
                    "check num_classes or the label encoding")
        elif labels.ndim == 2:
            labels = labels.astype(np.float32)
            if k is not None and int(k) != labels.shape[1]:
                raise ValueError(
                    f"soft labels have {labels.shape[1]} classes but num_classes is {k}")
            k = labels.shape[1]
            if not np.isfinite(labels).all():
                raise ValueError("soft labels hold NaN/Inf values")
        else:
            raise ValueError(
                f"labels must be [N] (hard, int) or [N, K] (soft), got shape {labels.shape}")
        if labels.shape[0] != n:
            raise ValueError(
                f"{n} images but {labels.shape[0]} labels: they must have the same length")

        lr = self.lr
        if lr is not None:
            arr = _host(lr)
            if arr.size != 1:
                raise ValueError(f"lr must be a scalar, got shape {arr.shape}")
            lr = float(arr.reshape(()))
            if not np.isfinite(lr):
                raise ValueError(
                    f"learned lr is {lr}: the distillation diverged; use an earlier checkpoint "
                    "or evaluate without the learned lr")
            if lr <= 0:
                raise ValueError(f"learned lr must be positive, got {lr}")

        for key, default in _REQUIRED_META.items():
            meta.setdefault(key, default)
        meta["num_classes"] = k
        if meta.get("ipc") is None:
            hard = labels if labels.ndim == 1 else labels.argmax(-1)
            meta["ipc"] = int(np.bincount(hard, minlength=k).max())  # the largest class
        meta = checkpoint._normalize_meta(meta)

        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "metadata", meta)
        object.__setattr__(self, "num_classes", k)

    # ------------------------------------------------------------------ properties
    @property
    def ipc(self) -> int:
        """Images per class (metadata value; inferred from the labels when missing)."""
        return int(self.metadata["ipc"])

    @property
    def soft(self) -> bool:
        return self.labels.ndim == 2

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def dataset(self) -> Optional[str]:
        return self.metadata["dataset"]

    def __len__(self) -> int:
        return self.images.shape[0]

    def hard_labels(self) -> np.ndarray:
        """Hard labels (argmax of soft labels)."""
        return self.labels if not self.soft else self.labels.argmax(-1).astype(np.int32)

    def content_hash(self) -> str:
        """sha256 hex digest of the images and labels (shapes, dtypes and bytes)."""
        return fingerprint(self.images, self.labels)

    def replace(self, **changes) -> "SyntheticSet":
        """A copy with fields changed (re-validated); ``metadata`` entries are merged."""
        if "metadata" in changes:
            changes["metadata"] = {**self.metadata, **changes["metadata"]}
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        m = self.metadata
        return (f"SyntheticSet(n={len(self)}, image_shape={self.image_shape}, "
                f"classes={self.num_classes}, labels={'soft' if self.soft else 'hard'}, "
                f"lr={self.lr}, method={m['method']!r}, dataset={m['dataset']!r}, "
                f"ipc={m['ipc']}, arch={m['arch']!r})")


def _full_meta(s: SyntheticSet) -> dict:
    return {
        **s.metadata,
        "kind": SYNSET_KIND,
        "label_kind": "soft" if s.soft else "hard",
        "lr": s.lr,  # exact (JSON float), not rounded through float32
        "image_shape": list(s.image_shape),
        "num_images": len(s),
        "content_hash": s.content_hash(),
    }


_STORAGE_KEYS = ("kind", "label_kind", "lr", "image_shape", "num_images", "content_hash",
                 "format", "elf_jax_version")


def save_synset(path, s: SyntheticSet) -> Path:
    """Writes ``s`` atomically with orbax (see the module docstring for the layout)."""
    if not isinstance(s, SyntheticSet):
        raise ValueError(f"save_synset expects a SyntheticSet, got {type(s).__name__}")
    tree = {"images": s.images, "labels": s.labels}
    return checkpoint.save_tree(path, tree, _full_meta(s))


def _corrupt_set(where, why: str) -> ValueError:
    return ValueError(f"synthetic set {where} is corrupt ({why}): re-run `elf-jax distill` "
                      "(or re-export an imported set) or restore it from a copy")


def _stored_hash(images, labels) -> str:
    """``SyntheticSet.content_hash`` of stored arrays, computed before validation so a damaged
    set is reported as damaged, not as invalid (e.g. NaN read as a diverged distillation)."""
    labels = np.asarray(labels)
    return fingerprint(np.asarray(images, np.float32),
                                  labels.astype(np.int32 if labels.ndim == 1 else np.float32))


def _from_stored(where, images, labels, lr, meta: dict) -> SyntheticSet:
    expected_hash = meta.get("content_hash")
    if expected_hash is not None and _stored_hash(images, labels) != expected_hash:
        raise _corrupt_set(where, "content hash mismatch: its arrays changed after it was saved")
    user_meta = {k: v for k, v in meta.items() if k not in _STORAGE_KEYS}
    return SyntheticSet(images, labels, lr=lr, metadata=user_meta,
                        num_classes=user_meta.get("num_classes"))


def load_synset(path, expect: Optional[Mapping[str, Any]] = None) -> SyntheticSet:
    """Loads a set written by ``save_synset``; ``expect`` = metadata that must match."""
    meta = checkpoint.read_metadata(path)
    if meta.get("kind") != SYNSET_KIND:
        raise ValueError(
            f"{path} is not a synthetic set (kind={meta.get('kind')!r}); pass a directory "
            "written by save_synset")
    try:
        tree, meta = checkpoint.load_tree(path, expect=expect)
    except checkpoint.CorruptCheckpoint as e:
        raise _corrupt_set(path, f"unreadable: {e.reason}") from e
    return _from_stored(path, tree["images"], tree["labels"], meta.get("lr"), meta)


def to_npz(path, s: SyntheticSet) -> Path:
    """Exports ``s`` to a ``.npz`` file (arrays + ``metadata_json``)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": s.images, "labels": s.labels,
              "metadata_json": np.asarray(json.dumps(_full_meta(s)))}
    if s.lr is not None:
        arrays["lr"] = np.asarray(s.lr, np.float64)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
    return path


def _not_npz(path) -> ValueError:
    return ValueError(
        f"{path} is not a valid .npz archive (truncated, corrupt or not an npz): re-export "
        "it with elf_jax.synset.to_npz (or numpy.savez) and copy it again")


def _read_npz(path: Path) -> dict:
    """The ``images``/``labels``/``lr``/``metadata_json`` arrays of the ``.npz`` at ``path``.

    Never loads pickled data, and never repeats numpy's advice to allow it: a file that is not
    a zip of ``.npy`` arrays (truncated, random bytes, a pickle) is reported as not an npz."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        raise _not_npz(path) from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy renamed
        raise _not_npz(path)
    with z:
        if "images" not in z.files or "labels" not in z.files:
            raise ValueError(
                f"{path} has arrays {sorted(z.files)}; a synthetic set needs 'images' "
                "(NHWC) and 'labels'")
        out = {}
        for name in ("images", "labels", "lr", "metadata_json"):
            if name not in z.files:
                continue
            try:
                out[name] = z[name]
            except ValueError as e:  # an object array: loading it would unpickle
                if "allow_pickle" not in str(e):
                    raise _not_npz(path) from None
                raise ValueError(f"{path}: array {name!r} holds Python objects (pickled); "
                                 "store it as a numeric array") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error):  # bad CRC, cut data
                raise _not_npz(path) from None
    return out


def from_npz(path) -> SyntheticSet:
    """Imports a set written by ``to_npz`` (or any npz with ``images`` and ``labels``, NHWC;
    uint8 images are read as float 0..255, for ``import_stats="pixels255"``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}; check the path")
    z = _read_npz(path)
    try:
        meta = json.loads(str(z["metadata_json"])) if "metadata_json" in z else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its metadata_json is not valid JSON ({e}); re-export it") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its metadata_json holds a {type(meta).__name__}, not a JSON "
                         "object ({\"key\": value, ...}); re-export it")
    images = z["images"]
    if images.dtype == np.uint8:  # raw 0..255 pixels: the importer checks and converts them
        images = images.astype(np.float32)
    return _from_stored(path, images, z["labels"], z.get("lr"), meta)


def random_real_subset(key, dataset, ipc: int) -> SyntheticSet:
    """``ipc`` random real images per class of ``dataset`` (an ``ArrayDataset``-like object
    with ``images``, ``labels``, ``num_classes`` and ``name``, or a ``StreamedSplit``, of
    which only the selected rows are read), ordered by class; labelled
    ``method="real_random"``.  ``ValueError`` if a class has fewer than ``ipc`` images."""
    ipc = int(ipc)
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    labels = _host(dataset.labels)
    if labels.ndim != 1:
        raise ValueError("random_real_subset needs hard integer labels in the dataset")
    k = int(getattr(dataset, "num_classes", int(labels.max()) + 1))
    # one random number per real image (a single jax call); each class keeps the ipc
    # images with the smallest numbers, i.e. a uniformly random subset
    u = _host(jax.random.uniform(key, (labels.shape[0],)))
    picks = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if idx.size < ipc:
            raise ValueError(
                f"class {c} of dataset {getattr(dataset, 'name', '?')!r} has only {idx.size} "
                f"images but ipc={ipc} were requested; lower ipc to at most {idx.size}")
        picks.append(idx[np.argsort(u[idx], kind="stable")[:ipc]])
    sel = np.concatenate(picks)
    images = take_rows(dataset, sel)
    space = dataset_normalization(dataset)
    meta = {**({"normalization": space} if space else {}),
        "method": "real_random",
        "dataset": getattr(dataset, "name", None),
        "ipc": ipc,
        "arch": None,
        "zca": bool(getattr(dataset, "zca", False)),
        "iteration": 0,
        "seed_key": _host(checkpoint._prepare_tree(key)).tolist(),  # typed key: its data
        "indices_hash": fingerprint(sel.astype(np.int64))[:16],
    }
    return SyntheticSet(images, labels[sel].astype(np.int32), metadata=meta, num_classes=k)


# ------------------------------------------------------------------ normalization record
def normalization_record(mean, std, zca: bool = False) -> dict:
    """``{"mean", "std", "zca"}`` of an image space (see the module docstring)."""
    mean = [float(v) for v in np.atleast_1d(mean)]
    std = [float(v) for v in np.atleast_1d(std)]
    if len(mean) != len(std) or not all(v > 0 for v in std):
        raise ValueError(f"normalization needs one mean and one positive std per channel, got "
                         f"mean {mean}, std {std}")
    return {"mean": mean, "std": std, "zca": bool(zca)}


def dataset_normalization(dataset) -> Optional[dict]:
    """The record of the space a loaded split (``ArrayDataset``) lives in; None for a
    dataset-like object that does not say (no ``mean``/``std``)."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        return None
    if not getattr(dataset, "normalized", True):  # [0, 1] pixels (the ZCA default)
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    return normalization_record(mean, std, getattr(dataset, "zca", None) is not None)


def describe_normalization(record: Mapping[str, Any]) -> str:
    """``mean [..] std [..]`` (+ ``, ZCA``): one record in a log or error line."""
    def fmt(v):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return (f"mean {fmt(record['mean'])} std {fmt(record['std'])}"
            + (", ZCA" if record.get("zca") else ""))


def _same_space(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (bool(a.get("zca")) == bool(b.get("zca")) and len(a["mean"]) == len(b["mean"])
            and np.allclose(a["mean"], b["mean"], rtol=0, atol=1e-6)
            and np.allclose(a["std"], b["std"], rtol=0, atol=1e-6))


def conform_normalization(s: SyntheticSet, target: Mapping[str, Any], *, where: str = "the set",
                          assumed: Optional[Mapping[str, Any]] = None, assumed_why: str = "",
                          log=print) -> SyntheticSet:
    """``s`` in the image space ``target`` (a :func:`normalization_record`).

    The set's own record is used; without one, ``assumed`` (default ``target``) is, and the
    log says so (``assumed_why`` tells why that space). Another mean/std: the images are
    converted and the log names both spaces; a difference involving ZCA or the channel count
    raises a one-line ``ValueError`` naming both. The returned set records ``target`` (and
    ``normalization_from`` when it was converted)."""
    target = normalization_record(target["mean"], target["std"], target.get("zca", False))
    have = s.metadata.get("normalization")
    if have is None:
        have = dict(target if assumed is None else assumed)
        log(f"[synset] {where} records no normalization: taking it to be in "
            f"{describe_normalization(have)}" + (f" ({assumed_why})" if assumed_why else ""))
    have = normalization_record(have["mean"], have["std"], have.get("zca", False))
    if _same_space(have, target):
        return s.replace(metadata={"normalization": target})
    both = f"{describe_normalization(have)} (the set) vs {describe_normalization(target)} (this run)"
    if len(have["mean"]) != s.image_shape[-1] or len(have["mean"]) != len(target["mean"]):
        raise ValueError(f"{where} has {s.image_shape[-1]}-channel images, normalization "
                         f"{both}: the channel counts differ; import it into a matching dataset")
    if have["zca"] or target["zca"]:
        raise ValueError(f"{where} cannot be used: normalization {both}; ZCA-whitened images "
                         "cannot be renormalized, so run with the set's zca and mean/std setting")
    shape = (1, 1, 1, -1)
    mean0, std0 = np.reshape(have["mean"], shape), np.reshape(have["std"], shape)
    mean1, std1 = np.reshape(target["mean"], shape), np.reshape(target["std"], shape)
    images = ((s.images * std0 + mean0) - mean1) / std1
    log(f"[synset] {where}: renormalized from {describe_normalization(have)} to "
        f"{describe_normalization(target)} (this run's)")
    return s.replace(images=images.astype(np.float32),
                     metadata={"normalization": target, "normalization_from": have})
