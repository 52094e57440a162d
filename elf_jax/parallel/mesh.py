"""Device meshes with the axes ``("runs", "data")`` and the ``parallel`` config section.

* ``data``: data parallelism. The global minibatch is split over this axis, gradients,
  metrics and BatchNorm running statistics are averaged over it (``pmean``), and with
  ``sync_bn`` the BatchNorm batch moments too (the model's ``bn_axis_name`` hook).
* ``runs``: independent runs (repeats of the protocol, or different architectures) side by
  side, one group of ``data`` devices each (see :mod:`elf_jax.parallel.placement`).

``make_mesh(runs=1, data=0)`` builds a ``jax.sharding.Mesh`` of shape ``(runs, data)`` over
all devices (``data=0``: all devices not taken by ``runs``) with ``AxisType.Auto`` axes (so
that jit may reshard arrays automatically), and raises ``ValueError`` naming the numbers when
the requested shape does not match the devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

__all__ = [
    "DATA", "RUNS", "PARALLEL_MODES", "DSA_PLACEMENTS", "ParallelConfig", "make_mesh",
    "data_size", "runs_size",
]

DATA = "data"
RUNS = "runs"
PARALLEL_MODES = ("none", "pmap", "shard_map")
DSA_PLACEMENTS = ("global", "per_device")
BANK_DTYPES = ("float32", "bfloat16")


def _get(cfg, key, default):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        v = cfg.get(key, default)
    else:
        v = getattr(cfg, key, default)
    return default if v is None else v


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The ``parallel`` section of a config (every field has the default shown).

    Attributes:
      parallel: ``"none"`` (one device, plain ``jit``) or ``"shard_map"`` (``jax.shard_map``
        over a mesh: the placement the training engine takes); ``"pmap"`` (``jax.pmap`` over
        the local devices, axis ``data``) only for single steps (``DataParallel``).
      runs: size of the ``runs`` mesh axis (independent repeats/architectures side by side).
      data: size of the ``data`` axis; 0 = all devices left (``device_count // runs``).
      sync_bn: BatchNorm batch moments averaged over the ``data`` axis (synchronized BN: the
        result equals one device on the global batch). False: per-device moments, as PyTorch
        ``DataParallel``; the running statistics are averaged over devices in both cases.
      dsa: ``"global"``: the DSA draw is made once for the GLOBAL minibatch (one group per
        minibatch, per-sample parameters over all of it: the reference's semantics, and the
        same numbers as one device); ``"per_device"``: every device draws its own group and
        parameters for its shard inside the step (key folded with the device index).
      drop_remainder: a last partial minibatch whose size does not divide over the ``data``
        devices is dropped (True) or is an error (False). The reference keeps it.
      bank_dtype: storage dtype of the feature bank on the devices (``"bfloat16"`` halves
        it; the step casts features to the compute dtype).
      shard_bank: store the synthetic images and the feature bank split over the ``data``
        devices (1/data of it per device) instead of a full copy on each.
      memory_headroom: fraction of a device's memory the estimate may use.
    """

    parallel: str = "none"
    runs: int = 1
    data: int = 0
    sync_bn: bool = True
    dsa: str = "global"
    drop_remainder: bool = False
    bank_dtype: str = "float32"
    shard_bank: bool = True
    memory_headroom: float = 0.9

    def __post_init__(self):
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r}: choose one of {PARALLEL_MODES}")
        if self.dsa not in DSA_PLACEMENTS:
            raise ValueError(f"parallel.dsa={self.dsa!r}: choose one of {DSA_PLACEMENTS}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ValueError(f"parallel.bank_dtype={self.bank_dtype!r}: choose one of {BANK_DTYPES}")
        if int(self.runs) < 1:
            raise ValueError(f"parallel.runs must be >= 1, got {self.runs}")
        if int(self.data) < 0:
            raise ValueError(f"parallel.data must be >= 0 (0 = all devices), got {self.data}")
        if self.parallel == "pmap" and int(self.runs) != 1:
            raise ValueError("parallel='pmap' has one axis ('data'); a 'runs' axis needs "
                             "parallel='shard_map'")

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides) -> "ParallelConfig":
        """From a config (its ``parallel`` section, or a ``parallel`` string with the other
        fields beside it) or a dict; ``None`` gives the defaults."""
        sec = cfg
        if cfg is not None and not isinstance(cfg, str):
            p = _get(cfg, "parallel", None)
            if p is not None and not isinstance(p, str):
                sec = p  # a nested section
        if isinstance(sec, str):
            sec = {"parallel": sec}
        kw = {}
        for f in dataclasses.fields(cls):
            v = _get(sec, f.name, None)
            if v is not None:
                kw[f.name] = v
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw) -> "ParallelConfig":
        return dataclasses.replace(self, **kw)


def make_mesh(runs: int = 1, data: int = 0, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``(runs, data)`` mesh with axes ``("runs", "data")`` over ``devices`` (default: all
    devices of all processes). ``data=0`` takes every device not used by ``runs``.

    Raises ``ValueError`` when the shape does not match the devices.
    """
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    runs, data = int(runs), int(data)
    if n == 0:
        raise ValueError("make_mesh: no devices given")
    if runs < 1 or data < 0:
        raise ValueError(f"make_mesh: runs must be >= 1 and data >= 0, got runs={runs}, data={data}")
    if data == 0:
        if n % runs:
            raise ValueError(
                f"mesh runs={runs} does not divide the {n} available devices; choose runs from "
                f"{[d for d in range(1, n + 1) if n % d == 0]} or set parallel.data explicitly")
        data = n // runs
    if runs * data != n:
        hint = (f"use runs*data == {n}, e.g. runs=1, data={n}" if runs * data > n else
                f"use runs*data == {n}, or pass devices=jax.devices()[:{runs * data}]")
        raise ValueError(
            f"mesh (runs={runs}, data={data}) needs {runs * data} devices but {n} "
            f"{'are' if n != 1 else 'is'} available ({jax.default_backend()}, "
            f"{jax.process_count()} process(es)); {hint}")
    if devices is None and jax.process_count() == 1:
        return jax.make_mesh((runs, data), (RUNS, DATA), axis_types=(AxisType.Auto,) * 2)
    if devices is None:  # several processes: process-major, so that each process's devices
        # hold one contiguous slice of the global batch (its own shard of the data)
        devs = sorted(devs, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devs, dtype=object).reshape(runs, data), (RUNS, DATA),
                axis_types=(AxisType.Auto,) * 2)


def data_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA]) if DATA in mesh.shape else 1


def runs_size(mesh: Mesh) -> int:
    return int(mesh.shape[RUNS]) if RUNS in mesh.shape else 1
