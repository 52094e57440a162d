"""ELF on ImageNet-1k at 64x64 (imagenet_resized/64x64) with the 64x64 splits.

Command (imagenet_resized/64x64 prepared by TFDS):
    elf-jax demo --config configs/imagenet64.py --workdir runs/imagenet64

IPC 10 means 10,000 synthetic images; banks are large (4x4x512 floats per image), see
the memory estimate printed before evaluation. Expected: ELF gains on ResNet18ImageNet.
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "imagenet_resized/64x64"
    c.teacher.arch = "ConvNetD4W512"
    c.teacher.epochs = 50
    c.teacher.feature_epoch = 25
    c.synset.arch = "ConvNetD4"
    c.eval.pool = ("ConvNetD4", "ResNet18ImageNet", "VGG11ImageNet")
    c.dtype = "bfloat16"
    return c
