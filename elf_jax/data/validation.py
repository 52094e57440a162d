"""A validation split held out of the real training split, for every choice a run makes.

Choices read on the test split inflate what is then reported on it (the distillation's best
set, a sweep's lambdas). `hold_out` carves a class-balanced, seeded part of the training split
out: the rest trains the teacher, feeds the distillation and draws real subsets; the held-out
part judges; the test split is read for final results only.

* class-balanced: ``round(fraction * n_c)`` images of each class c, at least one where the
  class has two or more, never all of a class;
* seeded by ``seed`` alone (not the run's seed), so every run of a study holds out the
  same images;
* in memory both parts are `ArrayDataset` subsets; a streamed split stays streamed (a
  `StreamedSplit` over the file's rows of each part).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, NamedTuple, Optional

import numpy as np

from elf_jax.data.stream import is_streamed

__all__ = ["HeldOut", "hold_out", "validation_rows", "validation_settings"]

#: `config.validation.fraction`'s range: at most half of every class is held out.
MAX_FRACTION = 0.5
#: Share of each class of the real training split held out by default.
VALIDATION_FRACTION = 0.1


def validation_settings(config) -> tuple[float, int]:
    """``(fraction, seed)`` of a config's `validation` section; a config without one (a file
    not built on `base_config`) holds out the default share."""
    v = config.get("validation", None)
    if v is None:
        return VALIDATION_FRACTION, 0
    return float(v.get("fraction", VALIDATION_FRACTION)), int(v.get("seed", 0))


def validation_rows(labels: np.ndarray, num_classes: int, fraction: float,
                    seed: int) -> np.ndarray:
    """Sorted row indices of the validation part of a split with ``labels``: of each class,
    ``round(fraction * count)`` rows drawn without replacement (at least 1 of a class with
    2 or more rows, never all of them), by ``numpy``'s generator seeded with ``seed``."""
    if not 0.0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"validation fraction {fraction!r}: give a number in [0, {MAX_FRACTION}]")
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x7A11D])
    picked = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        n = min(max(int(round(fraction * len(rows))), 1 if fraction > 0 else 0), len(rows) - 1)
        if n > 0:
            picked.append(rng.choice(rows, size=n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


class HeldOut(NamedTuple):
    """A training split cut in two: ``train`` (the rest), ``validation`` (None when nothing
    is held out) and ``record``: what provenance keeps (fraction, seed, sizes, a hash of the
    held-out row indices)."""

    train: Any
    validation: Optional[Any]
    record: dict


def _part(split, rows: np.ndarray, name: str):
    if is_streamed(split):
        base = split.rows if split.rows is not None else np.arange(len(split))
        return dataclasses.replace(split, labels=split.labels[rows], rows=base[rows],
                                   part=name if name != split.split else "")
    return dataclasses.replace(split.subset(rows), split=name)


def hold_out(split, fraction: float, seed: int) -> HeldOut:
    """``split`` (a training split, in memory or streamed) cut into the rest and a
    validation part (`validation_rows`); ``fraction`` 0 keeps it whole."""
    rows = validation_rows(split.labels, split.num_classes, float(fraction), int(seed))
    record = {"fraction": float(fraction), "seed": int(seed), "size": int(rows.size),
              "train_size": int(len(split) - rows.size),
              "rows_sha256": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]}
    if not rows.size:
        return HeldOut(split, None, record)
    rest = np.setdiff1d(np.arange(len(split)), rows, assume_unique=True)
    return HeldOut(_part(split, rest, "train"), _part(split, rows, "validation"), record)
