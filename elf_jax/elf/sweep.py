"""Lambda sweeps: a ``lambda_front`` x ``lambda_rear`` grid of ELF evaluations trained as
the runs of ONE compiled program.

The lr and the lambdas are traced per run (``state.hparams``, :mod:`elf_jax.train.step`),
so the G grid points x R repeats are ``G * R`` runs of one :func:`run_evaluation`: the
engine compiles its train program once and runs it for all of them (one ``lax.map`` /
``vmap`` under the ``scan`` engine; the same per-step executables under the ``host``
engine), checkpointed and resumed together. Run ``(g, r)`` takes the repeat index ``r``
(``repeat_index``), so repeat ``r`` of every grid point starts from the same weights and
the same data order and DSA stream as repeat ``r`` of every other point and of
:func:`elf_jax.elf.evaluate_synset` with the same key: each point's result equals a
separate ``evaluate_synset`` run with its lambdas, and differences between points (and the
gain over the task-mode baseline) are paired.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from elf_jax.elf.evaluate import (_check_memory, _train_and_test, check_grid, log_memory,
                                  net_for_mode, prepare_inputs)
from elf_jax.losses import MAX_LAMBDA, mode_needs_features
from elf_jax.elf.summary import BASELINE_MODE, paired_gain
from elf_jax.parallel.placement import Placement
from elf_jax.train.protocol import TrainProtocol
from elf_jax.train.runner import run_evaluation

__all__ = ["check_axis", "lambda_sweep"]


def check_axis(name: str, values) -> tuple[float, ...]:
    """One lambda axis as floats: distinct numbers in [0, MAX_LAMBDA] (`check_grid`)."""
    return check_grid(name, values, lambda v: 0 <= v <= MAX_LAMBDA, f"in [0, {MAX_LAMBDA:g}]",
                      "(0.0, 1.0)")


def lambda_sweep(
    arch: Union[str, Any],
    images,
    labels,
    test_images,
    test_labels,
    features=None,
    *,
    lambda_front: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    lambda_rear: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    protocol: TrainProtocol = TrainProtocol(),
    repeats: int = 5,
    key=None,
    workdir=None,
    baseline: bool = False,
    num_classes: Optional[int] = None,
    learned_lr: Optional[float] = None,
    strategy: str = "auto",
    engine: str = "auto",
    chunk_epochs: Optional[int] = None,
    checkpoint_every: int = 100,
    model_overrides: Optional[Mapping[str, Any]] = None,
    parallel: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    adapter: str = "auto",
) -> dict:
    """Trains ``arch`` on the synthetic set at every ``(lambda_front, lambda_rear)`` of the
    grid, ``repeats`` times each, in ``protocol.mode`` (an ELF mode), as one program.

    The arguments are :func:`elf_jax.elf.evaluate_synset`'s, plus:
      lambda_front, lambda_rear: the grid axes (distinct numbers >= 0); the protocol's own
        lambdas are not used.
      engine: ``auto`` | ``scan`` (every run inside one compiled program) | ``host``.
      workdir: checkpoints of the grid in ``workdir/grid``, of the baseline in
        ``workdir/baseline``; an interrupted sweep started again resumes from them.
      baseline: also train ``repeats`` networks in mode ``task`` with the same key (repeat
        ``r`` from the same weights) and report each point's paired gain over it.
    Returns: ``{"arch", "mode", "lambda_front", "lambda_rear", "repeats", "accs" [F][L][R],
      "mean" [F][L], "std" [F][L], "final_train_loss" [F][L][R], "train_loss" (array
      [F, L, R, E+1]), "baseline" (None or {"accs", "mean", "std", ...}), "gain" (None or
      [F][L] of {"mean", "std", "n", "ci95", "significant"}: percentage points as
      fractions), "seconds", "total_seconds", "resumed_from", "strategy", "engine",
      "placement", "lr", "num_classes"}``; F, L = the axes' lengths (rows: lambda_front).
    """
    lf = check_axis("lambda_front", lambda_front)
    lr_axis = check_axis("lambda_rear", lambda_rear)
    if not mode_needs_features(protocol.mode):
        raise ValueError(f"protocol.mode={protocol.mode!r} ignores the lambdas: sweep an ELF "
                         "mode such as 'front_rear_task' (baseline=True adds the task baseline)")
    if int(repeats) < 1:
        raise ValueError(f"repeats={repeats}: at least one repeat is needed")
    key = jax.random.PRNGKey(0) if key is None else key
    i = prepare_inputs(arch, images, labels, test_images, test_labels, features, protocol,
                       num_classes=num_classes, learned_lr=learned_lr,
                       model_overrides=model_overrides, adapter=adapter)
    name, net, images, labels, test_images, test_labels, features, _, k, learned_lr = i
    placement = Placement.of(parallel)
    nf, nl, r = len(lf), len(lr_axis), int(repeats)
    if placement.mesh is not None:
        log_memory(_check_memory(name, net, features, [protocol.mode], protocol, placement,
                                 images, labels, k, nf * nl * r), placement, log)
    lr = protocol.base_lr(learned_lr)
    # run (f, l, r) is number (f * nl + l) * r + r: the grid point's lambdas, repeat index r
    hparams = {"lr": lr,
               "lambda_front": np.repeat(np.asarray(lf, np.float32), nl * r),
               "lambda_rear": np.tile(np.repeat(np.asarray(lr_axis, np.float32), r), nf)}
    wd = None if workdir is None else Path(workdir)
    grid = run_evaluation(
        net_for_mode(net, protocol.mode, features, images.shape[1:]), protocol, images, labels.astype(np.int32 if labels.ndim == 1 else np.float32),
        test_images, test_labels, features, repeats=nf * nl * r, key=key, strategy=strategy,
        engine=engine, chunk_epochs=chunk_epochs, workdir=None if wd is None else wd / "grid",
        checkpoint_every=checkpoint_every, hparams=hparams,
        repeat_index=np.tile(np.arange(r), nf * nl), placement=placement, progress=progress,
        desc=f"{name} {protocol.mode} sweep {nf}x{nl}x{r}",
        run_info={"arch": name, "sweep": {"lambda_front": list(lf), "lambda_rear": list(lr_axis)}})
    accs = np.asarray(grid["accs"], np.float64).reshape(nf, nl, r)
    loss = np.asarray(grid["train_loss"]).reshape(nf, nl, r, -1)
    out = {"arch": name, "mode": protocol.mode, "lambda_front": list(lf),
           "lambda_rear": list(lr_axis), "repeats": r, "accs": accs.tolist(),
           "mean": accs.mean(-1).tolist(), "std": accs.std(-1).tolist(),
           "final_train_loss": loss[..., -1].tolist(), "train_loss": loss, "baseline": None,
           "gain": None, "lr": lr, "num_classes": k,
           **{kk: grid[kk] for kk in ("seconds", "total_seconds", "resumed_from", "strategy",
                                      "engine", "chunk_epochs", "placement")}}
    if baseline:
        b = _train_and_test(
            name, net, protocol.replace(mode=BASELINE_MODE), images, labels, test_images,
            test_labels, None, k, learned_lr, repeats=r, key=key, strategy=strategy,
            engine=engine, chunk_epochs=chunk_epochs, checkpoint_every=checkpoint_every,
            workdir=None if wd is None else wd / "baseline", placement=placement,
            progress=progress)
        out["baseline"] = {"accs": b["accs"], "mean": b["mean"], "std": b["std"],
                           "final_train_loss": np.asarray(b["train_loss"])[:, -1].tolist(),
                           **{kk: b[kk] for kk in ("seconds", "total_seconds", "resumed_from")}}
        out["gain"] = [[paired_gain(b["accs"], accs[i, j]) for j in range(nl)] for i in range(nf)]
    return out
