"""Data-parallel and multi-run execution of the per-device train step (issue 6).

* :mod:`~elf_jax.parallel.mesh`: ``("runs", "data")`` meshes, the ``parallel`` config section.
* :mod:`~elf_jax.parallel.wrappers`: ``pmap_step``, ``shard_map_step``, ``DataParallel``.
* :mod:`~elf_jax.parallel.runs`: independent repeats on the ``runs`` axis, architectures on
  sub-meshes.
* :mod:`~elf_jax.parallel.loop`: epochs of data-parallel evaluation training.
* :mod:`~elf_jax.parallel.evaluate`: the cross-architecture evaluation with data-parallel steps
  (the pipeline's evaluation stage when ``config.parallel`` is ``pmap``/``shard_map``).
* :mod:`~elf_jax.parallel.distributed`: ``jax.distributed`` from config or environment.
* :mod:`~elf_jax.parallel.memory`: memory estimate for large synthetic sets and banks.
"""

from elf_jax.parallel.mesh import (DATA, PARALLEL_MODES, RUNS, ParallelConfig, data_size,  # noqa: F401
                                   make_mesh, mesh_from_config, runs_size)
from elf_jax.parallel.wrappers import (DataParallel, check_divisible, global_augment,  # noqa: F401
                                       pmap_step, shard_map_step, with_bn_axis)
