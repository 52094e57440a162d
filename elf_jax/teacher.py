"""Teacher ("feature model") and MTT expert training on REAL data, with per-epoch snapshots.

``train_teacher(net_name, dataset, *, epochs, workdir, ...)`` trains ``num_experts`` networks
with the evaluation protocol's SGD and ONE train step (``elf_jax.train.step.train_step``
with loss mode ``task``): PyTorch-coupled weight decay, momentum, batch 256 reshuffled every
epoch (last partial batch kept), DSA (mode S) on every minibatch, lr x0.1 after epoch
``epochs // 2 + 1`` (0-based, checked after the epoch; the momentum restarts there, as the
reference rebuilds its optimizer).  The epochs run in the one training engine
(``elf_jax.train.runner.fit``, one epoch per chunk): expert ``i`` is repeat ``i`` of the
stage's key, the per-epoch snapshot is the engine's ``on_chunk`` hook, and ``parallel``
places it data parallel like any other run.

Defaults are the ELF teacher's (docs/METHOD.md stage 1: lr 0.01, momentum 0.9, weight decay 5e-4,
decay at half).  MTT experts (``buffer.py``) are the same function with
``momentum=0, weight_decay=0, lr_decay_at_half=False`` and ``num_experts > 1``:
``train_experts`` / ``MTT_EXPERT_DEFAULTS``.

Trajectory format (``workdir``)
-------------------------------
::

    workdir/trajectory.json            manifest: format "elf_jax.trajectory/2", stage, net_name,
                                        num_classes, model_kwargs, dtype, dataset,
                                        image_shape, num_experts, epochs, optimizer settings,
                                        seed
    workdir/expert_000/trajectory/     StepCheckpoints, step = epoch (0 = initialization,
        <epoch>/state                  k = after k training epochs); state =
        <epoch>/metadata               {"params", "batch_stats"} ({} without BatchNorm);
                                        metadata: epoch, expert, lr, train_loss, train_acc,
                                        test_acc (when evaluated)
    workdir/expert_000/resume/         the engine's checkpoints (2 kept): the full train
                                        state (optimizer, RNG, epoch) to resume after a kill;
                                        deleted when the expert is complete
    workdir/expert_001/...

Training resumes after a kill: re-running the same call continues each expert after its
last saved epoch (an expert already complete is skipped); results are bit-identical to an
uninterrupted run on the same machine.  ELF uses the snapshot of one epoch
(``load_teacher(workdir, epoch)``); MTT uses whole trajectories (``load_trajectory``).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.checkpoint import StepCheckpoints, write_json_atomic
from elf_jax.hashing import fingerprint
from elf_jax.data.stream import is_streamed, split_hash
from elf_jax.keys import stage_key
from elf_jax.models import get_model
from elf_jax.parallel.collectives import host_copy
from elf_jax.augment import DEFAULT_STRATEGY
from elf_jax.train.protocol import TrainProtocol
from elf_jax.train.runner import fit, init_states, test_accuracy
from elf_jax.train.step import make_variables

__all__ = [
    "train_teacher",
    "train_experts",
    "load_teacher",
    "load_trajectory",
    "read_manifest",
    "recorded_test_accuracy",
    "test_accuracy",
    "Trajectories",
    "MTT_EXPERT_DEFAULTS",
    "TRAJECTORY_FORMAT",
]

# v2: initial weights and data order from the engine's streams under a stage tag
TRAJECTORY_FORMAT = "elf_jax.trajectory/2"
MANIFEST = "trajectory.json"
MTT_EXPERT_DEFAULTS = dict(momentum=0.0, weight_decay=0.0, lr_decay_at_half=False)

# manifest keys that must match when a workdir is resumed or extended
_RESUME_KEYS = ("format", "stage", "net_name", "num_classes", "model_kwargs", "dtype", "dataset",
                "zca", "data_hash", "image_shape", "num_train", "epochs", "lr", "momentum", "weight_decay",
                "batch_size", "dsa_strategy", "lr_decay_at_half", "reset_momentum_at_decay",
                "seed")


# ----------------------------------------------------------------------------- helpers
def _expert_dir(workdir: Path, expert: int) -> Path:
    return workdir / f"expert_{expert:03d}"


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
        from elf_jax.data.stream import open_split
        return open_split(dataset, split)
    return dataset


def _dataset_arrays(ds):
    """``(images, labels)`` of a split: float32 arrays in memory, or a streamed split itself
    (the engine reads its rows while training) with its int32 labels."""
    if is_streamed(ds):
        return ds, np.asarray(ds.labels, np.int32)
    images = np.asarray(ds.images, np.float32)
    labels = np.asarray(ds.labels)
    if images.ndim != 4:
        raise ValueError(f"dataset images must be NHWC, got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"dataset labels must be [N] ints, got shape {labels.shape}")
    return images, labels.astype(np.int32)


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
    dsa_strategy: str = DEFAULT_STRATEGY,
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
    engine: str = "auto",
    parallel: Any = None,
    stage: str = "teacher",
    held_out: Optional[Mapping[str, Any]] = None,
) -> Trajectories:
    """Trains ``num_experts`` networks ``net_name`` on the real ``dataset`` with the one
    training engine (``elf_jax.train.runner.fit``) and snapshots parameters (and BatchNorm
    statistics) after every epoch into ``workdir`` (format in the module docstring).
    Resumes after the last saved epoch when re-run.

    Args:
      net_name: registry name (``elf_jax.models.get_model``), e.g. ``"ConvNetW512"``.
      dataset: an ``ArrayDataset`` (train split), a ``StreamedSplit`` (read from its files
        while training: ``elf_jax.data.open_split``), or a dataset name (its ``train``
        split is opened, in memory or streamed by size, and its ``test`` split for
        ``test_dataset`` when that is ``None``).
      epochs: training epochs ``E``; snapshots ``0..E`` are written.
      lr, momentum, weight_decay, batch_size: PyTorch-style SGD (coupled weight decay).
      dsa_strategy: DSA groups (``"none"`` disables augmentation).
      lr_decay_at_half: lr x0.1 after epoch ``E // 2 + 1`` (0-based), momentum restarted
        there when ``reset_momentum_at_decay``.
      seed, stage: expert ``i`` is repeat ``i`` of ``stage_key(seed, stage)`` (``"teacher"``,
        or ``"expert"`` for MTT experts), so no evaluation network starts from its weights.
      dtype: compute dtype (``"float32"``/``"bfloat16"``); parameters stay float32.
      model_kwargs: extra ``get_model`` overrides (e.g. ``{"width": 16}``).
      test_dataset: ``ArrayDataset`` for test accuracy (after the last epoch, and every
        ``eval_every`` epochs when > 0).
      callback: ``callback(expert, epoch, metadata)`` after each saved epoch.
      engine, parallel: the engine (``auto``/``scan``/``host``) and its placement (None: one
        device; a ``parallel`` section with ``shard_map`` trains data parallel).
      held_out: what ``dataset`` leaves out of its split (the pipeline's validation settings),
        kept in the manifest so that a teacher is never reused for a config that holds out
        other images (``elf_jax.pipeline.check_teacher_settings``).
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
    manifest = {
        "format": TRAJECTORY_FORMAT, "stage": stage, "net_name": net_name,
        "num_classes": num_classes, "model_kwargs": dict(model_kwargs or {}),
        "dtype": str(jnp.dtype(dtype)), "dataset": dataset_name,
        "zca": getattr(train, "zca", None) is not None,
        # the training data itself, not just its name: a changed split is never resumed
        "data_hash": split_hash(train),
        "image_shape": list(train.image_shape if is_streamed(train) else images_np.shape[1:]),
        "num_train": len(labels_np),
        "epochs": int(epochs), "lr": float(lr), "momentum": float(momentum),
        "weight_decay": float(weight_decay), "batch_size": int(batch_size),
        "dsa_strategy": dsa_strategy or "none", "lr_decay_at_half": bool(lr_decay_at_half),
        "reset_momentum_at_decay": bool(reset_momentum_at_decay), "seed": int(seed),
        "num_experts": int(num_experts),
        "snapshot": "step k = parameters after k training epochs (0 = initialization)",
    }
    if held_out is not None:  # what `dataset` leaves out of its split (a validation split)
        manifest["validation"] = dict(held_out)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    manifest["num_experts"] = _check_resume(workdir, manifest)
    write_json_atomic(workdir / MANIFEST, manifest)

    net = _build_net(manifest)
    protocol = TrainProtocol(
        lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
        epochs=epochs, lr_decay=lr_decay_at_half, reset_momentum_at_decay=reset_momentum_at_decay,
        dsa_strategy=dsa_strategy or "none", mode="task", kind="ce", dtype=str(jnp.dtype(dtype)))
    test_xy = _dataset_arrays(test_dataset) if test_dataset is not None else None
    data = {"images": images_np, "labels": labels_np}
    base = stage_key(int(seed), stage)
    history, final_acc = [], []
    for expert in range(num_experts):
        edir = _expert_dir(workdir, expert)
        traj = StepCheckpoints(edir / "trajectory", max_to_keep=None)
        latest = traj.latest_step()
        if latest is None or latest < epochs or (edir / "resume").exists():  # not complete
            sample = jnp.zeros((1,) + tuple(manifest["image_shape"]), jnp.float32)
            states = init_states(net, protocol, base, 1, sample, first=expert)
            if 0 not in traj:
                traj.save(0, _snapshot(states), {"epoch": 0, "expert": expert, "lr": float(lr)})

            def on_chunk(done, states, ms, expert=expert, traj=traj):
                if done in traj:  # saved before a kill that came before the resume state
                    return
                decayed = protocol.decay_epoch is not None and done - 1 > protocol.decay_epoch
                meta = {"epoch": done, "expert": expert, "train_loss": float(ms["loss"][0, -1]),
                        "train_acc": float(ms["acc"][0, -1]),
                        "lr": lr * (protocol.decay_factor if decayed else 1.0)}
                snap = _snapshot(states)
                if test_xy is not None and (done == epochs or (eval_every and done % eval_every == 0)):
                    meta["test_acc"] = test_accuracy(net, snap, *test_xy)
                traj.save(done, snap, meta)
                if callback is not None:
                    callback(expert, done, meta)

            fit(net, protocol, data, states, num_epochs=epochs, placement=parallel, engine=engine,
                chunk_epochs=1, checkpoint_every=1, workdir=edir / "resume", max_to_keep=2,
                meta={k: manifest[k] for k in _RESUME_KEYS} | {"expert": expert},
                on_chunk=on_chunk, progress=progress, desc=f"{net_name} expert {expert}")
            _remove_resume(edir / "resume")  # expert complete
        history.append([traj.read_meta(e) for e in range(1, epochs + 1)])
        final_acc.append(history[-1][-1].get("test_acc"))
        traj.close()
    return Trajectories(workdir=workdir, net_name=net_name, num_classes=num_classes,
                        num_experts=num_experts, epochs=epochs, history=history,
                        test_acc=final_acc)


def _remove_resume(path: Path) -> None:
    """Deletes a finished expert's resume checkpoints: on several processes, process 0 does
    it once every process is done with them (another process's checkpoint manager may
    still be listing them), and none goes on before it is done."""
    if jax.process_count() == 1:
        shutil.rmtree(path, ignore_errors=True)
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"elf_jax: done with {path}")
    if jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)
    multihost_utils.sync_global_devices(f"elf_jax: removed {path}")


def _snapshot(states) -> dict:
    """``{"params", "batch_stats"}`` of the single run in stacked ``states``, on the host."""
    params, stats = jax.tree.map(lambda a: a[0], host_copy((states.params, states.batch_stats)))
    return {"params": params, "batch_stats": stats}


def _check_resume(workdir: Path, manifest: dict) -> int:
    """The expert count of the workdir after this run; ``ValueError`` when the workdir holds a
    trajectory with other settings, or one of an older format that cannot be continued."""
    if not (workdir / MANIFEST).exists():
        return manifest["num_experts"]
    old = read_manifest(workdir)
    if old.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(
            f"{workdir} holds a trajectory in format {old.get('format')!r}, written before the "
            f"random streams changed ({TRAJECTORY_FORMAT!r} now): it can still be loaded "
            "(load_teacher), but not continued; delete it (or use another workdir) to train anew")
    for key in _RESUME_KEYS:
        if old.get(key) != manifest[key]:
            raise ValueError(
                f"{workdir} holds a trajectory with {key}={old.get(key)!r}, but this run "
                f"asks for {key}={manifest[key]!r}; use another workdir, delete it, or (with "
                "`elf-jax`) pass --overwrite=teacher to retrain it")
    return max(int(old.get("num_experts", 1)), int(manifest["num_experts"]))


def train_experts(net_name: str, dataset, *, epochs: int = 50, num_experts: int = 10,
                  workdir, **kwargs) -> Trajectories:
    """MTT expert trajectories (``buffer.py``): ``train_teacher`` with momentum 0, weight
    decay 0 and no lr decay unless overridden, ``num_experts`` experts."""
    settings = {**MTT_EXPERT_DEFAULTS, "stage": "expert", **kwargs}
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


def recorded_test_accuracy(workdir, epoch: Optional[int] = None, *, expert: int = 0):
    """The test accuracy the trajectory recorded after ``epoch`` (default: its last saved
    epoch), read from the snapshot's metadata (no weights loaded); None when not measured."""
    _, traj = _open_traj(workdir, expert)
    try:
        steps = traj.all_steps()
        step = steps[-1] if epoch is None and steps else epoch
        return traj.read_meta(step).get("test_acc") if step in steps else None
    finally:
        traj.close()


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
