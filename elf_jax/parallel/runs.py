"""Independent runs side by side on the ``runs`` mesh axis, each data parallel on ``data``.

The repeats of the protocol (and the architectures of the cross pool) are independent
trainings. vmap over stacked parameters turns every convolution into a grouped convolution
(measured 1.5-3x slower than one repeat after another), so instead:

* **repeats** of one architecture: the states are stacked on a leading axis ``[R, ...]`` and
  split over the ``runs`` axis (``P("runs")``); each group of ``data`` devices runs its
  ``R / runs`` repeats one after another (``lax.map``), every step data parallel over its
  ``data`` devices. :func:`runs_step` / :class:`RunsEngine`.
* **architectures** (different parameter trees cannot be stacked): :func:`submeshes` cuts
  the mesh into one ``(1, data)`` mesh per ``runs`` index and :func:`assign_runs` deals the
  architectures out to them; JAX dispatches asynchronously, so programs on disjoint devices
  run at the same time.

The training set (synthetic images, labels, feature bank) lives on the devices ONCE per
engine: replicated, or with ``shard_bank`` split by rows over the ``data`` axis (padded to a
multiple of it), each device holding ``N / data`` rows. A step receives the global minibatch
as row indices ``[R, B]``; inside ``shard_map`` each device gathers the rows it owns (zeros
elsewhere) and a ``psum_scatter`` over ``data`` hands every device its ``B / data`` rows, so
no device ever holds the whole bank. With ``dsa="global"`` the images of the whole
minibatch are assembled (``psum``) and augmented with the same draw a single device would
make, then each device keeps its slice: results equal one device on the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from elf_jax.parallel.mesh import DATA, RUNS, ParallelConfig, data_size, runs_size
from elf_jax.parallel.wrappers import (_dsa_on, check_divisible, fold_key, global_augment,
                                       host_copy, replicate_global, with_bn_axis)

__all__ = ["runs_step", "RunsEngine", "submeshes", "assign_runs", "place_rows"]


# ----------------------------------------------------------------------------- data on devices
def place_rows(arrays: Mapping[str, Any], mesh: Mesh, shard: bool, dtypes: Optional[Mapping] = None):
    """Puts ``{name: [N, ...]}`` on ``mesh``: split by rows over ``data`` (zero-padded to a
    multiple of it) when ``shard``, else replicated. Returns ``(placed, n_rows)``."""
    dtypes = dict(dtypes or {})
    n = {int(np.shape(v)[0]) for v in arrays.values()}
    if len(n) != 1:
        raise ValueError(f"training arrays have different row counts: "
                         f"{ {k: np.shape(v) for k, v in arrays.items()} }")
    n = n.pop()
    nd = data_size(mesh)
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if k in dtypes:
            v = np.asarray(jnp.asarray(v, dtypes[k]))
        if shard:
            pad = (-n) % nd
            if pad:
                v = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
            out[k] = replicate_global(v, mesh, P(DATA))
        else:
            out[k] = replicate_global(v, mesh, P())
    return out, n


def _gather_part(local, idx, shard: bool):
    """This device's ``B / data`` rows of the global minibatch ``idx`` ``[B]``."""
    nd = lax.axis_size(DATA)
    i = lax.axis_index(DATA)
    b = idx.shape[0] // nd
    if not shard:
        return jnp.take(local, lax.dynamic_slice_in_dim(idx, i * b, b), axis=0)
    rows = _owned_rows(local, idx)
    return lax.psum_scatter(rows, DATA, scatter_dimension=0, tiled=True)


def _gather_full(local, idx, shard: bool):
    """All ``B`` rows of the global minibatch on every device."""
    if not shard:
        return jnp.take(local, idx, axis=0)
    return lax.psum(_owned_rows(local, idx), DATA)


def _owned_rows(local, idx):
    n_local = local.shape[0]
    li = idx - lax.axis_index(DATA) * n_local
    own = (li >= 0) & (li < n_local)
    rows = jnp.take(local, jnp.clip(li, 0, n_local - 1), axis=0)
    return jnp.where(own.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, jnp.zeros_like(rows))


# ----------------------------------------------------------------------------- the step
def runs_step(step_fn: Callable, mesh: Mesh, *, shard_data: bool, protocol=None,
              global_dsa: bool = False, donate: bool = False) -> Callable:
    """``f(states [R], data, idx [R, B], keys [R, 2]) -> (states, metrics [R])``, jitted.

    ``step_fn(state, batch, key, axis_name=...)`` is the per-device step (with
    ``global_dsa`` it must not augment: give it a protocol with ``dsa_strategy="none"`` and
    pass the real ``protocol`` here). ``R`` must be a multiple of the ``runs`` axis size.
    """
    nr = runs_size(mesh)

    def per_run(s, data, ix, k):
        nd = lax.axis_size(DATA)
        b = ix.shape[0] // nd
        batch = {}
        for name, local in data.items():
            if name == "images" and global_dsa:
                full = _gather_full(local, ix, shard_data)
                full = global_augment({"images": full}, k, protocol)["images"]
                batch[name] = lax.dynamic_slice_in_dim(full, lax.axis_index(DATA) * b, b)
            else:
                batch[name] = _gather_part(local, ix, shard_data)
        if "features" in batch:
            batch["features"] = batch["features"].astype(jnp.float32)
        return step_fn(s, batch, fold_key(k, DATA), axis_name=DATA)

    def body(states, data, idx, keys):
        return lax.map(lambda a: per_run(a[0], data, a[1], a[2]), (states, idx, keys))

    dspec = P(DATA) if shard_data else P()
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(RUNS), dspec, P(RUNS), P(RUNS)),
                       out_specs=(P(RUNS), P(RUNS)), check_vma=False)

    def checked(states, data, idx, keys):
        if idx.shape[0] % nr:
            raise ValueError(f"{idx.shape[0]} runs do not divide over the {nr} groups of the "
                             "'runs' mesh axis")
        check_divisible(idx.shape[1], data_size(mesh))
        return fn(states, data, idx, keys)

    return jax.jit(checked, donate_argnums=(0,) if donate else ())


class RunsEngine:
    """``R`` independent runs of one network on a ``(runs, data)`` mesh (see module doc).

    ``net`` as built for one device; ``dsa``, ``sync_bn``, ``shard_bank``, ``bank_dtype`` from
    the :class:`ParallelConfig`. ``step_fn`` defaults to ``elf_jax.train.step.train_step``.
    """

    def __init__(self, net, protocol, config: Any, mesh: Mesh, *, step_fn=None, donate=True):
        from elf_jax.train.step import train_step

        pc = config if isinstance(config, ParallelConfig) else ParallelConfig.from_config(config)
        self.config, self.mesh, self.protocol = pc, mesh, protocol
        self.net_single = with_bn_axis(net, None)
        self.net = with_bn_axis(net, DATA) if pc.sync_bn else self.net_single
        self.global_dsa = pc.dsa == "global" and _dsa_on(protocol)
        step_protocol = protocol.replace(dsa_strategy="none") if self.global_dsa else protocol
        fn = functools.partial(step_fn or train_step, net=self.net, protocol=step_protocol)
        self.n_runs, self.n_data = runs_size(mesh), data_size(mesh)
        self._step = runs_step(fn, mesh, shard_data=pc.shard_bank, protocol=protocol,
                               global_dsa=self.global_dsa, donate=donate)
        self.data = None
        self.n = 0

    def put_data(self, images, labels, features=None):
        arrays = {"images": images, "labels": labels}
        dtypes = {"images": jnp.float32}
        if features is not None:
            arrays["features"] = features
            dtypes["features"] = jnp.bfloat16 if self.config.bank_dtype == "bfloat16" else jnp.float32
        self.data, self.n = place_rows(arrays, self.mesh, self.config.shard_bank, dtypes)
        return self.data

    def put_states(self, stacked):
        r = int(np.shape(jax.tree.leaves(stacked)[0])[0])
        if r % self.n_runs:
            raise ValueError(f"{r} repeats do not divide over the {self.n_runs} groups of the "
                             f"'runs' mesh axis; use a number of repeats that is a multiple of "
                             f"{self.n_runs} or parallel.runs dividing {r}")
        return replicate_global(stacked, self.mesh, P(RUNS))

    def put_indices(self, idx, keys):
        return (replicate_global(np.asarray(idx, np.int32), self.mesh, P(RUNS)),
                replicate_global(np.asarray(keys, np.uint32), self.mesh, P(RUNS)))

    def get_states(self, placed):
        return host_copy(placed)

    def step(self, states, idx, keys):
        if self.data is None:
            raise ValueError("RunsEngine.step before put_data")
        return self._step(states, self.data, idx, keys)


# ----------------------------------------------------------------------------- architectures
def submeshes(mesh: Mesh) -> list:
    """One ``(1, data)`` mesh per index of the ``runs`` axis (disjoint devices)."""
    devs = np.asarray(mesh.devices).reshape(runs_size(mesh), data_size(mesh))
    return [Mesh(devs[i : i + 1], (RUNS, DATA), axis_types=mesh.axis_types)
            for i in range(devs.shape[0])]


def assign_runs(items: Sequence[Any], mesh: Mesh) -> list:
    """``[(item, submesh)]``: the items (e.g. architecture names) dealt round-robin to the
    sub-meshes of the ``runs`` axis; items on different sub-meshes can run concurrently."""
    subs = submeshes(mesh)
    return [(it, subs[i % len(subs)]) for i, it in enumerate(items)]
