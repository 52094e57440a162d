"""Placement: meshes, where runs and data go, multi-host start-up, memory estimates.

No training loop lives here: the one engine (``elf_jax.train.runner.fit``) compiles its chunk
for a :class:`~elf_jax.parallel.placement.Placement`.

* :mod:`~elf_jax.parallel.mesh`: ``("runs", "data")`` meshes, the ``parallel`` config section.
* :mod:`~elf_jax.parallel.placement`: runs and the training set on a mesh; minibatch gathers
  inside ``shard_map``.
* :mod:`~elf_jax.parallel.collectives`: rows per device, per-device keys, synchronized
  BatchNorm, values placed from every process, host copies gathered over processes.
* :mod:`~elf_jax.parallel.distributed`: ``jax.distributed`` from config or environment.
* :mod:`~elf_jax.parallel.memory`: memory estimate for large synthetic sets and banks.
"""

from elf_jax.parallel.collectives import check_divisible, with_bn_axis  # noqa: F401
from elf_jax.parallel.mesh import (DATA, PARALLEL_MODES, RUNS, ParallelConfig, data_size,  # noqa: F401
                                   make_mesh, runs_size)
from elf_jax.parallel.placement import Placement  # noqa: F401
