"""ELF on CIFAR-100 IPC 10, the ELF repository's setting (MTT set, ConvNetW512 teacher).

Command (CIFAR-100 prepared by TFDS; an MTT set from the PyTorch repository or ours):
    elf-jax all --config configs/cifar100_cross.py --workdir runs/cifar100 \
        --config.synset.source=import --config.synset.path=/path/to/logged_files

Expected: teacher ~55-60% after 100 epochs; ELF improves ResNet18/VGG11 over the baseline
on MTT sets (paper). The full protocol (ResNet18, 5 repeats, 1001 epochs) targets < 60 s on
one H100/H200 (docs/benchmarks_notes.md).
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar100"
    c.synset.method = "mtt"
    c.synset.iterations = 5000
    return c
