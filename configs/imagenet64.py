"""ELF on ImageNet-1k at 64x64 (imagenet_resized/64x64) with the 64x64 splits.

Command (imagenet_resized/64x64 prepared by TFDS):
    elf-jax demo --config configs/imagenet64.py --workdir runs/imagenet64
bfloat16 compute instead of the reference's float32 (faster on GPUs, other numbers):
    elf-jax demo --config configs/imagenet64.py --workdir runs/imagenet64_bf16 \
        --config.dtype=bfloat16

Settings (`elf_jax.config.imagenet64_config`; docs/REFERENCE.md lists what is the
reference's and what is ours): the reference's `cross_imagenet` pool (ConvNetD4,
ResNet18ImageNet, VGG11ImageNet and their BatchNorm variants), teachers of the front widths
(ConvNetD4 width 128 / 256 / 512) trained 200 epochs at lr 0.01, features of snapshot 100
(our reading: the reference does not state it), float32. The reference resizes the full
ImageNet with torchvision; TFDS's imagenet_resized images are not the same pixels.

IPC 10 means 10,000 synthetic images; banks are large (4x4x512 floats per image), see
the memory estimate printed before evaluation. Expected: ELF gains on ResNet18ImageNet.
"""

from elf_jax.config import imagenet64_config


def get_config():
    return imagenet64_config()
