"""ELF on ImageNet-1k at 64x64 (imagenet_resized/64x64) with the 64x64 splits.

Command (imagenet_resized/64x64 prepared by TFDS):
    elf-jax all --config configs/imagenet64.py --workdir runs/imagenet64
bfloat16 compute instead of the reference's float32 (faster on GPUs, other numbers):
    elf-jax all --config configs/imagenet64.py --workdir runs/imagenet64_bf16 \
        --config.dtype=bfloat16

Settings (`elf_jax.config.imagenet64_config`; docs/REFERENCE.md lists what is the
reference's and what is ours): the reference's `cross_imagenet` pool (ConvNetD4,
ResNet18ImageNet, VGG11ImageNet and their BatchNorm variants), teachers of the front widths
(ConvNetD4 width 128 / 256 / 512) trained 200 epochs at lr 0.01, features of snapshot 100
(our reading: the reference does not state it), float32. The reference resizes the full
ImageNet with torchvision; TFDS's imagenet_resized images are not the same pixels.

IPC 10 means 10,000 synthetic images; banks are large (4x4x512 floats per image), see
the memory estimate printed before evaluation. Expected: ELF gains on ResNet18ImageNet.

Data (`data_mode=auto`): the train split (1,281,167 images: 63 GB as float32, 15.7 GB as
uint8) and the validation split (50,000: 2.5 GB) are streamed from their array_record files
(README, "Real data larger than memory"). Memory per host, measured parts and arithmetic:
the labels and one epoch's permutation (5 MB each); the teacher's read-ahead, at most five
groups of 8 x 256 uint8 images (126 MB) on the GPU engine; the test passes one batch of 500
ahead (6 MB); a DM draw (batch_real x 1000 classes: 256,000 images, 12.6 GB as float32) is on
the DEVICE, read through the host in slices of 4,096 rows (50 MB); the synthetic set (IPC 10:
490 MB as float32) and its banks (328 MB per 4x4x512 teacher) in memory; plus the framework
(about 1 GB for the pipeline on the stand-in of tests/test_memory_cap.py, which runs this
config shrunk, streamed, under a memory cap). In memory (`data_mode=memory`) the same run
would need over 63 GB per host.

Wall time per teacher epoch (5,005 steps of 256): about 82 h on the 2-core Intel Sapphire
Rapids CPU this project is developed on (58.8 s per step, benchmarks/bench_input.py,
docs/benchmarks_notes.md); on a GPU not measured yet.
"""

from elf_jax.config import imagenet64_config


def get_config():
    return imagenet64_config()
