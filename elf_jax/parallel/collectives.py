"""Collectives and placement helpers of data parallelism: rows per device, per-device keys,
synchronized BatchNorm, values placed on a mesh from every process, host copies gathered
over processes. The engine (`elf_jax.train.runner`) and the placement use them; no step
or training loop lives here."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from elf_jax.keys import typed_key
from elf_jax.parallel.mesh import DATA

__all__ = ["check_divisible", "fold_key", "with_bn_axis", "replicate_global", "host_copy"]


def check_divisible(global_batch: int, n: int, what: str = "global batch") -> int:
    """Rows per device; ``ValueError`` when ``global_batch`` does not divide over ``n``."""
    global_batch, n = int(global_batch), int(n)
    if n < 1:
        raise ValueError(f"device count must be >= 1, got {n}")
    if global_batch % n:
        lo = (global_batch // n) * n
        hi = lo + n
        raise ValueError(
            f"{what} of {global_batch} rows does not divide over the {n} devices of the 'data' "
            f"axis ({global_batch / n:.2f} per device); use a batch that is a multiple of {n} "
            f"(e.g. {lo or hi} or {hi}), or change the number of devices (parallel.data)")
    return global_batch // n


def fold_key(key, axis_name: str = DATA):
    """``fold_in(key, axis_index(axis_name))`` as raw key data (inside pmap/shard_map)."""
    return jax.random.key_data(jax.random.fold_in(typed_key(key), lax.axis_index(axis_name)))


def with_bn_axis(net, axis_name: Optional[str] = DATA):
    """``net`` with its BatchNorm layers synchronized over ``axis_name`` (the model zoo's
    ``bn_axis_name`` hook; a no-op for nets without it)."""
    if hasattr(net, "bn_axis_name") and getattr(net, "bn_axis_name") != axis_name:
        return net.clone(bn_axis_name=axis_name)
    return net


def replicate_global(tree, mesh, spec=P()):
    """Places host values on ``mesh`` with ``spec`` (works with several processes: every
    process passes the same full value)."""
    def put(x):
        x = np.asarray(x)
        sh = NamedSharding(mesh, spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def host_copy(tree):
    """Numpy copy of a pytree of arrays; arrays spread over several processes are gathered
    first. The local copies are started together (one ``device_get``), not leaf by leaf."""
    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return x.addressable_data(0)
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(np.asarray, jax.device_get(jax.tree.map(local, tree)))
