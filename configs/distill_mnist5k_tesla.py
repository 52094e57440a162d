"""TESLA on MNIST-5k, IPC 10: the CPU setting for TESLA.

Runs on the embedded real MNIST-5k subset (offline) in minutes on a 2-core CPU: ConvNet
width 32, IPC 10, CPU-sized settings: fewer iterations than the reference; 2 experts of 8 epochs, syn_steps 10, max_start_epoch 6.
The same settings as experiments/distill_vs_random.py.

Command:
    elf-jax distill --config configs/distill_mnist5k_tesla.py --workdir runs/tesla_mnist5k
The whole ELF pipeline on this set:
``elf-jax all --config configs/distill_mnist5k_tesla.py --workdir ...``.

Expected: ~6 minutes of distillation on a 2-core CPU, measured 2026-11-26: the 2 experts
(~2 minutes), ~25 s compile, then 2.2 s per iteration (100 iterations; was 26 s with
rolled student loops, docs/benchmarks_notes.md, Distillation); plus two short evaluations; memory
constant in syn_steps (docs/benchmarks_notes.md).
"""

from elf_jax.config import mnist5k_distill_config


def get_config():
    return mnist5k_distill_config("tesla")
