"""Evaluate a synthetic set on one architecture (``evaluate_synset``) or a pool
(``cross_evaluate``), with the baseline loss and with ELF.

Both follow the reference protocol (:class:`elf_jax.train.TrainProtocol`) and return plain
dicts; ``cross_evaluate``'s result is the input of :mod:`elf_jax.report`::

    {"results": {arch: {mode: {"accs": [...], "mean", "std", "seconds", "total_seconds",
                                "strategy", "lr", "resumed_from", "final_train_loss"}}},
     "summary": {arch: {mode: {"mean", "std", "n"}, "gain": ELF mean - baseline mean,
                        "gain_vs_kd": ELF mean - KD mean (with mode kd), ...}},
     "pool", "modes", "repeats", "protocol", "num_classes", "placement"}

Mode ``kd`` (a knowledge-distillation control, ``elf_jax.losses.kd_loss``) trains on the
teacher's logits that a ``FeatureBank`` holds next to its features: pass banks, not bare
feature arrays, to evaluate it; the summary then also gives ELF's gain over it.

Within ``cross_evaluate`` every (architecture, mode) uses the same base key, so repeat ``r``
of the baseline and of ELF start from the same initial weights (a paired comparison), and
that key is the evaluation stage's (``elf_jax.keys``): never a teacher's or an expert's.
On one device or a mesh (``parallel=``) the runs train in the one engine
(``elf_jax.train.runner``), checkpointed and resumable inside each run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.checkpoint import StepCheckpoints
from elf_jax.metrics import epoch_logger

from elf_jax.losses import KD_MODE, mode_needs_features, mode_needs_logits
from elf_jax.elf.summary import BASELINE_MODE, ELF_MODE, summarize
from elf_jax.parallel.memory import format_bytes
from elf_jax.parallel.placement import Placement
from elf_jax.train.protocol import NO_LEARNED_LR, TrainProtocol  # noqa: F401 (re-exported)
from elf_jax.train.runner import run_evaluation
from elf_jax.train.streaming import is_row_source

__all__ = ["evaluate_synset", "cross_evaluate", "validate_inputs", "describe_split",
           "net_for_mode", "ADAPTER_CHOICES", "LrGrid", "check_lr_grid", "choose_lr"]

ADAPTER_CHOICES = ("auto", "off")  # auto: an adapter where the bank and front shapes differ


_SPLITS = (
    # (canonical name prefix, description) -- docs/METHOD.md "Where each network is cut"; first match wins
    ("ResNet18ImageNet", "front = 7x7/2 stem, maxpool, stages 64/128/256; rear = 512 stage, pool, dense"),
    ("ResNet18BNImageNet", "front = 7x7/2 stem, maxpool, stages 64/128/256; rear = 512 stage, pool, dense"),
    ("ResNet18", "front = stem, stages 64/128/256 and the first 512 block; rear = second 512 block, avg-pool, dense"),
    ("VGG11ImageNet", "front = up to the 4th pool; rear = [512,512,M] and the MLP head"),
    ("VGG11BNImageNet", "front = up to the 4th pool; rear = [512,512,M] and the MLP head"),
    ("VGG11", "front = [64,M,128,M,256,256,M,512]; rear = [512,M,512,512,M], dense"),
    ("ConvNet", "front = all conv blocks; rear = dense"),
    ("ViT", "front = patch embedding and the first blocks; rear = remaining blocks and head"),
)


def describe_split(arch: str) -> str:
    """A one-line description of ``arch``'s ELF split (front | rear)."""
    try:
        from elf_jax.models import canonical_name

        canon = canonical_name(arch)
    except Exception:  # noqa: BLE001
        canon = arch
    for prefix, text in _SPLITS:
        if canon.startswith(prefix):
            return text
    return "its declared front/rear"


def _host(x, what: str) -> np.ndarray:
    """A host copy of ``x``; a streamed split (a test set too big for memory) as it is."""
    if x is None:
        raise ValueError(f"{what} is missing (None)")
    if is_row_source(x):
        return x
    return np.asarray(jax.device_get(x))


def _shape(images) -> tuple:
    """``[N, H, W, C]`` of an array or a streamed split."""
    if is_row_source(images):
        return (len(images),) + tuple(images.image_shape)
    return tuple(images.shape)


def _num_bad(a: np.ndarray) -> int:
    a = a.astype(np.float32) if a.dtype.kind not in "fc" else a
    return int(a.size - np.isfinite(a).sum())


def _check_labels(labels: np.ndarray, n: int, k: int, what: str) -> None:
    if labels.ndim == 1:
        if labels.shape[0] != n:
            raise ValueError(f"{what}: {labels.shape[0]} labels for {n} images")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{what}: hard labels must be integers, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(
                f"{what}: labels must lie in [0, {k - 1}] for {k} classes, found range "
                f"[{int(labels.min())}, {int(labels.max())}]; pass num_classes= or fix the labels")
    elif labels.ndim == 2:
        if labels.shape[1] != k:
            raise ValueError(
                f"{what}: soft labels are over {labels.shape[1]} classes but num_classes is {k}; "
                f"fix the {what}'s labels or num_classes")
        if labels.shape[0] != n:
            raise ValueError(f"{what}: {labels.shape[0]} soft labels for {n} images")
        if _num_bad(labels):
            raise ValueError(f"{what}: soft labels hold {_num_bad(labels)} NaN/Inf value(s)")
    else:
        raise ValueError(f"{what}: labels must be int [N] or float [N, K], got shape {labels.shape}")


def _infer_num_classes(labels: np.ndarray, test_labels: np.ndarray) -> int:
    test_k = None
    if test_labels is not None and test_labels.ndim == 1 and test_labels.size:
        test_k = int(test_labels.max()) + 1
    if labels.ndim == 2:
        # the soft labels' width is a claim about the set, so a mismatch is the set's fault
        if test_k is not None and labels.shape[1] != test_k:
            raise ValueError(
                f"the synthetic set's soft labels are over {labels.shape[1]} classes but the test "
                f"set's labels are 0..{test_k - 1} ({test_k} classes): fix the synthetic set's "
                "labels, or pass num_classes= if the test set lacks some classes")
        return int(labels.shape[1])
    hi = int(labels.max()) if labels.size else 0
    return max(hi + 1, test_k or 0)


def _front_shape(net, image_shape) -> tuple:
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)

    def f(k, x):
        v = net.init(k, x, train=False)
        return net.apply(v, x, train=False, method=net.front)

    return tuple(jax.eval_shape(f, jax.random.PRNGKey(0), x).shape[1:])


def validate_inputs(
    arch: str,
    net,
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    features: Optional[np.ndarray],
    num_classes: int,
    mode: str,
    adapter: str = "auto",
    teacher_logits: Optional[np.ndarray] = None,
) -> None:
    """``ValueError`` for anything that would make the evaluation meaningless. With
    ``adapter="off"`` a bank whose per-image shape differs from the front output is refused;
    with ``"auto"`` (default) an adapter will map the two (:func:`net_for_mode`). Mode
    ``kd`` needs ``teacher_logits`` ``[N, num_classes]`` (a bank's logits)."""
    if adapter not in ADAPTER_CHOICES:
        raise ValueError(f"adapter must be one of {ADAPTER_CHOICES}, got {adapter!r}")
    if images.ndim != 4:
        raise ValueError(f"synthetic images must be NHWC [N, H, W, C], got shape {images.shape}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("the synthetic set is empty (0 images)")
    if _num_bad(images):
        raise ValueError(
            f"the synthetic images hold {_num_bad(images)} NaN/Inf value(s) (shape "
            f"{images.shape}); the distillation diverged: use its last good checkpoint")
    _check_labels(labels, n, num_classes, "synthetic set")
    test_shape = _shape(test_images)
    if len(test_shape) != 4 or test_shape[1:] != images.shape[1:]:
        raise ValueError(
            f"test images have shape {test_shape} but the synthetic images "
            f"{images.shape}: both must be [N, H, W, C] with the same H, W, C")
    if not is_row_source(test_images) and _num_bad(test_images):  # streamed: uint8 pixels
        raise ValueError(f"the test images hold {_num_bad(test_images)} NaN/Inf value(s)")
    tl = test_labels if test_labels.ndim == 1 else test_labels.argmax(-1)
    _check_labels(tl.astype(np.int64), test_shape[0], num_classes, "test set")
    if mode_needs_logits(mode):
        _check_teacher_logits(arch, teacher_logits, n, num_classes)
    if not mode_needs_features(mode):
        return
    if not getattr(net, "has_split", False):
        raise ValueError(
            f"{arch} has no declared ELF front/rear split, so loss mode {mode!r} cannot be used; "
            "evaluate it with mode 'task' or choose an architecture with a split")
    if features is None:
        raise ValueError(
            f"loss mode {mode!r} needs the teacher feature bank for {arch} (features=None); "
            "build one with elf_jax.elf.build_bank")
    front = _front_shape(net, images.shape[1:])
    if features.ndim < 2 or features.shape[0] != n:
        raise ValueError(
            f"feature bank shape {tuple(features.shape)} does not fit the synthetic set: it "
            f"must hold one feature per image ({n}); rebuild the bank for this set")
    if tuple(features.shape[1:]) != front:
        if adapter == "off":
            raise ValueError(
                f"feature bank shape {tuple(features.shape)} does not fit {arch}: its split "
                f"({describe_split(arch)}) gives a front output of {front} per image for "
                f"{tuple(images.shape[1:])} inputs, so the bank must be {(n,) + front}; build "
                f"the bank with a teacher whose front outputs {front} (e.g. a width-{front[-1]} "
                "ConvNet), or let an adapter map the shapes (adapter='auto')")
        if features.ndim != 4:
            raise ValueError(
                f"the adapter maps NHWC grids, but the feature bank is {tuple(features.shape)}: "
                "build the bank from a convolutional (or token-grid) teacher layer")
    if _num_bad(features):
        raise ValueError(f"the feature bank holds {_num_bad(features)} NaN/Inf value(s)")


def _check_teacher_logits(arch: str, logits: Optional[np.ndarray], n: int, k: int) -> None:
    if logits is None:
        raise ValueError(
            f"loss mode {KD_MODE!r} needs the teacher's logits for {arch}, which only a "
            "FeatureBank holds: pass the bank from elf_jax.elf.build_bank (not its feature "
            "array); a bank saved before banks stored logits must be rebuilt")
    if logits.ndim != 2 or logits.shape != (n, k):
        raise ValueError(
            f"the bank's teacher logits for {arch} have shape {tuple(logits.shape)}, but loss "
            f"mode {KD_MODE!r} needs ({n}, {k}): one row per synthetic image over the "
            f"{k} evaluated classes; rebuild the bank with a teacher trained on this dataset")
    if _num_bad(logits):
        raise ValueError(f"the bank's teacher logits hold {_num_bad(logits)} NaN/Inf value(s)")


def net_for_mode(net, mode: str, features, image_shape):
    """The network that trains in ``mode``: ``net`` itself, or ``net`` with a feature adapter
    (``elf_jax.models.adapter``) when the mode uses the teacher feature and the feature's
    per-image shape differs from the front output (inputs already checked by
    :func:`validate_inputs`)."""
    if features is None or not mode_needs_features(mode):
        return net
    front = _front_shape(net, image_shape)
    if tuple(features.shape[1:]) == front:
        return net
    from elf_jax.models.adapter import adapt

    return adapt(net, front, tuple(features.shape[1:]))


def _bank_parts(features, arch: str, net, image_shape) -> tuple:
    """``(features, teacher logits)`` for ``arch`` as host arrays (either None): resolves
    ``features`` (array, FeatureBank, mapping arch -> either, or callable ``(arch,
    front_shape) -> either``); only a FeatureBank carries logits."""
    if features is None:
        return None, None
    if callable(features) and not hasattr(features, "shape") and not isinstance(features, Mapping):
        features = features(arch, _front_shape(net, image_shape))
    elif isinstance(features, Mapping):
        if arch not in features:
            raise ValueError(
                f"no feature bank for {arch}: the features mapping has {sorted(features)}")
        features = features[arch]
    logits = None
    if hasattr(features, "features") and not hasattr(features, "shape"):  # FeatureBank
        features, logits = features.features, getattr(features, "logits", None)
    return (None if features is None else _host(features, "feature bank"),
            None if logits is None else _host(logits, "teacher logits"))


def _resolve_net(arch, num_classes: int, protocol: TrainProtocol, model_overrides):
    if isinstance(arch, str):
        from elf_jax.models import get_model

        ovr = dict(model_overrides or {})
        if protocol.dtype != "float32":
            ovr.setdefault("dtype", protocol.compute_dtype)
        return arch, get_model(arch, num_classes, **ovr)
    return type(arch).__name__, arch


def resolve_pool(pool, modes, images, labels, test_images, test_labels, features, k: int,
                 protocol: TrainProtocol, overrides: Callable[[str], Mapping[str, Any]],
                 adapter: str = "auto") -> list:
    """Builds every pool network and checks every (arch, mode) input BEFORE any training.

    Returns ``[(arch, name, net, features or None, teacher logits or None)]`` in pool order
    (host arrays in)."""
    out = []
    for arch in pool:
        name, net = _resolve_net(arch, k, protocol, overrides(arch))
        feats = logits = None
        if any(mode_needs_features(m) or mode_needs_logits(m) for m in modes):
            feats, logits = _bank_parts(features, name, net, images.shape[1:])
        for mode in modes:
            validate_inputs(name, net, images, labels, test_images, test_labels, feats, k, mode,
                            adapter, logits)
        out.append((arch, name, net, feats, logits))
    return out


class Inputs(NamedTuple):
    """One architecture's evaluation inputs, on the host and validated."""

    name: str
    net: Any
    images: np.ndarray
    labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    features: Optional[np.ndarray]
    logits: Optional[np.ndarray]
    k: int
    learned_lr: Optional[float]


def prepare_inputs(arch, images, labels, test_images, test_labels, features,
                   protocol: TrainProtocol, *, num_classes=None, learned_lr=None,
                   model_overrides=None, adapter: str = "auto") -> Inputs:
    """Host copies of the inputs (a ``SyntheticSet`` as ``images`` with ``labels=None`` also
    gives its class count and learned lr), the resolved network and its bank parts, checked
    by :func:`validate_inputs` for ``protocol.mode``."""
    if hasattr(images, "images") and hasattr(images, "labels") and labels is None:
        syn = images
        images, labels = syn.images, syn.labels
        num_classes = num_classes or getattr(syn, "num_classes", None)
        if learned_lr is None:
            learned_lr = getattr(syn, "lr", None)
    images = _host(images, "synthetic images")
    labels = _host(labels, "synthetic labels")
    test_images = _host(test_images, "test images")
    test_labels = _host(test_labels, "test labels")
    k = int(num_classes) if num_classes else _infer_num_classes(labels, test_labels)
    name, net = _resolve_net(arch, k, protocol, model_overrides)
    features, logits = _bank_parts(features, name, net, images.shape[1:])
    validate_inputs(name, net, images, labels, test_images, test_labels, features, k, protocol.mode,
                    adapter, logits)
    return Inputs(name, net, images, labels, test_images, test_labels, features, logits, k,
                  learned_lr)


def evaluate_synset(
    arch: Union[str, Any],
    images,
    labels,
    test_images,
    test_labels,
    features=None,
    protocol: TrainProtocol = TrainProtocol(),
    repeats: int = 5,
    key=None,
    workdir=None,
    *,
    num_classes: Optional[int] = None,
    learned_lr: Optional[float] = None,
    strategy: str = "auto",
    chunk_epochs: Optional[int] = None,
    checkpoint_every: int = 100,
    model_overrides: Optional[Mapping[str, Any]] = None,
    hparams: Optional[Mapping[str, Any]] = None,
    parallel: Any = None,
    progress: bool = True,
    return_states: bool = False,
    adapter: str = "auto",
) -> dict:
    """Trains ``repeats`` fresh ``arch`` networks on the synthetic set and tests them.

    Args:
      arch: a registry name (``get_model``) or a Flax module.
      images, labels: the synthetic set (NHWC float; int ``[N]`` or soft ``[N, K]``).
      test_images, test_labels: the real test set.
      features: teacher features ``[N, ...front]`` (array or ``FeatureBank``); required for
        the ELF modes; mode ``kd`` needs a ``FeatureBank`` with logits (its teacher logits).
      protocol: :class:`TrainProtocol` (mode, kind, lambdas, epochs, dtype, ...).
      repeats, key: repeats and base key (default ``PRNGKey(0)``).
      workdir: checkpoint/resume directory (None: no checkpoints).
      num_classes: default inferred (soft labels' width, else max label + 1).
      learned_lr: an MTT/TESLA set's learned lr; used when ``protocol.use_learned_lr``.
      strategy: repeat strategy (``auto`` | ``sequential`` | ``vmap`` | ``devices``).
      model_overrides: ``get_model`` overrides (e.g. ``width``).
      hparams: per-repeat ``lr``/``lambda_front``/``lambda_rear`` (e.g. a lambda sweep).
      parallel: placement (None: one device; a ``ParallelConfig``/``Placement``: every step
        data parallel on a ``("runs", "data")`` mesh, repeats over ``runs``).
      adapter: ``"auto"`` (a learned feature adapter where the bank's per-image shape differs
        from the front output; ``elf_jax.models.adapter``) or ``"off"`` (refuse).
    Returns: ``{"arch", "mode", "accs" (list), "mean", "std", "seconds", "strategy",
      "train_loss" [R, E+1], "train_acc", "resumed_from", "lr", "adapter_params"}``.
    """
    i = prepare_inputs(arch, images, labels, test_images, test_labels, features, protocol,
                       num_classes=num_classes, learned_lr=learned_lr,
                       model_overrides=model_overrides, adapter=adapter)
    return _train_and_test(i.name, i.net, protocol, i.images, i.labels, i.test_images,
                           i.test_labels, i.features, i.k, i.learned_lr,
                           teacher_logits=i.logits, repeats=repeats,
                           key=key, workdir=workdir,
                           strategy=strategy, chunk_epochs=chunk_epochs,
                           checkpoint_every=checkpoint_every, hparams=hparams,
                           placement=parallel, progress=progress, return_states=return_states)


def _train_and_test(name, net, protocol, images, labels, test_images, test_labels, features, k,
                    learned_lr, *, hparams=None, teacher_logits=None, curves=None, **kw) -> dict:
    """``run_evaluation`` of inputs already validated (:func:`validate_inputs`); `curves`
    (`elf_jax.metrics.Curves`): each repeat's per-epoch metrics as `<arch>_<mode>_r<k>`."""
    from elf_jax.models.adapter import adapter_params

    net = net_for_mode(net, protocol.mode, features, images.shape[1:])
    labels = labels.astype(np.int32 if labels.ndim == 1 else np.float32)
    lr = protocol.base_lr(learned_lr)
    runs = None
    if curves is not None:
        index = kw.get("repeat_index")
        runs = [f"{name}_{protocol.mode}_r{int(r)}"
                for r in (range(kw.get("repeats", 1)) if index is None else index)]
        kw["on_chunk"] = epoch_logger(curves, runs, len(images),
                                      lambda e: protocol.lr_at(e, lr))
    out = run_evaluation(net, protocol, images, labels, test_images, test_labels,
                         features if mode_needs_features(protocol.mode) else None,
                         teacher_logits=teacher_logits if mode_needs_logits(protocol.mode) else None,
                         hparams={"lr": lr, **dict(hparams or {})},
                         desc=f"{name} {protocol.mode}", run_info={"arch": name}, **kw)
    out.update(arch=name, mode=protocol.mode, accs=[float(a) for a in out["accs"]], lr=lr,
               num_classes=k, adapter_params=adapter_params(net))
    for run, acc in zip(runs or [], out["accs"]):
        curves.write(run, protocol.num_epochs - 1, {"test/acc": acc})
    if curves is not None:
        curves.flush()
    return out


# ------------------------------------------------------------------ repeats that grow
def _stored_repeats(run_dir: Path) -> Optional[int]:
    """The repeat count of the evaluation checkpointed in `run_dir` (None: none there)."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    ck = StepCheckpoints(run_dir / "checkpoints")
    latest = ck.latest_step()
    return None if latest is None else int(ck.read_meta(latest).get("repeats", 0)) or None


def repeat_parts(run_dir: Path, repeats: int) -> list[tuple[int, int, Path]]:
    """``[(first repeat, count, directory)]``: the runs that give repeats ``0..repeats-1`` of
    one (architecture, mode) in `run_dir`. Repeat r's weights and data order depend on r
    alone (:func:`elf_jax.train.runner.init_states`), so a workdir grows with the study: the
    run already there (any count) is kept, and the repeats beyond it train as a new part in
    ``repeats_<first>-<end>/`` (asking for fewer repeats reads the first ones back)."""
    stored = _stored_repeats(run_dir)
    if stored is None:
        return [(0, int(repeats), run_dir)]
    parts = [(0, stored, run_dir)]
    extra = sorted((int(a), int(b), d) for d in run_dir.glob("repeats_*-*") if d.is_dir()
                   for a, b in [d.name[len("repeats_"):].split("-")])
    for a, b, d in extra:
        if a == parts[-1][0] + parts[-1][1]:  # contiguous: an earlier addition
            parts.append((a, b - a, d))
    end = parts[-1][0] + parts[-1][1]
    if repeats > end:
        parts.append((end, int(repeats) - end, run_dir / f"repeats_{end}-{int(repeats)}"))
    return [p for p in parts if p[0] < repeats]


@dataclasses.dataclass(frozen=True)
class LrGrid:
    """An evaluation lr chosen per (architecture, mode) from ``lrs`` on held-out images
    (``images``/``labels``: the validation split, or the test split for the reference's way,
    named by ``split``): each lr trains ``repeats`` networks, all G x R runs in one program."""

    lrs: tuple
    images: Any
    labels: Any
    repeats: int = 1
    split: str = "validation"


def check_grid(name: str, values, holds: Callable[[float], bool], allowed: str,
               example: str) -> tuple[float, ...]:
    """One grid axis (a sweep's lambdas, an lr grid) as floats; ``ValueError`` naming
    ``name`` unless a non-empty sequence of distinct finite numbers that each ``holds``
    (``allowed`` says which, ``example`` shows one)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}={values!r}: give a non-empty tuple of numbers {allowed}, "
                         f"e.g. {example}")
    out = []
    for v in values:
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)
                or not holds(v)):
            raise ValueError(f"{name}={tuple(values)!r}: {v!r} is not a number {allowed}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={tuple(values)!r}: a value is repeated")
    return tuple(out)


def check_lr_grid(values) -> tuple[float, ...]:
    """An lr grid as floats: distinct numbers > 0 (`check_grid`)."""
    return check_grid("eval.lr_grid", values, lambda v: v > 0, "> 0", "(0.003, 0.01, 0.03)")


def choose_lr(name, net, protocol, images, labels, features, k, grid: LrGrid, *,
              teacher_logits=None, **kw) -> dict:
    """Trains every lr of ``grid`` ``grid.repeats`` times (repeat r of each lr from the same
    weights) as one program and tests them on ``grid.images``. Returns ``{"grid", "accs"
    [G][R], "mean" [G], "chosen" (the lr of the best mean; the first of equal ones), "on",
    "repeats", "seconds", "steps"}``."""
    lrs, r = check_lr_grid(grid.lrs), int(grid.repeats)
    out = _train_and_test(
        name, net, dataclasses.replace(protocol, use_learned_lr=False), images, labels,
        _host(grid.images, f"{grid.split} images"), _host(grid.labels, f"{grid.split} labels"),
        features, k, None, teacher_logits=teacher_logits,
        hparams={"lr": np.repeat(np.asarray(lrs, np.float32), r)}, repeats=len(lrs) * r,
        repeat_index=np.tile(np.arange(r), len(lrs)), **kw)
    accs = np.asarray(out["accs"], np.float64).reshape(len(lrs), r)
    mean = accs.mean(1)
    return {"grid": list(lrs), "accs": accs.tolist(), "mean": mean.tolist(),
            "chosen": lrs[int(np.argmax(mean))], "on": grid.split, "repeats": r,
            "seconds": out["seconds"],
            "steps": (protocol.epochs + 1) * protocol.steps_per_epoch(len(images)) * len(lrs) * r}


def _train_in_parts(name, net, protocol, *args, repeats: int, workdir, **kw) -> dict:
    """`_train_and_test` of repeats ``0..repeats-1`` over the parts of :func:`repeat_parts`
    (one part, the plain run, without a workdir or on a fresh one); the parts' per-repeat
    results are joined and cut to `repeats`."""
    if workdir is None:
        return _train_and_test(name, net, protocol, *args, repeats=repeats, workdir=None, **kw)
    parts = repeat_parts(Path(workdir), repeats)
    outs = [_train_and_test(name, net, protocol, *args, repeats=count, workdir=d,
                            repeat_index=None if first == 0 else range(first, first + count), **kw)
            for first, count, d in parts]
    if len(outs) == 1 and len(outs[0]["accs"]) == repeats:
        return outs[0]
    out = dict(outs[0])
    out["accs"] = [a for o in outs for a in o["accs"]][:repeats]
    out["train_loss"] = np.concatenate([np.asarray(o["train_loss"]) for o in outs])[:repeats]
    out["mean"], out["std"] = float(np.mean(out["accs"])), float(np.std(out["accs"]))
    out["seconds"] = sum(o["seconds"] for o in outs)
    totals = [o.get("total_seconds") for o in outs]
    out["total_seconds"] = None if None in totals else sum(totals)
    out["repeat_parts"] = [[first, count] for first, count, _ in parts]
    return out


def cross_evaluate(
    pool: Sequence[str],
    images,
    labels,
    test_images,
    test_labels,
    features=None,
    *,
    modes: Sequence[str] = (BASELINE_MODE, ELF_MODE),
    protocol: TrainProtocol = TrainProtocol(),
    repeats: int = 5,
    key=None,
    workdir=None,
    num_classes: Optional[int] = None,
    learned_lr: Optional[float] = None,
    strategy: str = "auto",
    chunk_epochs: Optional[int] = None,
    checkpoint_every: int = 100,
    model_overrides: Union[None, Mapping[str, Any], Callable[[str], Mapping[str, Any]]] = None,
    parallel: Any = None,
    progress: bool = True,
    on_result: Optional[Callable[[str, str, dict], None]] = None,
    log: Callable[[str], None] = print,
    adapter: str = "auto",
    curves=None,
    lr_grid: Optional[LrGrid] = None,
) -> dict:
    """Every architecture of ``pool`` x every loss mode of ``modes``.

    ``features``: one array/``FeatureBank`` for all, a mapping ``arch -> features``, or a
    callable ``(arch, front_shape) -> features`` (e.g. choosing the teacher by the front's
    channel count). ``model_overrides``: a dict for all or a callable ``arch -> dict``.
    ``adapter``: as in :func:`evaluate_synset`.
    Inputs are validated for every (arch, mode) BEFORE any training starts; on a mesh
    (``parallel``) the memory estimate of each is printed with ``log`` and checked too.
    ``on_result(arch, mode, result)`` is called after each run (for incremental reports).
    ``curves``: an :class:`elf_jax.metrics.Curves` for every run's per-epoch metrics.
    ``lr_grid``: the lr of each (arch, mode) is chosen from it first (:func:`choose_lr`; the
    baseline and ELF each get their best), recorded in its entry's ``lr_tuning``; the grid's
    checkpoints live in ``workdir/lr_grid/<arch>/<mode>``.
    Returns the dict described in the module docstring.
    """
    pool = list(pool)
    modes = list(modes)
    if not pool:
        raise ValueError("the architecture pool is empty")
    key = jax.random.PRNGKey(0) if key is None else key
    images_h = _host(images, "synthetic images")
    labels_h = _host(labels, "synthetic labels")
    test_labels_h = _host(test_labels, "test labels")
    k = int(num_classes) if num_classes else _infer_num_classes(labels_h, test_labels_h)

    def overrides(arch):
        return model_overrides(arch) if callable(model_overrides) else (model_overrides or {})

    # validate everything first: a bad bank for the 6th architecture should not cost 5 runs
    placement = Placement.of(parallel)
    test_images_h = _host(test_images, "test images")
    resolved = resolve_pool(pool, modes, images_h, labels_h, test_images_h, test_labels_h,
                            features, k, protocol, overrides, adapter)
    if placement.mesh is not None:
        log_memory([e for arch, name, net, feats, _ in resolved
                    for e in _check_memory(name, net, feats, modes, protocol, placement,
                                           images_h, labels_h, k, repeats)], placement, log)

    results: dict = {}
    for arch, name, net, feats, logits in resolved:
        results[arch] = {}
        for mode in modes:
            p, lr_from, tuning = dataclasses.replace(protocol, mode=mode), learned_lr, None
            run_kw = dict(key=key, strategy=strategy, chunk_epochs=chunk_epochs,
                          checkpoint_every=checkpoint_every, placement=placement,
                          progress=progress)
            if lr_grid is not None:
                tuning = choose_lr(
                    name, net, p, images_h, labels_h, feats, k, lr_grid, teacher_logits=logits,
                    workdir=None if workdir is None else Path(workdir) / "lr_grid" / arch / mode,
                    **run_kw)
                p, lr_from = dataclasses.replace(p, lr=tuning["chosen"], use_learned_lr=False), None
            r = _train_in_parts(
                name, net, p, images_h, labels_h, test_images_h, test_labels_h, feats, k,
                lr_from, teacher_logits=logits, repeats=repeats,
                workdir=None if workdir is None else Path(workdir) / arch / mode, curves=curves,
                **run_kw)
            entry = {kk: r[kk] for kk in ("accs", "mean", "std", "seconds", "total_seconds",
                                          "strategy", "lr", "resumed_from", "adapter_params")}
            if tuning is not None:
                entry["lr_tuning"] = tuning
            entry["final_train_loss"] = np.asarray(r["train_loss"])[:, -1].tolist()
            # the cost of the result: SGD steps over all repeats (epochs 0..E, as trained)
            # and the kind of device they ran on
            entry["steps"] = ((protocol.epochs + 1) * protocol.steps_per_epoch(len(images_h))
                              * len(entry["accs"]))
            entry["device"] = jax.devices()[0].device_kind
            if "repeat_parts" in r:  # grown or cut: which runs the repeats came from
                entry["repeat_parts"] = r["repeat_parts"]
            results[arch][mode] = entry
            if on_result is not None:
                on_result(arch, mode, entry)
    return {
        "results": results,
        "summary": summarize(results),
        "pool": pool,
        "modes": modes,
        "repeats": int(repeats),
        "num_classes": k,
        "protocol": {**protocol.to_dict(), **({"kd_temperature": protocol.kd_temperature}
                                               if KD_MODE in modes else {})},
        "placement": placement.describe(),
    }


def log_memory(estimates, placement, log) -> None:
    """The memory estimates of a run's trainings in one log entry: a line with every
    (network, mode) total, then the largest one's breakdown (once, not per training)."""
    if not estimates:
        return
    totals = ", ".join(f"{name} {mode} {format_bytes(est.total)}" for name, mode, est in estimates)
    largest = max(estimates, key=lambda e: e[2].total)
    log(f"[memory] per device, {placement.describe()}: {totals}; the largest ({largest[0]} "
        f"{largest[1]}) in full:\n{largest[2]}")


def _check_memory(name, net, feats, modes, protocol, placement, images, labels, k,
                  repeats) -> list:
    """``[(name, mode, estimate)]``: the per-device memory estimate of every mode; raises
    (with the estimate) if one will not fit."""
    from elf_jax.parallel import memory

    out = []
    for mode in modes:
        f = feats if mode_needs_features(mode) else None
        est = memory.estimate_for(
            net_for_mode(net, mode, f, images.shape[1:]), dataclasses.replace(protocol, mode=mode), n_images=len(images),
            image_shape=images.shape[1:], num_classes=k,
            feature_shape=None if f is None else f.shape[1:], config=placement.config,
            repeats=repeats, n_data=placement.n_data, n_runs=placement.n_runs,
            soft_labels=labels.ndim == 2)
        memory.check_fits(est)  # ValueError (with the estimate) if too big
        out.append((name, mode, est))
    return out
