"""Teacher ("feature model") and MTT expert training on REAL data, with per-epoch snapshots.

``train_teacher(net_name, dataset, *, epochs, workdir, ...)`` trains ``num_experts`` networks
with the evaluation protocol's SGD and ONE train step (``elf_jax.train.step.train_step``
with loss mode ``task``): PyTorch-coupled weight decay, momentum, batch 256 reshuffled every
epoch (last partial batch kept), DSA (mode S) on every minibatch, lr x0.1 after epoch
``epochs // 2 + 1`` (0-based, checked after the epoch; the momentum restarts there, as the
reference rebuilds its optimizer).  Each epoch runs without a host round trip, either as
one jitted program (``lax.scan`` over the minibatches; GPU/TPU) or as a Python loop over one
jitted step (the CPU, where XLA runs convolutions inside loops much slower).

Defaults are the ELF teacher's (SPEC stage 1: lr 0.01, momentum 0.9, weight decay 5e-4,
decay at half).  MTT experts (``buffer.py``) are the same function with
``momentum=0, weight_decay=0, lr_decay_at_half=False`` and ``num_experts > 1``:
``train_experts`` / ``MTT_EXPERT_DEFAULTS``.

Trajectory format (``workdir``)
-------------------------------
::

    workdir/trajectory.json            manifest: format "elf_jax.trajectory/1", net_name,
                                        num_classes, model_kwargs, dtype, dataset,
                                        image_shape, num_experts, epochs, optimizer settings,
                                        seed
    workdir/expert_000/trajectory/     StepCheckpoints, step = epoch (0 = initialization,
        <epoch>/state                  k = after k training epochs); state =
        <epoch>/metadata               {"params", "batch_stats"} ({} without BatchNorm);
                                        metadata: epoch, expert, lr, train_loss, train_acc,
                                        test_acc (when evaluated)
    workdir/expert_000/resume/         StepCheckpoints (2 kept): the full train state
                                        (optimizer, RNG, epoch) to resume after a kill;
                                        deleted when the expert is complete
    workdir/expert_001/...

Training resumes after a kill: re-running the same call continues each expert after its
last saved epoch (an expert already complete is skipped); results are bit-identical to an
uninterrupted run on the same machine.  ELF uses the snapshot of one epoch
(``load_teacher(workdir, epoch)``); MTT uses whole trajectories (``load_trajectory``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.checkpoint import StepCheckpoints
from elf_jax.models import get_model
from elf_jax.train.protocol import FULL_DSA_STRATEGY, EvalProtocol
from elf_jax.train.step import EvalState, init_state, make_variables, train_step

__all__ = [
    "train_teacher",
    "train_experts",
    "load_teacher",
    "load_trajectory",
    "read_manifest",
    "test_accuracy",
    "Trajectories",
    "MTT_EXPERT_DEFAULTS",
    "TRAJECTORY_FORMAT",
]

TRAJECTORY_FORMAT = "elf_jax.trajectory/1"
MANIFEST = "trajectory.json"
MTT_EXPERT_DEFAULTS = dict(momentum=0.0, weight_decay=0.0, lr_decay_at_half=False)

# manifest keys that must match when a workdir is resumed or extended
_RESUME_KEYS = ("format", "net_name", "num_classes", "model_kwargs", "dtype", "dataset",
                "image_shape", "num_train", "epochs", "lr", "momentum", "weight_decay",
                "batch_size", "dsa_strategy", "lr_decay_at_half", "reset_momentum_at_decay",
                "seed")


# ----------------------------------------------------------------------------- helpers
def _expert_dir(workdir: Path, expert: int) -> Path:
    return workdir / f"expert_{expert:03d}"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(workdir) -> dict:
    """The ``trajectory.json`` manifest of a ``train_teacher`` workdir."""
    path = Path(workdir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no teacher trajectory in {workdir} (missing {MANIFEST}): run train_teacher "
            "(elf-jax train-teacher) with this workdir first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); delete the workdir and retrain") from e


def _build_net(manifest: Mapping[str, Any], dtype=None):
    kw = dict(manifest.get("model_kwargs") or {})
    dt = dtype if dtype is not None else manifest.get("dtype", "float32")
    if dt not in (None, "float32"):
        kw["dtype"] = dt
    return get_model(manifest["net_name"], int(manifest["num_classes"]), **kw)


def _load_split(dataset, split: str):
    if isinstance(dataset, str):
        from elf_jax.data import load
        return load(dataset, split)
    return dataset


def _dataset_arrays(ds):
    images = np.asarray(ds.images, np.float32)
    labels = np.asarray(ds.labels)
    if images.ndim != 4:
        raise ValueError(f"dataset images must be NHWC, got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"dataset labels must be [N] ints, got shape {labels.shape}")
    return images, labels.astype(np.int32)


# ----------------------------------------------------------------------------- test accuracy
@functools.partial(jax.jit, static_argnames=("net",))
def _count_correct(net, variables, x, y, mask):
    logits = net.apply(variables, x, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask)


def test_accuracy(net, variables, images, labels, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` (inference mode, no augmentation) on ``images``/``labels``
    (hard labels ``[N]`` or soft ``[N, K]``), in fixed-size batches (one compilation)."""
    images = np.asarray(jax.device_get(images), np.float32)
    labels = np.asarray(jax.device_get(labels))
    if labels.ndim == 2:
        labels = labels.argmax(-1)
    n = images.shape[0]
    if n == 0:
        raise ValueError("test_accuracy: no images")
    if labels.shape[0] != n:
        raise ValueError(f"test_accuracy: {n} images but {labels.shape[0]} labels")
    variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}
    bs = int(min(batch_size, n))
    correct = 0
    for s in range(0, n, bs):
        x, y = images[s:s + bs], labels[s:s + bs].astype(np.int32)
        real = x.shape[0]
        mask = np.arange(bs) < real
        if real < bs:
            x = np.concatenate([x, np.zeros((bs - real,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(bs - real, np.int32)])
        correct += int(_count_correct(net, variables, jnp.asarray(x), jnp.asarray(y),
                                      jnp.asarray(mask)))
    return correct / n


test_accuracy.__test__ = False  # not a pytest test when imported into a test module


# ----------------------------------------------------------------------------- one epoch
# Two ways to run an epoch, with identical results: ``scan`` (one program, the minibatches
# under ``lax.scan``; best on GPU/TPU) and ``python`` (a Python loop over one jitted step,
# no host sync inside the epoch). On XLA:CPU a convolution inside a while loop (``scan``)
# ran ~10-18x slower than the same step outside one (ConvNet width 16, batch 256 on this
# project's 2-core CPU: 1.4 s vs 0.13 s per step; partial unrolling did not help), so
# ``loop="auto"`` picks ``python`` on the CPU.

def _epoch_keys(state: EvalState, n: int):
    ekey = jax.random.fold_in(state.key, state.epoch)
    pkey, akey = jax.random.split(ekey)
    return jax.random.permutation(pkey, n), akey


def _step_at(state, images, labels, idx, akey, i, net, protocol):
    batch = {"images": images[idx], "labels": labels[idx]}
    st, m = train_step(state, batch, jax.random.fold_in(akey, i), net=net, protocol=protocol)
    return st, m["loss"] * idx.shape[0], m["acc"] * idx.shape[0]


@functools.partial(jax.jit, static_argnames=("net", "protocol"))
def _run_epoch_scan(state: EvalState, images, labels, *, net, protocol: EvalProtocol):
    """One epoch at ``state.epoch`` in one program; returns ``(state, mean_loss, acc)``
    (the epoch counter is not advanced here)."""
    n = images.shape[0]
    full, b, last = protocol.batch_plan(n)
    perm, akey = _epoch_keys(state, n)

    def body(st, i):
        idx = jax.lax.dynamic_slice(perm, (i * b,), (b,))
        st, ls, ac = _step_at(st, images, labels, idx, akey, i, net, protocol)
        return st, (ls, ac)

    state, (ls, ac) = jax.lax.scan(body, state, jnp.arange(full))
    loss_sum, acc_sum = jnp.sum(ls), jnp.sum(ac)
    if last:
        state, ls, ac = _step_at(state, images, labels, perm[full * b:], akey, full, net,
                                 protocol)
        loss_sum, acc_sum = loss_sum + ls, acc_sum + ac
    return state, loss_sum / n, acc_sum / n


_epoch_keys_jit = jax.jit(_epoch_keys, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("net", "protocol", "size"))
def _python_step(state, images, labels, perm, akey, i, start, *, net, protocol, size):
    idx = jax.lax.dynamic_slice(perm, (start,), (size,))
    return _step_at(state, images, labels, idx, akey, i, net, protocol)


def _run_epoch_python(state: EvalState, images, labels, *, net, protocol: EvalProtocol):
    n = images.shape[0]
    full, b, last = protocol.batch_plan(n)
    perm, akey = _epoch_keys_jit(state, n)
    sums = []
    for i in range(full + (1 if last else 0)):
        size = b if i < full else last
        state, ls, ac = _python_step(state, images, labels, perm, akey, np.int32(i),
                                     np.int32(i * b), net=net, protocol=protocol, size=size)
        sums.append((ls, ac))
    sums = np.asarray(jax.device_get(sums), np.float64).sum(0)  # the one host sync
    return state, sums[0] / n, sums[1] / n


def _pick_loop(loop: str) -> str:
    if loop == "auto":
        return "python" if jax.default_backend() == "cpu" else "scan"
    if loop not in ("scan", "python"):
        raise ValueError(f"loop must be 'auto', 'scan' or 'python', got {loop!r}")
    return loop


def _run_epoch(state, images, labels, *, net, protocol, loop: str = "auto"):
    fn = _run_epoch_scan if _pick_loop(loop) == "scan" else _run_epoch_python
    return fn(state, images, labels, net=net, protocol=protocol)


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class Trajectories:
    """What ``train_teacher`` returns: where the trajectories are and how they went."""

    workdir: Path
    net_name: str
    num_classes: int
    num_experts: int
    epochs: int
    history: list  # per expert: list of per-epoch metadata dicts (epochs 1..E)
    test_acc: list  # per expert: final test accuracy (None without a test set)

    @property
    def test_accs(self) -> list:
        """Alias of ``test_acc``."""
        return self.test_acc

    @property
    def manifest(self) -> dict:
        return read_manifest(self.workdir)

    def load(self, epoch: int, expert: int = 0):
        """``(net, variables)`` of ``expert`` after ``epoch`` epochs."""
        return load_teacher(self.workdir, epoch, expert=expert)

    def trajectory(self, expert: int = 0) -> list:
        return load_trajectory(self.workdir, expert=expert)


# ----------------------------------------------------------------------------- training
def _state_like(net, protocol, images) -> EvalState:
    return jax.eval_shape(
        lambda: init_state(net, protocol, jax.random.key(0), jnp.zeros(2, jnp.uint32),
                           jnp.zeros((1,) + images.shape[1:], jnp.float32)))


@functools.partial(jax.jit, static_argnames=("net", "protocol"))
def _init_expert(net, protocol, seed, expert, sample):
    ekey = jax.random.fold_in(jax.random.key(seed), expert)
    init_key, train_key = jax.random.split(ekey)
    return init_state(net, protocol, init_key, jax.random.key_data(train_key), sample)


def _save_resume(ck: StepCheckpoints, state: EvalState, meta: dict) -> None:
    step = int(state.epoch)
    if step in ck.all_steps():
        return
    ck.save(step, state._asdict(), meta)


def _restore_resume(ck: StepCheckpoints, like: EvalState) -> Optional[EvalState]:
    for step in reversed(ck.all_steps()):  # newest first; an unreadable one falls back
        try:
            d, _ = ck.restore(step, like=like._asdict())
            return EvalState(**d)
        except ValueError:
            continue
    return None


def train_teacher(
    net_name: str,
    dataset,
    *,
    epochs: int,
    workdir,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    dsa_strategy: str = FULL_DSA_STRATEGY,
    lr_decay_at_half: bool = True,
    reset_momentum_at_decay: bool = True,
    seed: int = 0,
    num_experts: int = 1,
    dtype: str = "float32",
    model_kwargs: Optional[Mapping[str, Any]] = None,
    test_dataset=None,
    eval_every: int = 0,
    progress: bool = True,
    callback: Optional[Callable[[int, int, dict], None]] = None,
    loop: str = "auto",
) -> Trajectories:
    """Trains ``num_experts`` networks ``net_name`` on the real ``dataset`` and snapshots
    parameters (and BatchNorm statistics) after every epoch into ``workdir`` (format in the
    module docstring).  Resumes after the last saved epoch when re-run.

    Args:
      net_name: registry name (``elf_jax.models.get_model``), e.g. ``"ConvNetW512"``.
      dataset: an ``ArrayDataset`` (train split) or a dataset name (its ``train`` split is
        loaded, and its ``test`` split for ``test_dataset`` when that is ``None``).
      epochs: training epochs ``E``; snapshots ``0..E`` are written.
      lr, momentum, weight_decay, batch_size: PyTorch-style SGD (coupled weight decay).
      dsa_strategy: DSA groups (``"none"`` disables augmentation).
      lr_decay_at_half: lr x0.1 after epoch ``E // 2 + 1`` (0-based), momentum restarted
        there when ``reset_momentum_at_decay``.
      seed: expert ``i`` uses ``fold_in(key(seed), i)`` for initialization and data order.
      dtype: compute dtype (``"float32"``/``"bfloat16"``); parameters stay float32.
      model_kwargs: extra ``get_model`` overrides (e.g. ``{"width": 16}``).
      test_dataset: ``ArrayDataset`` for test accuracy (after the last epoch, and every
        ``eval_every`` epochs when > 0).
      callback: ``callback(expert, epoch, metadata)`` after each saved epoch.
      loop: ``"scan"`` (epoch in one program), ``"python"`` (loop over a jitted step) or
        ``"auto"`` (python on the CPU, scan elsewhere); results are the same.
    Returns: ``Trajectories``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if workdir is None:
        raise ValueError("train_teacher needs a workdir for its trajectory checkpoints")
    if test_dataset is None and isinstance(dataset, str):
        test_dataset = _load_split(dataset, "test")
    train = _load_split(dataset, "train")
    images_np, labels_np = _dataset_arrays(train)
    num_classes = int(getattr(train, "num_classes", int(labels_np.max()) + 1))
    dataset_name = getattr(train, "name", dataset if isinstance(dataset, str) else None)
    model_kwargs = dict(model_kwargs or {})

    manifest = {
        "format": TRAJECTORY_FORMAT,
        "net_name": net_name,
        "num_classes": num_classes,
        "model_kwargs": model_kwargs,
        "dtype": str(jnp.dtype(dtype)),
        "dataset": dataset_name,
        "zca": getattr(train, "zca", None) is not None,
        "image_shape": list(images_np.shape[1:]),
        "num_train": int(images_np.shape[0]),
        "epochs": int(epochs),
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "dsa_strategy": dsa_strategy or "none",
        "lr_decay_at_half": bool(lr_decay_at_half),
        "reset_momentum_at_decay": bool(reset_momentum_at_decay),
        "seed": int(seed),
        "num_experts": int(num_experts),
        "snapshot": "step k = parameters after k training epochs (0 = initialization)",
    }
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mpath = workdir / MANIFEST
    if mpath.exists():
        old = read_manifest(workdir)
        for key in _RESUME_KEYS:
            if old.get(key) != manifest[key]:
                raise ValueError(
                    f"{workdir} holds a trajectory with {key}={old.get(key)!r}, but this run "
                    f"asks for {key}={manifest[key]!r}; use another workdir (or delete it)")
        manifest["num_experts"] = max(int(old.get("num_experts", 1)), int(num_experts))
    _write_json_atomic(mpath, manifest)

    net = _build_net(manifest)
    protocol = EvalProtocol(
        lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
        epochs=epochs, lr_decay=lr_decay_at_half, reset_momentum_at_decay=reset_momentum_at_decay,
        dsa_strategy=dsa_strategy or "none", mode="task", kind="ce", dtype=str(jnp.dtype(dtype)))
    images = jnp.asarray(images_np)
    labels = jnp.asarray(labels_np)
    test_xy = _dataset_arrays(test_dataset) if test_dataset is not None else None
    like = _state_like(net, protocol, images_np)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    history, final_acc = [], []
    for expert in range(num_experts):
        edir = _expert_dir(workdir, expert)
        traj = StepCheckpoints(edir / "trajectory", max_to_keep=None)
        hist = []
        latest = traj.latest_step()
        if latest is not None and latest >= epochs and not (edir / "resume").exists():
            # complete (the resume state is deleted last): nothing to do
            for e in range(1, epochs + 1):
                hist.append(traj.read_meta(e))
            history.append(hist)
            final_acc.append(hist[-1].get("test_acc"))
            traj.close()
            continue
        resume = StepCheckpoints(edir / "resume", max_to_keep=2)
        state = _restore_resume(resume, like)
        if state is None:
            # jitted: an eager flax init compiles every op separately (~7 s on the CPU)
            state = _init_expert(net, protocol, seed, expert, images[:1])
            if 0 not in traj:
                traj.save(0, {"params": state.params, "batch_stats": state.batch_stats},
                          {"epoch": 0, "expert": expert, "lr": float(lr)})
            _save_resume(resume, state, {"epoch": 0, "expert": expert})
        start = int(state.epoch)
        for e in range(1, start + 1):
            if e in traj:
                hist.append(traj.read_meta(e))

        bar = None
        if progress and tqdm is not None:
            bar = tqdm(total=epochs, initial=start, desc=f"{net_name} expert {expert}",
                       leave=False)
        for ep in range(start, epochs):  # ep = 0-based index of the epoch being trained
            state, loss, acc = _run_epoch(state, images, labels, net=net, protocol=protocol,
                                          loop=loop)
            loss, acc = float(loss), float(acc)
            if not np.isfinite(loss):
                raise ValueError(
                    f"teacher {net_name} expert {expert} diverged in epoch {ep + 1} (loss "
                    f"{loss}); the last good snapshot is epoch {ep} in {edir}. Lower lr.")
            if (protocol.decay_epoch is not None and ep == protocol.decay_epoch
                    and reset_momentum_at_decay):
                state = state._replace(opt_state=protocol.optimizer().init(state.params))
            done = ep + 1
            state = state._replace(epoch=jnp.asarray(done, jnp.int32))
            decayed = protocol.decay_epoch is not None and ep > protocol.decay_epoch
            meta = {"epoch": done, "expert": expert, "train_loss": loss, "train_acc": acc,
                    "lr": lr * (protocol.decay_factor if decayed else 1.0)}
            if test_xy is not None and (done == epochs or (eval_every and done % eval_every == 0)):
                variables = make_variables(state.params, state.batch_stats)
                meta["test_acc"] = test_accuracy(net, variables, *test_xy)
            if done not in traj:
                traj.save(done, {"params": state.params, "batch_stats": state.batch_stats}, meta)
            _save_resume(resume, state, {"epoch": done, "expert": expert})
            hist.append(meta)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
            if callback is not None:
                callback(expert, done, meta)
        if bar is not None:
            bar.close()
        resume.close()
        shutil.rmtree(edir / "resume", ignore_errors=True)  # expert complete
        traj.close()
        history.append(hist)
        final_acc.append(hist[-1].get("test_acc") if hist else None)

    return Trajectories(workdir=workdir, net_name=net_name, num_classes=num_classes,
                        num_experts=num_experts, epochs=epochs, history=history,
                        test_acc=final_acc)


def train_experts(net_name: str, dataset, *, epochs: int = 50, num_experts: int = 10,
                  workdir, **kwargs) -> Trajectories:
    """MTT expert trajectories (``buffer.py``): ``train_teacher`` with momentum 0, weight
    decay 0 and no lr decay unless overridden, ``num_experts`` experts."""
    settings = {**MTT_EXPERT_DEFAULTS, **kwargs}
    return train_teacher(net_name, dataset, epochs=epochs, num_experts=num_experts,
                         workdir=workdir, **settings)


# ----------------------------------------------------------------------------- loading
def _open_traj(workdir, expert: int) -> tuple:
    manifest = read_manifest(workdir)
    n = int(manifest.get("num_experts", 1))
    if not 0 <= expert < n:
        raise ValueError(f"{workdir} has experts 0..{n - 1}, asked for expert {expert}")
    tdir = _expert_dir(Path(workdir).absolute(), expert) / "trajectory"
    if not tdir.is_dir():
        raise FileNotFoundError(f"expert {expert} of {workdir} has not been trained yet "
                                f"(no {tdir}); run train_teacher again to finish it")
    return manifest, StepCheckpoints(tdir, max_to_keep=None)


def _variables_like(net, manifest) -> dict:
    shape = (1,) + tuple(manifest["image_shape"])
    v = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}


def load_teacher(workdir, epoch: Optional[int] = None, *, expert: int = 0, dtype=None):
    """``(net, variables)`` of ``expert`` after ``epoch`` training epochs (default: the last
    saved).  ``dtype`` overrides the compute dtype of the rebuilt network."""
    manifest, traj = _open_traj(workdir, expert)
    steps = traj.all_steps()
    if epoch is None:
        if not steps:
            raise FileNotFoundError(f"no snapshots for expert {expert} in {workdir}")
        epoch = steps[-1]
    if int(epoch) not in steps:
        raise ValueError(
            f"{workdir} has no snapshot for epoch {epoch} of expert {expert}; saved epochs: "
            f"{steps[0]}..{steps[-1]}" if steps else f"{workdir}: expert {expert} has no snapshots")
    net = _build_net(manifest, dtype)
    state, _ = traj.restore(int(epoch), like=_variables_like(net, manifest))
    traj.close()
    return net, make_variables(state["params"], state["batch_stats"])


def load_trajectory(workdir, expert: int = 0, epochs: Optional[Sequence[int]] = None) -> list:
    """The snapshots of ``expert`` as a list of variable dicts (``{"params"[, "batch_stats"]}``)
    for ``epochs`` (default: every saved epoch, in order)."""
    manifest, traj = _open_traj(workdir, expert)
    net = _build_net(manifest)
    like = _variables_like(net, manifest)
    steps = traj.all_steps() if epochs is None else [int(e) for e in epochs]
    out = []
    for s in steps:
        state, _ = traj.restore(s, like=like)
        out.append(make_variables(state["params"], state["batch_stats"]))
    traj.close()
    return out
