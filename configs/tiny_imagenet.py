"""ELF on Tiny ImageNet (64x64, 200 classes) with the 64x64 splits.

Command (put the downloaded tiny-imagenet-200 archive in TFDS's manual dir first; the
loader's error message says where):
    elf-jax demo --config configs/tiny_imagenet.py --workdir runs/tiny

Pool: ConvNetD4 (front 4x4x128, teacher ConvNetD4 width 128), ResNet18ImageNet (front
4x4x256, teacher ConvNetD4W256), VGG11ImageNet (front 4x4x512, teacher ConvNetD4W512).
Expected: ELF gains on ResNet18ImageNet/VGG11ImageNet for MTT/DM sets (paper).
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "tiny_imagenet"
    c.teacher.arch = "ConvNetD4W512"
    c.synset.arch = "ConvNetD4"
    c.eval.pool = ("ConvNetD4", "ResNet18ImageNet", "VGG11ImageNet")
    return c
