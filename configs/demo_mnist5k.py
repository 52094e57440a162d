"""The demo: the whole ELF pipeline on the embedded real MNIST-5k subset, offline.

Command (what `make demo` runs):
    elf-jax demo --workdir runs/demo
    elf-jax demo --config configs/demo_mnist5k.py --workdir runs/demo   # the same

What it does (install included, 2 cores: 3-4 minutes on an Intel Xeon, ~7 on an AMD EPYC):
trains a width-32 ConvNet teacher on the 4,000 real training images for 8 epochs, distills
an IPC-10 set with DM (200 iterations on a width-32 ConvNet), builds the teacher's feature
bank, trains ConvNet / ConvNetBN (width 32), an MLP, LeNet and a small ViT (dim 64, 2
blocks, split after the first) on the set with the baseline loss and with ELF (100 epochs, 2
repeats), prints the table and writes runs/demo/results.{json,md,png}. MLP, LeNet and ViT
fronts differ in shape from the teacher feature (4x4x32), so each learns through an adapter
(elf_jax.models.adapter).

Measured (2026-12-02, Intel Xeon Sapphire Rapids, 2 cores, seed 0; `make demo` from a fresh
clone in 3 min 8 s): teacher 94.2%; baseline -> ELF: ConvNet 91.85 -> 91.80, ConvNetBN 91.70
-> 91.15, MLP 80.60 -> 79.60, LeNet 54.70 -> 57.70, ViT 26.65 -> 28.10 (the day before, with
XLA's YNNPACK convolutions and the reshape-mean pooling, which sum in other orders: ConvNet
91.90 -> 91.85, LeNet 54.00 -> 58.45). So on MNIST-5k a cross-architecture gap exists (the
DM set transfers poorly to LeNet and the ViT at this lr and length), and with 2 repeats no
ELF gain is distinguishable from zero (every 95% interval spans it; the table shows them).
The full-size run is configs/cifar10_cross.py (ConvNetW512 teacher for 200 epochs, the
six-network cross pool, 1000 epochs x 5 repeats).
"""

from elf_jax.config import demo_config


def get_config():
    return demo_config()
