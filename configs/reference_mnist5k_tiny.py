"""The reference setting (configs/reference_elf_eval.py and its teacher) shrunk to seconds
on a 2-core CPU, on the embedded MNIST-5k: a test runs it end to end.

Command:
    elf-jax all --config configs/reference_mnist5k_tiny.py --workdir runs/ref_tiny

What it runs: `config.reference_preset` (BatchNorm statistics per 64-row chunk, the
reference's loss-mode quirks, utils.py normalization), a width-32 ConvNet teacher for 1
epoch (ELF reads snapshot 1), a random real IPC-2 set instead of a distilled one, and
ConvNetBN (where the 4-chunk BatchNorm acts) with the baseline and full ELF for 2 epochs,
1 repeat. The numbers mean nothing; the run checks that every reference option reaches the
pipeline. With a reference teacher buffer: `--config.teacher.reference_buffer=...`.
"""

from elf_jax.config import demo_config, reference_preset


def get_config():
    c = demo_config()
    c.teacher.epochs = 1
    c.teacher.feature_epoch = 1
    c.synset.source, c.synset.ipc = "real_random", 2
    c.eval.pool = ("ConvNetBN",)
    c.eval.modes = ("task", "front_rear_task")
    c.eval.epochs = 2
    c.eval.repeats = 1
    c.eval.checkpoint_every = 1
    return reference_preset(c)
