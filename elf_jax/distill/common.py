"""Shared machinery of the distillation methods: state, init, siamese DSA, evaluation of
the current set, the checkpointed loop with best-set keeping, and the one driver.

Every method is split into

* a pure, jitted *step* ``(state, key, real data) -> (state, metrics)`` that updates the
  synthetic set once (one outer iteration of the reference), and
* a hook ``setup(method, settings, prelude) -> Plan`` in its module that builds the step
  and its ``advance`` function; :func:`distill` (the driver) does the rest: data, initial
  set, evaluation settings, keys, then :func:`run_loop`.

:func:`run_loop` owns everything around the step: a tqdm bar, a NaN/Inf stop (the synthetic
images or the learned lr; nothing is saved then, so the last good checkpoint stays), a
checkpoint every ``checkpoint_every`` iterations (``StepCheckpoints``; state, best set and
evaluation history), resume after a kill (iteration ``i`` uses ``fold_in(key, i)``, so a
resumed run ends bit-identical to an uninterrupted one), and the periodic evaluation of the
current set with the train runner, keeping the best set by test accuracy as the reference
(``images_best.pt``) does.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elf_jax.checkpoint import StepCheckpoints, _normalize_meta, check_expect, what_differs
from elf_jax.augment import DEFAULT_STRATEGY
from elf_jax.data.sampler import take_rows
from elf_jax.data.stream import images_of, is_streamed, split_hash
from elf_jax.hashing import fingerprint
from elf_jax.distill.settings import METHOD_SETTINGS, Settings
from elf_jax.keys import raw_key, stage_key, typed_key
from elf_jax.synset import SyntheticSet, dataset_normalization, load_synset, save_synset

# v2: the run's key comes from the "distill" stage tag (elf_jax.keys)
DISTILL_FORMAT = "elf_jax.distill/2"

__all__ = ["DistillState", "DistillationDiverged", "EvalSettings", "as_dataset", "check_ipc",
           "init_synthetic", "make_optimizer", "init_state", "apply_grads", "siamese_dsa",
           "iteration_key", "evaluate_set", "run_loop", "distill", "Prelude", "Plan"]


class DistillationDiverged(ValueError):
    """The synthetic images or the learned lr became NaN/Inf."""


class DistillState(NamedTuple):
    """What a distillation step carries.

    syn: ``{"images": [N,H,W,C]}`` plus ``"lr"`` (scalar, MTT/TESLA) and ``"labels"``
      (soft-label logits ``[N, K]``, TESLA with label learning) where the method learns them.
    opt_state: optax state of the SGD(momentum) on ``syn``.
    key: raw uint32 key data (the run's base key; iteration i uses ``fold_in(key, i)``).
    iteration: int32, updates done so far.
    """

    syn: Any
    opt_state: Any
    key: jax.Array
    iteration: jax.Array


# ----------------------------------------------------------------------------- data
def as_dataset(dataset, split: str = "train", **load_kw):
    """An ``ArrayDataset`` or a ``StreamedSplit`` (returned as is) or a dataset name
    (loaded)."""
    if isinstance(dataset, str):
        from elf_jax.data import load

        return load(dataset, split, **load_kw)
    if is_streamed(dataset):
        return dataset
    for attr in ("images", "labels"):
        if not hasattr(dataset, attr):
            raise ValueError(f"dataset must be an ArrayDataset, a StreamedSplit or a dataset "
                             f"name, got "
                             f"{type(dataset).__name__} without .{attr}")
    return dataset


def num_classes_of(dataset) -> int:
    labels = np.asarray(dataset.labels)
    return int(getattr(dataset, "num_classes", None) or int(labels.max()) + 1)


def check_ipc(dataset, ipc: int) -> np.ndarray:
    """Per-class counts; ``ValueError`` if a class has fewer than ``ipc`` real images."""
    if int(ipc) < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    k = num_classes_of(dataset)
    counts = np.bincount(np.asarray(dataset.labels), minlength=k)
    small = [c for c in range(k) if counts[c] < ipc]
    if small:
        c = small[0]
        raise ValueError(
            f"ipc={ipc} but class {c} of dataset {getattr(dataset, 'name', '?')!r} has only "
            f"{counts[c]} real images ({len(small)} class(es) too small; smallest "
            f"{counts.min()}); lower ipc to at most {counts.min()}")
    return counts


def init_synthetic(key, dataset, ipc: int, init: str = "real"):
    """``(images [K*ipc,H,W,C], labels [K*ipc])``, class-ordered (0,0,..,1,1,..), from
    random real images of each class (``init="real"``, the reference default; of a
    ``StreamedSplit`` only those rows are read) or standard normal noise (``init="noise"``)."""
    counts = check_ipc(dataset, ipc)
    k = len(counts)
    labels = np.repeat(np.arange(k, dtype=np.int32), ipc)
    if init == "noise":
        shape = (k * ipc,) + tuple(image_shape_of(dataset))
        out = np.asarray(jax.random.normal(key, shape, jnp.float32))
    elif init == "real":
        all_labels = np.asarray(dataset.labels)
        keys = jax.random.split(key, k)
        picks = []
        for c in range(k):
            idx = np.flatnonzero(all_labels == c)
            perm = np.asarray(jax.random.permutation(keys[c], idx.size))
            picks.append(idx[perm[:ipc]])
        out = take_rows(dataset, np.concatenate(picks))
    else:
        raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
    return np.ascontiguousarray(out, np.float32), labels


def image_shape_of(dataset) -> tuple:
    """``(H, W, C)`` of a split's images (without touching a streamed split's images)."""
    shape = getattr(dataset, "image_shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(dataset.images)[1:])


def real_batch_size(dataset, wanted: int) -> int:
    """The reference takes ``permutation(class)[:n]``, i.e. all images of a class smaller
    than ``n``; with static shapes every class gives ``min(n, smallest class)``."""
    counts = np.bincount(np.asarray(dataset.labels), minlength=num_classes_of(dataset))
    return int(max(1, min(int(wanted), int(counts.min()))))


def siamese_dsa(key, real, syn, strategy: str):
    """The same DSA draw (group and parameters, batch mode) on a real and a synthetic batch
    of one class (the reference's seeded ``DiffAugment`` pair)."""
    if strategy in (None, "", "none", "None"):
        return real, syn
    from elf_jax.augment import DSAParams, dsa

    # The reference seeds DiffAugment for its siamese calls, which turns on batchmode: all
    # samples share one draw, so a real batch of 256 and a synthetic batch of ipc images get
    # exactly the same transformation.
    p = DSAParams(batchmode=True)
    return dsa(key, real, strategy, "S", p), dsa(key, syn, strategy, "S", p)


def per_class_siamese(key, real, syn, strategy: str):
    """Siamese DSA class by class: ``real [K,B,...]``, ``syn [K,ipc,...]``, one key per class.
    ``lax.map`` (not ``vmap``) so each class runs only its drawn group."""
    if strategy in (None, "", "none", "None"):
        return real, syn
    keys = jax.random.split(key, real.shape[0])
    return jax.lax.map(lambda a: siamese_dsa(a[0], a[1], a[2], strategy), (keys, real, syn))


# ----------------------------------------------------------------------------- state
def make_optimizer(lrs: Mapping[str, float], momentum: float = 0.5) -> optax.GradientTransformation:
    """SGD with momentum (PyTorch semantics: ``buf = m*buf + g; p -= lr*buf``) with one lr
    per entry of the synthetic-parameter dict (``images``, ``lr``, ``labels``)."""
    transforms = {k: optax.sgd(float(v), momentum=momentum or None) for k, v in lrs.items()}
    return optax.multi_transform(transforms, lambda p: {k: k for k in p})


def init_state(syn: Mapping[str, Any], optimizer, key) -> DistillState:
    syn = {k: jnp.asarray(v, jnp.float32) for k, v in syn.items()}
    return DistillState(syn=syn, opt_state=optimizer.init(syn), key=raw_key(key),
                        iteration=jnp.zeros((), jnp.int32))


def iteration_key(state: DistillState):
    """The typed key of the coming iteration: ``fold_in(base key, iteration)``."""
    return jax.random.fold_in(typed_key(state.key), state.iteration)


def apply_grads(state: DistillState, grads, optimizer) -> DistillState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.syn)
    syn = optax.apply_updates(state.syn, updates)
    return state._replace(syn=syn, opt_state=opt_state, iteration=state.iteration + 1)


# ----------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Periodic evaluation of the current set (a short run of the train runner).

    every: evaluate at iterations ``every, 2*every, ...`` and at the last one (0 = never;
      then the final set is returned). at_start: also evaluate the initial set (iteration
      0; like the reference it never becomes the "best" set unless nothing else is
      evaluated). epochs/repeats/batch_size/lr/dsa_strategy: the evaluation protocol
      (reference: 1000 epochs, lr 0.01, DSA on; shorter here by default to fit a CPU).
    arch/model_kwargs: the evaluation net (default: the distillation net).
    use_learned_lr: train with the set's learned lr (MTT/TESLA) instead of ``lr``.
    """

    every: int = 0
    at_start: bool = False
    epochs: int = 300
    repeats: int = 1
    batch_size: int = 256
    lr: float = 0.01
    dsa_strategy: str = DEFAULT_STRATEGY
    arch: Optional[str] = None
    model_kwargs: Optional[tuple] = None  # tuple of (key, value) pairs (hashable)
    use_learned_lr: bool = False

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, it: int, iterations: int) -> bool:
        if not self.enabled:
            return False
        if it == 0:
            return self.at_start
        return it % self.every == 0 or it == iterations


def eval_protocol(settings: EvalSettings, learned_lr) -> "TrainProtocol":
    """The protocol a periodic evaluation of a set trains with; its base lr
    (`TrainProtocol.base_lr`) is the set's learned lr (MTT/TESLA) where
    ``settings.use_learned_lr`` and the set has one, else ``settings.lr`` (a DM set under
    the reference preset's `eval_learned_lr` has none)."""
    from elf_jax.train import TrainProtocol

    return TrainProtocol(lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size,
                         use_learned_lr=settings.use_learned_lr and learned_lr is not None,
                         dsa_strategy=settings.dsa_strategy or "none", mode="task")


def evaluate_set(images, labels, lr, test, settings: EvalSettings, arch: str, model_kwargs,
                 key) -> tuple:
    """``(mean, std)`` test accuracy of ConvNet-style evaluation training on the set."""
    from elf_jax.elf.evaluate import evaluate_synset
    from elf_jax.models import get_model

    labels = np.asarray(labels)
    k = labels.shape[1] if labels.ndim == 2 else num_classes_of(test)
    kw = dict(settings.model_kwargs) if settings.model_kwargs is not None else dict(model_kwargs)
    net = get_model(settings.arch or arch, k, **kw)
    # the one evaluation of a set on one architecture, as the pool's and the CLI's
    out = evaluate_synset(net, np.asarray(images), labels, images_of(test),
                          np.asarray(test.labels), protocol=eval_protocol(settings, lr),
                          repeats=settings.repeats, key=key, num_classes=k, learned_lr=lr,
                          strategy="sequential", progress=False)
    return float(out["mean"]), float(out["std"])


# ----------------------------------------------------------------------------- driver
def _tqdm():
    try:
        from tqdm.auto import tqdm

        return tqdm
    except ImportError:  # pragma: no cover
        return None


def run_loop(
    *,
    method: str,
    state: DistillState,
    advance: Callable[[DistillState], tuple],
    iterations: int,
    to_synset: Callable[[Mapping[str, Any], dict], SyntheticSet],
    run_meta: Mapping[str, Any],
    workdir=None,
    checkpoint_every: int = 100,
    max_to_keep: int = 2,
    eval_settings: EvalSettings = EvalSettings(),
    test=None,
    arch: str = "ConvNet",
    model_kwargs: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, dict], None]] = None,
    log_every: int = 10,
) -> SyntheticSet:
    """The driver shared by all methods (see the module docstring).

    advance(state) -> (state, metrics): one jitted distillation iteration; metrics must hold
      ``loss`` and ``finite`` (all synthetic parameters finite after the update).
    to_synset(syn, extra_meta) -> SyntheticSet of the given synthetic parameters.
    run_meta: JSON settings that must match when ``workdir`` is resumed (method, dataset,
      ipc, arch, hyperparameters; ``iterations`` may grow, so it is left out of the check).
    callback(iteration, metrics): after every iteration (tests use it to simulate a kill).
    Returns the best set by evaluation accuracy (evaluation enabled) or the final set; both
    are also written to ``workdir/synset_best`` and ``workdir/synset_final``.
    """
    iterations = int(iterations)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    model_kwargs = dict(model_kwargs or {})
    run_meta = {"kind": DISTILL_FORMAT, "method": method, **dict(run_meta)}
    run_meta["settings_hash"] = fingerprint({k: v for k, v in run_meta.items()
                                            if k != "settings_hash"})[:16]
    checkpoint_every = max(1, int(checkpoint_every or iterations or 1))
    if eval_settings.enabled and test is None:
        raise ValueError("evaluation is on (eval_every > 0) but no test set was given")
    best = {k: jnp.asarray(v) for k, v in state.syn.items()}
    best = {"syn": best, "acc": jnp.asarray(-1.0, jnp.float32),
            "iteration": jnp.asarray(-1, jnp.int32)}
    history: list = []

    ck = None
    if workdir is not None:
        workdir = Path(workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        ck = StepCheckpoints(workdir / "checkpoints", max_to_keep=max_to_keep)
        latest = ck.latest_step()
        if latest is not None:
            meta = ck.read_meta(latest)
            if meta.get("kind") != DISTILL_FORMAT:
                raise ValueError(
                    f"distillation checkpoints in {ck.directory} are in format "
                    f"{meta.get('kind')!r}, but this version writes {DISTILL_FORMAT!r} (the "
                    "random streams changed, so they cannot be continued exactly); delete that "
                    "directory or use another workdir to start over")
            asked = {k: v for k, v in _normalize_meta(run_meta).items() if k != "settings_hash"}
            saved = {k: meta.get(k, "(absent)") for k in asked}
            if meta.get("settings_hash") != run_meta["settings_hash"] and saved != asked:
                raise ValueError(
                    f"distillation checkpoints in {ck.directory} are another run's (saved vs "
                    f"asked): {what_differs(saved, asked)}; use another workdir, or start over "
                    "with `elf-jax distill --overwrite=synset` (deletes that run)")
            check_expect(meta, {k: run_meta[k] for k in ("kind", "method", "settings_hash")},
                         where=f"distillation checkpoints in {ck.directory} (another run's "
                               "settings; use another workdir or delete it to start over)")
            tree, meta = ck.restore(latest, like={"state": state._asdict(), "best": best})
            state = DistillState(**tree["state"])
            best = tree["best"]
            history = list(meta.get("history", []))

    def save(it):
        if ck is None or it in ck.all_steps():
            return
        ck.save(it, {"state": state._asdict(), "best": best},
                {**run_meta, "iteration": it, "history": history,
                 "best_acc": float(best["acc"]), "best_iteration": int(best["iteration"])})

    tq = _tqdm() if progress else None
    it = int(state.iteration)
    bar = tq(total=iterations, initial=min(it, iterations), desc=f"distill {method}",
             unit="it", leave=False, dynamic_ncols=True) if tq and it < iterations else None
    tic = time.perf_counter()
    try:
        while True:
            if eval_settings.due(it, iterations) and not any(h["iteration"] == it
                                                             for h in history):
                syn_host = jax.device_get(state.syn)
                s = to_synset(syn_host, {"iteration": it})
                ekey = jax.random.fold_in(typed_key(state.key), 1_000_003 + it)
                mean, std = evaluate_set(s.images, s.labels, s.lr, test, eval_settings, arch,
                                         model_kwargs, ekey)
                history.append({"iteration": it, "acc": mean, "std": std,
                                "eval_lr": eval_protocol(eval_settings, s.lr).base_lr(s.lr)})
                if it > 0 and mean > float(best["acc"]):
                    best = {"syn": {k: jnp.asarray(v) for k, v in syn_host.items()},
                            "acc": jnp.asarray(mean, jnp.float32),
                            "iteration": jnp.asarray(it, jnp.int32)}
                if bar is not None:
                    split = getattr(test, "role", None) or "eval"
                    bar.write(f"[{method}] iteration {it}: {split} acc {mean:.4f} +- {std:.4f} "
                              f"(best {float(best['acc']):.4f} @ {int(best['iteration'])})")
            if it % checkpoint_every == 0 or it == iterations:
                save(it)
            if it >= iterations:
                break
            state, metrics = advance(state)
            it += 1
            loss = float(metrics["loss"])
            if not bool(metrics["finite"]) or not np.isfinite(loss):
                last = ck.latest_step() if ck is not None else None
                where = (f"the last good checkpoint (iteration {last}) is kept in {ck.directory}"
                         if last is not None else "nothing was saved (no workdir)")
                what = ", ".join(k for k in state.syn
                                 if not np.isfinite(np.asarray(state.syn[k])).all()) or "loss"
                raise DistillationDiverged(
                    f"{method}: the synthetic {what} became NaN/Inf at iteration {it} (loss "
                    f"{loss}); stopping. {where}. Lower lr_img (or lr_lr for the learned lr).")
            if bar is not None:
                bar.update(1)
                if it % max(1, log_every) == 0 or it == iterations:
                    bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()
                                     if k != "finite"})
            if callback is not None:
                callback(it, metrics)
    finally:
        if bar is not None:
            bar.close()
        if ck is not None:
            ck.close()

    seconds = time.perf_counter() - tic
    final = to_synset(jax.device_get(state.syn), {"iteration": it, "history": history})
    if eval_settings.enabled and int(best["iteration"]) >= 0:
        result = to_synset(jax.device_get(best["syn"]),
                           {"iteration": int(best["iteration"]), "best_acc": float(best["acc"]),
                            "history": history})
    else:
        result = final
    if workdir is not None:
        save_synset(workdir / "synset_final", final)
        save_synset(workdir / "synset_best", result)
    result = result.replace(metadata={"seconds_this_call": seconds})
    return result


def load_result(workdir, which: str = "best") -> SyntheticSet:
    """The set a finished run wrote (``best`` or ``final``)."""
    return load_synset(Path(workdir) / f"synset_{which}")


def apply_front(net, variables, x):
    """The embedding ``front(x)`` in training mode (BatchNorm: batch statistics)."""
    if not getattr(net, "has_split", False):
        raise ValueError(f"{type(net).__name__} has no front/rear split, so it has no "
                         "embedding; distill with a ConvNet/VGG/ResNet family network")
    if "batch_stats" in variables:
        out, _ = net.apply(variables, x, train=True, method=net.front, mutable=["batch_stats"])
        return out
    return net.apply(variables, x, train=True, method=net.front)


# ----------------------------------------------------------------------------- the driver
class Prelude(NamedTuple):
    """What :func:`distill` prepared for a method's ``setup`` hook."""

    train: Any  # the ArrayDataset or StreamedSplit
    net: Any  # get_model(settings.arch, num_classes, **settings.model_kwargs)
    images: np.ndarray  # the initial set [K*ipc, H, W, C], class-ordered
    labels: np.ndarray  # its hard labels [K*ipc]
    num_classes: int
    workdir: Any
    progress: bool


class Plan(NamedTuple):
    """What a method's ``setup(method, settings, prelude)`` returns."""

    syn: Mapping[str, Any]  # the initial synthetic parameters {"images"[, "lr", "labels"]}
    optimizer: Any  # the step's optax optimizer on them
    advance: Callable  # advance(state) -> (state, metrics): one iteration (see run_loop)
    meta: Mapping[str, Any]  # the method's settings for the resume check
    labels: Optional[np.ndarray] = None  # fixed soft labels (probabilities); None: hard
    extra: Mapping[str, Any] = {}  # more metadata of the set


def distill(method: str, dataset, settings: Optional[Settings] = None, *, workdir=None,
            key=None, test_dataset=None, evaluation: Optional[EvalSettings] = None,
            progress: bool = True, callback=None, **fields) -> SyntheticSet:
    """Distills ``dataset`` (an ``ArrayDataset``, a ``StreamedSplit`` or a dataset name)
    with ``method``.

    settings: the method's dataclass (:data:`elf_jax.distill.settings.METHOD_SETTINGS`;
    default: its defaults) with ``fields`` replaced (``ipc=1, lr_img=0.5``). key: the run's
    key or seed (default 0), tagged with the "distill" stage and split into the initial set's
    and the iterations'.
    evaluation: the periodic evaluation's protocol (default: the settings' ``eval_epochs``
    and ``eval_repeats``; ``eval_every``, when set, replaces its ``every``); test_dataset:
    the split the evaluations choose the best set on (default: the test split of the
    dataset's name; `distill_from_config` gives a held-out validation split; its ``split``
    name is recorded in the set's ``best_chosen_on``). workdir, progress,
    callback: see :func:`run_loop`. The method's module adds ``setup(method, settings,
    Prelude) -> Plan``. Returns the best set (evaluation on) or the final one.
    """
    import importlib

    from elf_jax.distill import METHODS, method_name
    from elf_jax.models import get_model

    method = method_name(method)
    cls = METHOD_SETTINGS[method]
    s = dataclasses.replace(settings or cls(), **fields)
    if not isinstance(s, cls):
        raise TypeError(f"{method} takes {cls.__name__}, got {type(s).__name__}")
    # DC distils without augmentation and is evaluated without it too
    ev = evaluation or EvalSettings(epochs=int(s.eval_epochs), repeats=int(s.eval_repeats),
                                    dsa_strategy="none" if method == "dc" else DEFAULT_STRATEGY,
                                    use_learned_lr=bool(getattr(s, "eval_learned_lr", False)))
    if s.eval_every:
        ev = dataclasses.replace(ev, every=int(s.eval_every))
    train = as_dataset(dataset, "train")
    k_init, k_run = jax.random.split(stage_key(0 if key is None else key, "distill"))
    images0, labels0 = init_synthetic(k_init, train, s.ipc, s.init)
    test = None
    if ev.enabled:
        name = dataset if isinstance(dataset, str) else getattr(dataset, "name", None)
        if test_dataset is None and name is None:
            raise ValueError("eval_every > 0 needs test_dataset (the dataset has no name to "
                             "load its test split from)")
        test = as_dataset(name if test_dataset is None else test_dataset, "test")
    k, mk = num_classes_of(train), dict(s.model_kwargs)
    prelude = Prelude(train, get_model(s.arch, k, **mk), images0, labels0, k, workdir, progress)
    plan = importlib.import_module(METHODS[method]).setup(method, s, prelude)
    base = {"dataset": getattr(train, "name", None), "ipc": int(s.ipc), "arch": s.arch,
            "model_kwargs": mk}
    run_meta = {**base, "lr_img": s.lr_img, "momentum": s.momentum, "init": s.init,
                "dsa_strategy": s.dsa_strategy, **plan.meta, "key": raw_key(k_run).tolist(),
                # the real images themselves: another split or normalization is never resumed
                "data_hash": split_hash(train)}
    set_meta = {"method": method, **base, "zca": getattr(train, "zca", None) is not None,
                **plan.extra}
    if dataset_normalization(train):  # the space the images live in (elf_jax.synset)
        set_meta["normalization"] = dataset_normalization(train)
    if test is not None:  # what chooses the best set: a held-out validation split or the test split
        chosen_on = getattr(test, "role", None) or "test"
        run_meta["chosen_on"] = {"split": chosen_on, "data_hash": split_hash(test)}
        set_meta["best_chosen_on"] = chosen_on
    labels = labels0 if plan.labels is None else plan.labels

    def to_synset(syn, meta):
        syn, out = {name: np.asarray(v) for name, v in syn.items()}, labels
        if "labels" in syn:  # learned logits, stored as probabilities
            z = syn["labels"] - syn["labels"].max(-1, keepdims=True)
            out = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        lr = float(syn["lr"]) if "lr" in syn else None
        return SyntheticSet(syn["images"], out, lr=lr, metadata={**set_meta, **meta},
                            num_classes=k)

    return run_loop(method=method, state=init_state(plan.syn, plan.optimizer, k_run),
                    advance=plan.advance, iterations=s.iterations, to_synset=to_synset,
                    run_meta=run_meta, workdir=workdir, checkpoint_every=s.checkpoint_every,
                    eval_settings=ev, test=test, arch=s.arch, model_kwargs=mk,
                    progress=progress, callback=callback)
