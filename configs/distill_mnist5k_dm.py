"""DM on MNIST-5k, IPC 10: the CPU setting for DM.

Runs on the embedded real MNIST-5k subset (offline) in minutes on a 2-core CPU: ConvNet
width 32, IPC 10, CPU-sized settings: fewer iterations than the reference.
The same settings as experiments/distill_vs_random.py.

Command:
    elf-jax distill --config configs/distill_mnist5k_dm.py --workdir runs/dm_mnist5k
The whole ELF pipeline on this set:
``elf-jax all --config configs/distill_mnist5k_dm.py --workdir ...``.

Expected: ~1 minute of distillation (4.8 it/s measured) plus two short evaluations; measured 93.23 +- 0.21 % vs 91.17 +- 0.29 % for a random real subset of the same size (docs/benchmarks_notes.md, Distillation).
"""

from elf_jax.config import mnist5k_distill_config


def get_config():
    return mnist5k_distill_config("dm")
