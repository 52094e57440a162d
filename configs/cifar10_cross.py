"""ELF on CIFAR-10, the reference setting: ConvNetW512 teacher, DM IPC-10 set, cross pool.

Command (needs CIFAR-10 prepared by TFDS, i.e. internet once):
    elf-jax all --config configs/cifar10_cross.py --workdir runs/cifar10
or stage by stage: `elf-jax train-teacher|distill|features|evaluate|report` with the same
flags. Import a set made with the PyTorch repositories instead of distilling with
`--config.synset.source=import --config.synset.path=/path/to/logged_files`.

Expected: the teacher reaches ~85% test accuracy after 100 epochs; with an MTT set the
paper reports ELF gains on ResNet18/VGG11 of several points (12.19 on VGG11 for MTT CIFAR-10
IPC 10). Wall time on one H100: teacher ~10 min, evaluation of 6 nets x 2 modes x 5
repeats a few minutes (see docs/benchmarks_notes.md).
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    return c
