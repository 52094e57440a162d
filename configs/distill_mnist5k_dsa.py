"""DSA on MNIST-5k, IPC 10: the CPU setting for DSA.

Runs on the embedded real MNIST-5k subset (offline) in minutes on a 2-core CPU: ConvNet
width 32, IPC 10, CPU-sized settings: fewer iterations than the reference; loops (outer 5, inner 5) instead of (10, 50), batch_real 64.
The same settings as experiments/distill_vs_random.py.

Command:
    elf-jax distill --config configs/distill_mnist5k_dsa.py --workdir runs/dsa_mnist5k
The whole ELF pipeline on this set:
``elf-jax all --config configs/distill_mnist5k_dsa.py --workdir ...``.

Expected: ~45 s of distillation on a 2-core CPU, measured 2026-11-26 (~15 s compile, then
2.9 s per iteration; was 43-75 s with rolled loops, docs/benchmarks_notes.md, Distillation), plus
the two evaluations; measured 92.70 +- 0.22 % vs 91.17 +- 0.29 % for a random real subset (300-epoch width-32 ConvNet evaluation, docs/benchmarks_notes.md, Distillation).
"""

from elf_jax.config import mnist5k_distill_config


def get_config():
    return mnist5k_distill_config("dsa")
