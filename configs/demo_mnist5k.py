"""The demo: the whole ELF pipeline on the embedded real MNIST-5k subset, offline.

Command (what `make demo` runs):
    elf-jax demo --workdir runs/demo
    elf-jax demo --config configs/demo_mnist5k.py --workdir runs/demo   # the same

What it does (install included, 2 cores: 3-4 minutes on an Intel Xeon, ~7 on an AMD EPYC):
holds 400 of the 4,000 real training images out as the validation split (10% of each class;
nothing in the demo is chosen on it, but nothing trains on it either), trains a width-32
ConvNet teacher on the other 3,600 for 8 epochs, distills an IPC-10 set with DM (200
iterations on a width-32 ConvNet), builds the teacher's feature bank, trains ConvNet /
ConvNetBN (width 32), an MLP, LeNet and a small ViT (dim 64, 2 blocks, split after the
first) on the set with the baseline loss and with ELF (100 epochs, 2 repeats), prints the
table and writes runs/demo/results.{json,md,png}. MLP, LeNet and ViT fronts differ in shape
from the teacher feature (4x4x32), so each learns through an adapter
(elf_jax.models.adapter).

Measured (2026-12-07, Intel Xeon, 2 cores, seed 0; `make demo` in 3 min 1 s, the .venv
already installed): teacher 94.2%; baseline -> ELF: ConvNet 91.25 -> 90.95, ConvNetBN 90.45
-> 90.25, MLP 79.55 -> 77.75, LeNet 57.05 -> 64.00, ViT 27.60 -> 30.15 (before the
validation split, 2026-12-02, the teacher and the set saw all 4,000 images: ConvNet 91.85 ->
91.80, LeNet 54.70 -> 57.70). So on MNIST-5k a cross-architecture gap exists (the DM set
transfers poorly to LeNet and the ViT at this lr and length), and with 2 repeats no ELF gain
is distinguishable from zero (every 95% interval spans it; the table shows them). Five
repeats of 50 epochs instead (`--config.eval.repeats=5 --config.eval.epochs=50`, the same
machine) took 128 s of evaluation against 100 s, with undertrained nets (ConvNet 85.0%).
The full-size run is configs/cifar10_cross.py (ConvNetW512 teacher for 200 epochs, the
six-network cross pool, 1000 epochs x 5 repeats).
"""

from elf_jax.config import demo_config


def get_config():
    return demo_config()
