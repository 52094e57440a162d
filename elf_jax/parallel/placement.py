"""Where the training engine's runs execute: one device, or a ``("runs", "data")`` mesh.

:class:`Placement` is a hashable description (mesh + the ``parallel`` config section) that
the engine (:mod:`elf_jax.train.runner`) compiles its chunk for. On a mesh:

* the stacked states of ``R`` runs are split over ``runs`` (``P("runs")``); each group of
  ``data`` devices trains its ``R / runs`` runs, every step data parallel over ``data``;
* the training set lives on the devices once: replicated, or with ``shard_bank`` split by
  rows over ``data`` (zero-padded to a multiple of it). A step receives the global minibatch
  as row indices; each device gathers the rows it owns (zeros elsewhere) and a
  ``psum_scatter`` hands every device its ``B / data`` rows (:func:`local_rows`), so no
  device ever holds the whole bank;
* with ``dsa="global"`` the images of the whole minibatch are assembled (``psum``) and
  augmented with the draw one device would make, then each device keeps its slice
  (:func:`global_rows`): the result equals one device on the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from elf_jax.parallel.mesh import DATA, RUNS, ParallelConfig, data_size, make_mesh, runs_size
from elf_jax.parallel.collectives import replicate_global

__all__ = ["Placement", "place_rows", "local_rows", "global_rows"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """``mesh=None``: one device. Otherwise runs on ``mesh`` as ``config`` says (sync BN,
    where the DSA draw is made, bank sharding and dtype, last-batch policy)."""

    mesh: Optional[Mesh] = None
    config: ParallelConfig = ParallelConfig()

    @classmethod
    def of(cls, parallel: Any = None, mesh: Optional[Mesh] = None) -> "Placement":
        """From a ``ParallelConfig``, a config section, a mode string or None (one device)."""
        if isinstance(parallel, Placement):
            return parallel
        pc = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig.from_config(parallel)
        if pc.parallel == "pmap":
            raise ValueError("parallel='pmap' is not a placement of the training engine: use "
                             "parallel='shard_map' (the same per-device step; "
                             "elf_jax.parallel.pmap_step keeps jax.pmap for single steps)")
        if pc.parallel == "none":
            return cls(None, pc)
        return cls(mesh if mesh is not None else make_mesh(pc.runs, pc.data), pc)

    @classmethod
    def repeats_over_devices(cls) -> "Placement":
        """Every device its share of the repeats, each run on one device."""
        return cls.of(ParallelConfig(parallel="shard_map", runs=jax.device_count(), data=1))

    @property
    def n_runs(self) -> int:
        return 1 if self.mesh is None else runs_size(self.mesh)

    @property
    def n_data(self) -> int:
        return 1 if self.mesh is None else data_size(self.mesh)

    @property
    def shard_data(self) -> bool:
        return self.mesh is not None and self.n_data > 1 and self.config.shard_bank

    def describe(self) -> str:
        return "one device" if self.mesh is None else f"mesh runs={self.n_runs} x data={self.n_data}"

    def put(self, tree, spec=P()):
        """Host values onto the mesh with ``spec`` (every process passes the full value)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return replicate_global(tree, self.mesh, spec)

    def put_runs(self, stacked):
        """Stacked run states ``[R, ...]`` split over the ``runs`` axis."""
        r = int(np.shape(jax.tree.leaves(stacked)[0])[0])
        if r % self.n_runs:
            raise ValueError(f"{r} repeats do not divide over the {self.n_runs} groups of the "
                             f"'runs' mesh axis; use a number of repeats that is a multiple of "
                             f"{self.n_runs} or parallel.runs dividing {r}")
        return self.put(stacked, P(RUNS) if self.mesh is not None else P())


def place_rows(arrays: Mapping[str, Any], placement: Placement, dtypes: Optional[Mapping] = None):
    """``{name: [N, ...]}`` on the placement: split by rows over ``data`` (zero-padded to a
    multiple of it) when ``placement.shard_data``, else replicated."""
    dtypes = dict(dtypes or {})
    out = {}
    for k, v in arrays.items():
        v = np.asarray(jnp.asarray(v, dtypes[k])) if k in dtypes else np.asarray(v)
        if placement.shard_data:
            pad = (-v.shape[0]) % placement.n_data
            if pad:
                v = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
            out[k] = placement.put(v, P(DATA))
        else:
            out[k] = placement.put(v, P())
    return out


# ----------------------------------------------------------------------- inside shard_map
def _owned_rows(local, idx):
    n_local = local.shape[0]
    li = idx - lax.axis_index(DATA) * n_local
    own = (li >= 0) & (li < n_local)
    rows = jnp.take(local, jnp.clip(li, 0, n_local - 1), axis=0)
    return jnp.where(own.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, jnp.zeros_like(rows))


def local_rows(local, idx, sharded: bool):
    """This device's ``B / data`` rows of the global minibatch ``idx`` ``[B]``."""
    if not sharded:
        b = idx.shape[0] // lax.axis_size(DATA)
        return jnp.take(local, lax.dynamic_slice_in_dim(idx, lax.axis_index(DATA) * b, b), axis=0)
    return lax.psum_scatter(_owned_rows(local, idx), DATA, scatter_dimension=0, tiled=True)


def global_rows(local, idx, sharded: bool):
    """All ``B`` rows of the global minibatch on every device."""
    if not sharded:
        return jnp.take(local, idx, axis=0)
    return lax.psum(_owned_rows(local, idx), DATA)
