"""ELF on ImageNet-1k at 64x64 (imagenet_resized/64x64) with the 64x64 splits.

Command (imagenet_resized/64x64 prepared by TFDS):
    elf-jax demo --config configs/imagenet64.py --workdir runs/imagenet64

IPC 10 means 10,000 synthetic images; banks are large (4x4x512 floats per image), see
the memory estimate printed before evaluation. Expected: ELF gains on ResNet18ImageNet.
"""

from elf_jax.config import imagenet64_config


def get_config():
    return imagenet64_config()
