"""Training curves as TensorBoard event files: one writer, used by every stage.

`<workdir>/tb/<stage>/<run>/events.out.tfevents.*` (`tensorboard --logdir <workdir>/tb`):
the teacher (`tb/teacher/<arch>`: per-epoch train loss and accuracy), each evaluation run
(`tb/evaluate/<arch>_<mode>_r<k>`: per-epoch loss and its task/front/rear terms, train
accuracy, lr, images/s; the test accuracy at the end) and the distillation
(`tb/distill/<method>`: per-iteration loss, the evaluations' accuracy). Scalars are written
from metrics already on the host: the engine's once-per-chunk sync, the distillation loop's
per-iteration one; writing adds no device sync. `tensorboardX` writes the files (no
TensorFlow; its wheel is 87 KB and needs only numpy and protobuf, which TFDS brings); `clu`'s
writers need TensorFlow for TensorBoard output. `config.log.tensorboard = False` turns it off.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np


class Curves:
    """Scalars of named runs under one directory; a no-op when `logdir` is None."""

    def __init__(self, logdir: Optional[Path]):
        self.logdir = None if logdir is None else Path(logdir)
        self._writers: dict = {}

    def write(self, run: str, step: int, scalars: Mapping[str, float]) -> None:
        if self.logdir is None:
            return
        w = self._writers.get(run)
        if w is None:
            from tensorboardX import SummaryWriter

            w = self._writers[run] = SummaryWriter(logdir=str(self.logdir / run))
        for tag, value in scalars.items():
            if value is not None and np.isfinite(value):
                w.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


def epoch_logger(curves: Curves, runs: Sequence[str], n_images: int, lr_of=None):
    """An engine `on_chunk(epochs_done, states, metrics)` hook writing each run's per-epoch
    metrics (`metrics[key]`: host arrays [runs, epochs of the chunk]) to `curves`, run r under
    `runs[r]`; `lr_of(epoch)`: the lr of that epoch (None: not written); images/s over the
    chunk's wall time."""
    clock = {"t": time.perf_counter()}

    def on_chunk(done, states, metrics):
        n = np.shape(metrics["loss"])[1]
        now = time.perf_counter()
        rate = n * n_images / max(now - clock["t"], 1e-9)
        clock["t"] = now
        for r, run in enumerate(runs):
            for j in range(n):
                epoch = done - n + j
                curves.write(run, epoch, {
                    **{f"train/{k}": float(metrics[k][r, j])
                       for k in ("loss", "task", "front", "rear", "acc") if k in metrics},
                    **({"train/lr": lr_of(epoch)} if lr_of is not None else {})})
            curves.write(run, done - 1, {"train/images_per_second": rate})
        curves.flush()

    return on_chunk
