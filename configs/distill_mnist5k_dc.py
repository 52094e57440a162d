"""DC on MNIST-5k, IPC 10: the CPU setting for DC.

Runs on the embedded real MNIST-5k subset (offline) in minutes on a 2-core CPU: ConvNet
width 32, IPC 10, CPU-sized settings: fewer iterations than the reference; loops (outer 5, inner 5) instead of (10, 50), batch_real 64.
The same settings as experiments/distill_vs_random.py.

Command:
    elf-jax distill --config configs/distill_mnist5k_dc.py --workdir runs/dc_mnist5k
The whole ELF pipeline on this set:
``elf-jax all --config configs/distill_mnist5k_dc.py --workdir ...``.

Expected: ~45 s of distillation on a 2-core CPU, measured 2026-11-26 (~13 s compile, then
2.9 s per iteration; was 43-75 s with rolled loops, docs/benchmarks_notes.md, Distillation), plus
the two evaluations (no augmentation while distilling, as DC).
"""

from elf_jax.config import mnist5k_distill_config


def get_config():
    return mnist5k_distill_config("dc")
