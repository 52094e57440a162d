"""Feature bank: the teacher's features of the CLEAN synthetic images, computed once.

``build_bank(teacher_net, teacher_variables, synset, teacher_name=..., snapshot_epoch=...)``
runs the teacher (inference mode, no gradient) on the un-augmented synthetic images in
fixed-size jitted batches and records, through flax's ``capture_intermediates``,

* ``layer=None`` (default): the teacher's ``front`` output, i.e. the last conv block after
  norm -> relu -> pool (docs/METHOD.md: ``[N, 4, 4, 512]`` for ConvNetW512 on 32x32 input), recorded
  as layer ``"front"``;
* ``layer="block2"`` / ``"stage3"`` / ``"pre_logits"`` / ``"stage4/block0"``: the output of
  that named submodule (a ``/``-separated module path) in the full forward pass.

The bank also holds the teacher's logits of the same clean images (a full forward pass in
inference mode, float32 ``[N, K]``): the targets of the ``kd`` loss mode, a
knowledge-distillation control for ELF (``elf_jax.losses.kd_loss``). Banks saved before
they were stored load with ``logits=None``.

Storage (``save_bank``/``load_bank``): a ``checkpoint.save_tree`` directory with tree
``{"features": float32 [N, ...], "logits": float32 [N, K]}`` (``logits`` when held; its
``logits_hash`` next to ``features_hash``) and metadata ``kind="feature_bank"``, ``teacher``,
``snapshot_epoch``, ``layer``, ``dataset``, ``feature_shape`` (per image), ``num_images``,
``synset_hash`` (``SyntheticSet.content_hash()``), ``synset_method``, ``synset_ipc``.
Loading with ``expect_synset`` / ``expect_teacher`` refuses a bank made for another set or
teacher, naming both.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax import checkpoint
from elf_jax.hashing import fingerprint
from elf_jax.synset import SyntheticSet

__all__ = ["FeatureBank", "build_bank", "save_bank", "load_bank", "teacher_features",
           "teacher_logits", "BANK_KIND", "FRONT_LAYER"]

BANK_KIND = "feature_bank"
FRONT_LAYER = "front"


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureBank:
    """Teacher features ``[N, ...]`` (float32, host) of a synthetic set plus metadata, and
    the teacher's logits ``[N, K]`` of the same images (None in banks saved before)."""

    features: np.ndarray
    metadata: Mapping[str, Any]
    logits: Optional[np.ndarray] = None

    def __post_init__(self):
        f = np.asarray(jax.device_get(self.features))
        if f.ndim < 2:
            raise ValueError(f"features must be [N, ...] with a feature axis, got {f.shape}")
        f = f.astype(np.float32)
        if not np.isfinite(f).all():
            raise ValueError(
                f"teacher features hold {int(f.size - np.isfinite(f).sum())} NaN/Inf values: "
                "the teacher snapshot is broken; use another snapshot epoch")
        meta = dict(self.metadata or {})
        meta.setdefault("kind", BANK_KIND)
        meta["feature_shape"] = list(f.shape[1:])
        meta["num_images"] = int(f.shape[0])
        meta.pop("logits_shape", None)
        if self.logits is not None:
            logits = _checked_logits(self.logits, f.shape[0])
            meta["logits_shape"] = list(logits.shape[1:])
            object.__setattr__(self, "logits", logits)
        object.__setattr__(self, "features", f)
        object.__setattr__(self, "metadata", checkpoint._normalize_meta(meta))

    @property
    def num_classes(self) -> Optional[int]:
        """The width ``K`` of the stored teacher logits (None without logits)."""
        return None if self.logits is None else int(self.logits.shape[1])

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.features.shape[1:])

    @property
    def teacher(self) -> Optional[str]:
        return self.metadata.get("teacher")

    @property
    def snapshot_epoch(self) -> Optional[int]:
        return self.metadata.get("snapshot_epoch")

    @property
    def synset_hash(self) -> Optional[str]:
        return self.metadata.get("synset_hash")

    def __len__(self) -> int:
        return self.features.shape[0]

    def check_synset(self, synset: Union[SyntheticSet, str], where: str = "feature bank"):
        """``ValueError`` unless this bank was built for ``synset`` (a set or its hash)."""
        want = synset.content_hash() if isinstance(synset, SyntheticSet) else str(synset)
        have = self.synset_hash
        if have != want:
            extra = ""
            if isinstance(synset, SyntheticSet):
                extra = (f" (bank: {self.metadata.get('synset_method')!r} set of "
                         f"{self.metadata.get('dataset')!r}, {len(self)} images; given: "
                         f"{synset.method!r} set of {synset.dataset!r}, {len(synset)} images)")
            raise ValueError(
                f"{where} was built for synthetic set {str(have)[:12]}... but synthetic set "
                f"{want[:12]}... was given{extra}; rebuild the bank with build_bank for this set")
        if isinstance(synset, SyntheticSet) and len(synset) != len(self):
            raise ValueError(f"{where} has {len(self)} features but the set {len(synset)} images")

    def check_teacher(self, teacher: Any, where: str = "feature bank"):
        """``ValueError`` unless this bank comes from ``teacher``: a name, a
        ``(name, snapshot_epoch)`` tuple, or a dict with ``teacher``/``snapshot_epoch``/
        ``layer`` entries."""
        if isinstance(teacher, str):
            want = {"teacher": teacher}
        elif isinstance(teacher, (tuple, list)):
            want = dict(zip(("teacher", "snapshot_epoch", "layer"), teacher))
        elif isinstance(teacher, Mapping):
            want = dict(teacher)
        else:
            raise ValueError(f"expect_teacher must be a name, (name, epoch) or dict, got "
                             f"{teacher!r}")
        for key, val in want.items():
            have = self.metadata.get(key)
            if have != val:
                raise ValueError(
                    f"{where} was built with {key}={have!r} (teacher {self.teacher!r}, epoch "
                    f"{self.snapshot_epoch}) but {key}={val!r} was expected; rebuild the bank "
                    "with the intended teacher snapshot")

    def __repr__(self) -> str:
        m = self.metadata
        return (f"FeatureBank(n={len(self)}, feature_shape={self.feature_shape}, "
                f"teacher={m.get('teacher')!r}, snapshot_epoch={m.get('snapshot_epoch')}, "
                f"layer={m.get('layer')!r}, dataset={m.get('dataset')!r})")


def _checked_logits(logits, n: int) -> np.ndarray:
    t = np.asarray(jax.device_get(logits)).astype(np.float32)
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(f"teacher logits must be [N, K] with N = {n} (one row per feature), "
                         f"got {t.shape}; rebuild the bank with build_bank")
    if not np.isfinite(t).all():
        raise ValueError(f"teacher logits hold {int(t.size - np.isfinite(t).sum())} NaN/Inf "
                         "values: the teacher snapshot is broken; use another snapshot epoch")
    return t


# ------------------------------------------------------------------------------ building
def _split_layer(layer: str) -> tuple:
    parts = tuple(p for p in layer.replace(".", "/").split("/") if p)
    if not parts:
        raise ValueError(f"invalid layer name {layer!r}")
    return parts


def _module_path(mdl) -> tuple:
    path = getattr(mdl, "path", None)
    if path is None:  # older flax
        path = tuple(mdl.scope.path) if mdl.scope is not None else ()
    return tuple(path)


def _intermediate_names(tree, prefix=()) -> list:
    out = []
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if k == "__call__":
                out.append("/".join(prefix))
            else:
                out += _intermediate_names(v, prefix + (k,))
    return out


def _extract(tree, parts):
    node = tree
    for p in parts:
        node = node[p]
    val = node["__call__"]
    return val[-1] if isinstance(val, tuple) else val


def _make_forward(net, layer: Optional[str], train: bool):
    """A jitted ``(variables, x) -> features`` function (stop-gradient)."""
    if layer is None or layer == FRONT_LAYER:
        if not getattr(net, "has_split", False):
            raise ValueError(
                f"teacher {type(net).__name__} has no front/rear split; pass a named "
                "intermediate as layer=...")

        def forward(variables, x):
            return net.apply(variables, x, train, method=net.front)
    else:
        parts = _split_layer(layer)

        def capture(mdl, method_name):
            return method_name == "__call__" and _module_path(mdl) == parts

        def forward(variables, x):
            _, state = net.apply(variables, x, train, capture_intermediates=capture,
                                 mutable=["intermediates"])
            inter = state.get("intermediates", {})
            try:
                return _extract(inter, parts)
            except (KeyError, TypeError):
                raise _LayerNotFound(layer) from None

    @jax.jit
    def run(variables, x):
        return jax.lax.stop_gradient(forward(variables, x)).astype(jnp.float32)

    return run


class _LayerNotFound(Exception):
    pass


def _available_layers(net, variables, x, train) -> list:
    _, state = net.apply(variables, x, train, capture_intermediates=True,
                         mutable=["intermediates"])
    return sorted(n for n in _intermediate_names(state.get("intermediates", {})) if n)


def _batched(run, variables, images, batch_size: int) -> np.ndarray:
    """``run(variables, batch)`` over ``images`` in fixed-size batches (the last one
    zero-padded, so one compilation), float32 on the host."""
    n = images.shape[0]
    bs = int(min(batch_size, n))
    out = []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        real = chunk.shape[0]
        if real < bs:
            chunk = np.concatenate(
                [chunk, np.zeros((bs - real,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(run(variables, jnp.asarray(chunk)))[:real])
    return np.concatenate(out, axis=0)


def _host_inputs(variables, images):
    images = np.asarray(jax.device_get(images), np.float32)
    if images.shape[0] == 0:
        raise ValueError("no images to compute features for")
    return {k: v for k, v in dict(variables).items() if k != "intermediates"}, images


def teacher_features(net, variables, images, *, layer: Optional[str] = None,
                     batch_size: int = 256, train: bool = False) -> np.ndarray:
    """Features of ``images`` (NHWC) under the teacher, in fixed-size jitted batches (the
    last batch is zero-padded, so one compilation), float32 on the host."""
    variables, images = _host_inputs(variables, images)
    run = _make_forward(net, layer, train)
    try:
        return _batched(run, variables, images, batch_size)
    except _LayerNotFound:
        names = _available_layers(net, variables, jnp.asarray(images[:1]), train)
        raise ValueError(
            f"teacher {type(net).__name__} has no intermediate {layer!r}; available: "
            f"{names} (or layer=None for its front output)") from None


def teacher_logits(net, variables, images, *, batch_size: int = 256,
                   train: bool = False) -> np.ndarray:
    """The teacher's logits ``[N, K]`` of ``images`` (its full forward pass, inference mode
    unless ``train``), float32 on the host: the ``kd`` mode's targets."""
    variables, images = _host_inputs(variables, images)

    @jax.jit
    def run(v, x):
        return jax.lax.stop_gradient(net.apply(v, x, train)).astype(jnp.float32)

    return _batched(run, variables, images, batch_size)


def teacher_hash(variables) -> str:
    """Content hash of a teacher snapshot's weights (and BatchNorm statistics): a bank is
    reused only for the weights that made it, whatever the teacher's name and epoch say."""
    v = {k: val for k, val in dict(variables).items() if k in ("params", "batch_stats") and val}
    return fingerprint(*(np.asarray(x) for x in jax.tree.leaves(v)))


def build_bank(teacher_net, teacher_variables, synset: SyntheticSet, *, teacher_name: str,
               snapshot_epoch: Optional[int], layer: Optional[str] = None,
               batch_size: int = 256, train: bool = False) -> FeatureBank:
    """Teacher features and logits of the clean images of ``synset`` (see the module
    docstring).

    ``train=False`` runs normalization layers in inference mode (BatchNorm running stats).
    """
    if not isinstance(synset, SyntheticSet):
        raise ValueError(f"build_bank expects a SyntheticSet, got {type(synset).__name__}")
    feats = teacher_features(teacher_net, teacher_variables, synset.images, layer=layer,
                             batch_size=batch_size, train=train)
    meta = {
        "kind": BANK_KIND,
        "teacher": teacher_name,
        "snapshot_epoch": None if snapshot_epoch is None else int(snapshot_epoch),
        "layer": FRONT_LAYER if layer is None else layer,
        "dataset": synset.dataset,
        "synset_hash": synset.content_hash(),
        "teacher_hash": teacher_hash(teacher_variables),
        "synset_method": synset.method,
        "synset_ipc": synset.ipc,
        "image_shape": list(synset.image_shape),
    }
    logits = teacher_logits(teacher_net, teacher_variables, synset.images,
                            batch_size=batch_size, train=train)
    return FeatureBank(feats, meta, logits)


# ------------------------------------------------------------------------------ storage
def save_bank(path, bank: FeatureBank) -> Path:
    """Writes ``bank`` atomically with orbax."""
    if not isinstance(bank, FeatureBank):
        raise ValueError(f"save_bank expects a FeatureBank, got {type(bank).__name__}")
    meta = {**dict(bank.metadata), "features_hash": fingerprint(bank.features)}
    tree = {"features": bank.features}
    if bank.logits is not None:  # the logits are part of the bank's content hash
        meta["logits_hash"] = fingerprint(bank.logits)
        tree["logits"] = bank.logits
    return checkpoint.save_tree(path, tree, meta)


_STORAGE_KEYS = ("format", "elf_jax_version", "features_hash", "logits_hash")


def load_bank(path, expect_synset: Union[SyntheticSet, str, None] = None,
              expect_teacher: Union[str, Sequence, Mapping, None] = None) -> FeatureBank:
    """Loads a bank written by ``save_bank``.

    ``expect_synset``: the ``SyntheticSet`` (or its ``content_hash()``) the bank must belong
    to; ``expect_teacher``: a teacher name, ``(name, snapshot_epoch)`` or a dict of
    ``teacher``/``snapshot_epoch``/``layer``.  Mismatches are ``ValueError``s naming both.
    Checks run on the metadata before the features are read.
    """
    meta = checkpoint.read_metadata(path)
    if meta.get("kind") != BANK_KIND:
        raise ValueError(f"{path} is not a feature bank (kind={meta.get('kind')!r}); pass a "
                         "directory written by save_bank")
    where = f"feature bank at {path}"
    header = FeatureBank.__new__(FeatureBank)  # metadata-only view for the checks
    object.__setattr__(header, "metadata", meta)
    object.__setattr__(header, "features", np.zeros((meta.get("num_images", 0), 1)))
    object.__setattr__(header, "logits", None)
    if expect_teacher is not None:
        header.check_teacher(expect_teacher, where)
    if expect_synset is not None:
        header.check_synset(expect_synset, where)
    tree, meta = checkpoint.load_tree(path)
    feats = np.asarray(tree["features"])
    if "features_hash" in meta and fingerprint(feats) != meta["features_hash"]:
        raise ValueError(f"{where} is corrupt: its features do not match the content hash "
                         "saved with them; delete it and rebuild it (elf-jax features)")
    if list(feats.shape[1:]) != list(meta.get("feature_shape", feats.shape[1:])):
        raise ValueError(f"{where} is corrupt: features {feats.shape} but metadata says "
                         f"{meta['feature_shape']}; rebuild it")
    logits = tree.get("logits")  # absent in banks saved before banks stored logits
    if logits is not None:
        logits = np.asarray(logits)
        if fingerprint(logits) != meta.get("logits_hash"):
            raise ValueError(f"{where} is corrupt: its teacher logits do not match the content "
                             "hash saved with them; delete it and rebuild it (elf-jax features)")
    return FeatureBank(feats, {k: v for k, v in meta.items() if k not in _STORAGE_KEYS}, logits)
