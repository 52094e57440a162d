"""Several processes (hosts): ``jax.distributed.initialize`` from a config or the environment.

``initialize(cfg)`` reads, in this order: the config's ``distributed`` section
(``coordinator_address``, ``num_processes``, ``process_id``, ``local_device_ids``), then the
environment (``ELF_JAX_COORDINATOR``, ``ELF_JAX_NUM_PROCESSES``, ``ELF_JAX_PROCESS_ID``), then
JAX's own cluster detection (SLURM, Open MPI, TPU pods, ...) when ``auto=True``. One process
(nothing set) is a no-op. Afterwards the process count is checked against the request.

Each process then reads ITS shard of the data: ``elf_jax.data.make_loader`` shards by
``jax.process_index()`` of ``jax.process_count()`` by default, with a per-process batch of
``global_batch / process_count`` (:func:`local_batch_size`); ``DataParallel.put_batch`` and
``jax.make_array_from_process_local_data`` assemble the global batch on a process-major
mesh (``elf_jax.parallel.make_mesh``), process ``p`` holding rows ``[p*b, (p+1)*b)``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax

__all__ = ["initialize", "check_process_count", "local_batch_size", "settings_from"]

ENV = {"coordinator_address": "ELF_JAX_COORDINATOR", "num_processes": "ELF_JAX_NUM_PROCESSES",
       "process_id": "ELF_JAX_PROCESS_ID"}


def _get(cfg, key):
    if cfg is None:
        return None
    v = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return None if v in ("", None) else v


def settings_from(cfg: Any = None, environ=None) -> dict:
    """The ``jax.distributed.initialize`` arguments from a config section and/or environment."""
    environ = os.environ if environ is None else environ
    sec = _get(cfg, "distributed") if cfg is not None and _get(cfg, "distributed") is not None else cfg
    out = {}
    for k, env in ENV.items():
        v = _get(sec, k)
        if v is None and environ.get(env, "") != "":
            v = environ[env]
        if v is not None and k != "coordinator_address" and int(v) < (1 if k == "num_processes" else 0):
            v = None  # 0 processes / negative id: unset (config placeholders)
        if v is not None:
            out[k] = str(v) if k == "coordinator_address" else int(v)
    ldi = _get(sec, "local_device_ids")
    if ldi is not None:
        out["local_device_ids"] = list(ldi) if not isinstance(ldi, int) else ldi
    return out


def check_process_count(expected: Optional[int]) -> int:
    """``ValueError`` when ``jax.process_count()`` is not ``expected`` (None: no check)."""
    n = jax.process_count()
    if expected is not None and int(expected) != n:
        raise ValueError(
            f"expected {int(expected)} processes but JAX runs {n}: start {int(expected)} "
            f"processes with the same coordinator_address and process_id 0..{int(expected) - 1}, "
            f"or set distributed.num_processes={n}")
    return n


def initialize(cfg: Any = None, *, auto: bool = False, environ=None, **kw) -> dict:
    """Starts ``jax.distributed`` if the config/environment/keywords ask for it.

    Returns ``{"process_index", "process_count", "local_devices", "devices", "initialized"}``.
    ``ValueError`` for an incomplete setting (a coordinator without the process count, an id
    out of range) or when the resulting process count differs from ``num_processes``.
    """
    s = settings_from(cfg, environ)
    s.update({k: v for k, v in kw.items() if v is not None})
    n = s.get("num_processes")
    started = False
    if s.get("coordinator_address") or (n is not None and int(n) > 1):
        missing = [k for k in ("coordinator_address", "num_processes", "process_id") if k not in s]
        if missing:
            raise ValueError(
                f"distributed settings incomplete: {missing} missing (given {s}); set them in the "
                f"config's distributed section or as {[ENV[k] for k in missing]}")
        if not 0 <= int(s["process_id"]) < int(n):
            raise ValueError(f"distributed.process_id={s['process_id']} not in [0, {n})")
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(**s)
            started = True
    elif auto and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        started = True
    check_process_count(n)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "initialized": started or jax.distributed.is_initialized()}


def local_batch_size(global_batch: int, process_count: Optional[int] = None) -> int:
    """Rows each process reads: ``global_batch / process_count`` (``ValueError`` if uneven)."""
    p = jax.process_count() if process_count is None else int(process_count)
    if global_batch % p:
        raise ValueError(f"global batch {global_batch} does not divide over {p} processes; use a "
                         f"multiple of {p}")
    return global_batch // p
