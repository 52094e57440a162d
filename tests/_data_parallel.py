"""The single-step data-parallel wrappers, kept for the tests and benchmarks/bench_scaling.py
(the engine, `elf_jax.train.runner.fit`, places its own programs): ONE per-device step,
three ways to run it: ``jit`` ("none"), ``jax.pmap`` and ``jax.shard_map`` over the ``data``
axis.

The per-device step is ``elf_jax.train.step.train_step(state, batch, key, *, net, protocol,
axis_name)`` (or any function with that calling convention): it computes the loss of its
shard and averages gradients, metrics and BatchNorm running statistics with
``lax.pmean(..., axis_name)``.

* :func:`pmap_step`: ``jax.pmap(axis_name="data")``; the state is replicated on a leading
  device axis, the batch is ``[n_devices, per_device, ...]``.
* :func:`shard_map_step`: ``jax.jit(jax.shard_map(...))`` over a mesh; the state is one
  replicated global array (``P()``), the batch a global array split on its first axis
  (``P("data")``). ``check_vma=False``: with the varying-manual-axes check on, JAX's
  autodiff already sums the gradient of a replicated parameter over the devices (the
  transpose of the implicit ``pvary`` is a ``psum``), and the step's own ``pmean`` would not
  undo that, so the gradient would be ``n_devices`` times the mean. Without the check the
  transposition rules are those of ``pmap`` (measured: identical parameters to ``pmap`` and
  to one device, see tests/test_parallel.py).
* :class:`DataParallel` puts it together from a ``parallel`` config section: synchronized
  or per-device BatchNorm, where the DSA draw is made (``dsa="global"``: once for the global
  batch, bit-compatible with one device; ``"per_device"``: inside each device's step),
  placement of states and batches (also from process-local data on several hosts).

Per-device keys: the step on device ``i`` gets ``fold_in(key, i)`` (independent dropout
masks and, with ``dsa="per_device"``, independent DSA draws).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from elf_jax.keys import raw_key
from elf_jax.parallel.collectives import (check_divisible, fold_key, host_copy, replicate_global,
                                          with_bn_axis)
from elf_jax.parallel.mesh import DATA, ParallelConfig, data_size, make_mesh, runs_size
from elf_jax.train.step import global_augment, train_step


def _dsa_on(protocol) -> bool:
    return getattr(protocol, "dsa_strategy", "none") not in ("", "none", None)


def _per_device(step_fn, axis_name, fold):
    def fn(state, batch, key):
        k = fold_key(key, axis_name) if fold else key
        return step_fn(state, batch, k, axis_name=axis_name)

    return fn


def pmap_step(step_fn: Callable, *, axis_name: str = DATA, devices=None, fold: bool = True,
              donate: bool = False) -> Callable:
    """``jax.pmap`` of the per-device ``step_fn(state, batch, key, axis_name=...)``.

    Returns ``f(states [n, ...], batch [n, b, ...], key) -> (states [n, ...], metrics [n])``;
    the key is broadcast (and folded with the device index when ``fold``).
    """
    return jax.pmap(_per_device(step_fn, axis_name, fold), axis_name=axis_name,
                    in_axes=(0, 0, None), devices=devices,
                    donate_argnums=(0,) if donate else ())


def shard_map_step(step_fn: Callable, mesh, *, axis_name: str = DATA, fold: bool = True,
                   donate: bool = False, pre: Optional[Callable] = None) -> Callable:
    """``jax.jit(jax.shard_map(step_fn))`` over ``mesh``'s ``axis_name`` axis.

    Returns ``f(state, batch, key) -> (state, metrics)`` on global arrays: ``state`` and the
    metrics replicated (``P()``), ``batch`` split on its first axis (``P(axis_name)``).
    ``pre(batch, key) -> batch`` (optional) runs on the global batch before the split
    (e.g. :func:`global_augment`), partitioned by the compiler.
    """
    if runs_size(mesh) > 1 and axis_name == DATA:
        raise ValueError(
            f"shard_map_step replicates one run over the whole mesh, but this mesh has "
            f"runs={runs_size(mesh)}; train several runs with the engine (elf_jax.train.runner.fit) on a placement, "
            "or a mesh with runs=1")
    body = jax.shard_map(_per_device(step_fn, axis_name, fold), mesh=mesh,
                         in_specs=(P(), P(axis_name), P()), out_specs=(P(), P()),
                         check_vma=False)
    batch_sharding = NamedSharding(mesh, P(axis_name))

    def fn(state, batch, key):
        if pre is not None:
            batch = pre(batch, key)
        batch = jax.tree.map(lambda x: lax.with_sharding_constraint(x, batch_sharding), batch)
        return body(state, batch, key)

    return jax.jit(fn, donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------- DataParallel
class DataParallel:
    """One training run, data parallel as the ``parallel`` config says.

    ::

        dp = DataParallel(net, protocol, ParallelConfig(parallel="shard_map"))
        state = dp.put_state(init_state(dp.net_single, protocol, k0, k1, x[:1]))
        for ...:
            state, metrics = dp.step(state, dp.put_batch(batch), key)
        final = dp.get_state(state)        # host copy, same layout as a one-device state

    ``net`` is the network as built for one device; with ``sync_bn`` and a parallel mode,
    ``dp.net`` is its clone with ``bn_axis_name="data"`` (initialize with either: the
    variables are the same). ``step_fn`` defaults to ``elf_jax.train.step.train_step``.
    ``batch`` given to :meth:`put_batch` is the global batch (one process) or this
    process's contiguous share of it (several processes, ``process_local=True``).
    """

    def __init__(self, net, protocol, config: Any = None, *, mesh=None, step_fn=None,
                 donate: bool = False):
        pc = config if isinstance(config, ParallelConfig) else ParallelConfig.from_config(config)
        self.config = pc
        self.mode = pc.parallel
        self.protocol = protocol
        self.net_single = with_bn_axis(net, None)
        self.net = with_bn_axis(net, DATA) if (pc.sync_bn and self.mode != "none") else self.net_single
        base = step_fn or train_step
        self.global_dsa = self.mode != "none" and pc.dsa == "global" and _dsa_on(protocol)
        step_protocol = protocol.replace(dsa_strategy="none") if self.global_dsa else protocol
        fn = functools.partial(base, net=self.net, protocol=step_protocol)
        pre = functools.partial(global_augment, protocol=protocol) if self.global_dsa else None
        self.mesh = None
        self.devices = None
        if self.mode == "none":
            self.n_data = 1
            single = functools.partial(base, net=self.net_single, protocol=protocol)
            self._step = jax.jit(lambda s, b, k: single(s, b, k), donate_argnums=(0,) if donate else ())
        elif self.mode == "pmap":
            if mesh is not None:
                if runs_size(mesh) != 1:
                    raise ValueError("parallel='pmap' takes a mesh with runs=1")
                self.devices = list(mesh.devices.reshape(-1))
            else:
                self.devices = jax.local_devices()[: pc.data] if pc.data else jax.local_devices()
                if pc.data and pc.data > jax.local_device_count():
                    raise ValueError(
                        f"parallel.data={pc.data} but this process has "
                        f"{jax.local_device_count()} devices")
            if jax.process_count() > 1 and self.global_dsa:
                raise ValueError("parallel='pmap' with several processes cannot draw the DSA of "
                                 "the global batch; use parallel='shard_map' or dsa='per_device'")
            multi = jax.process_count() > 1 and mesh is None and not pc.data
            self.n_data = jax.device_count() if multi else len(self.devices)
            self._pmapped = pmap_step(fn, devices=None if multi else self.devices, donate=donate)
            self._pre = jax.jit(pre) if pre is not None else None
        else:  # shard_map
            self.mesh = mesh if mesh is not None else make_mesh(
                1, pc.data, None if not pc.data else jax.devices()[: pc.data])
            self.n_data = data_size(self.mesh)
            self._step = shard_map_step(fn, self.mesh, donate=donate, pre=pre)

    # -- placement
    def put_state(self, state):
        if self.mode == "none":
            return state
        if self.mode == "pmap":
            n = len(self.devices)
            stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
            return jax.pmap(lambda x: x, devices=self.devices)(stacked)
        return replicate_global(state, self.mesh)

    def get_state(self, placed):
        if self.mode == "pmap":
            return jax.tree.map(lambda x: np.asarray(x[0]), placed)
        return host_copy(placed)

    def put_batch(self, batch: Mapping[str, Any], process_local: Optional[bool] = None):
        """Checks the batch size and places it (see the class docstring)."""
        if process_local is None:
            process_local = jax.process_count() > 1
        rows = {int(np.shape(v)[0]) for v in batch.values()}
        if len(rows) != 1:
            raise ValueError(f"batch arrays have different numbers of rows: "
                             f"{ {k: np.shape(v) for k, v in batch.items()} }")
        b = rows.pop()
        nproc = jax.process_count() if process_local else 1
        if self.mode == "none":
            if nproc > 1:
                raise ValueError("parallel='none' runs on one device: give the global batch")
            return {k: jnp.asarray(v) for k, v in batch.items()}
        check_divisible(b * nproc, self.n_data)
        if self.mode == "pmap":
            nl = len(self.devices)
            check_divisible(b, nl, "this process's batch")
            if self._pre is not None:  # augmented as one batch in step(), then split
                return {k: jnp.asarray(v) for k, v in batch.items()}
            return {k: np.asarray(v).reshape((nl, b // nl) + np.shape(v)[1:]) for k, v in batch.items()}
        sh = NamedSharding(self.mesh, P(DATA))
        if process_local and nproc > 1:
            return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
        return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}

    # -- the step
    def step(self, state, batch, key):
        """One data-parallel step; returns ``(state, metrics)`` (metrics: jax scalars)."""
        key = raw_key(key)
        if self.mode == "pmap":
            if self._pre is not None:
                nl = len(self.devices)
                g = self._pre(batch, key)
                batch = {k: jnp.reshape(v, (nl, v.shape[0] // nl) + v.shape[1:]) for k, v in g.items()}
            st, m = self._pmapped(state, batch, key)
            return st, jax.tree.map(lambda x: x[0], m)
        return self._step(state, batch, key)

    __call__ = step
