"""DM (distribution matching) at IPC 1 / 10 / 50 on CIFAR-10/100.

Commands (the IPC and the dataset are fields):
    elf-jax distill --config configs/distill_dm.py --workdir runs/dm_c10_ipc10
    elf-jax distill --config configs/distill_dm.py --config.synset.ipc=1  --workdir runs/dm_c10_ipc1
    elf-jax distill --config configs/distill_dm.py --config.synset.ipc=50 --workdir runs/dm_c10_ipc50
    elf-jax distill --config configs/distill_dm.py --config.dataset=cifar100 \
        --config.synset.ipc=10 --workdir runs/dm_c100_ipc10

Reference settings (``distill_DM.py``): 20000 iterations, lr_img 1.0 (momentum 0.5),
batch_real 256, init from real images, DSA (siamese per class), a fresh ConvNet each
iteration; evaluation every 2000 iterations, best set kept.

Expected (DM paper, ConvNet): CIFAR-10 26.0 / 48.9 / 63.0 %, CIFAR-100 11.4 / 29.7 /
43.6 % at IPC 1 / 10 / 50. One IPC-10 iteration takes ~5 ms on an H100 (docs/benchmarks_notes.md):
20000 iterations ~2 minutes plus evaluations.
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.synset.source = "distill"
    c.synset.method = "dm"
    c.synset.arch = "ConvNet"
    c.synset.ipc = 10  # 1 | 10 | 50
    c.synset.iterations = 20000
    c.synset.lr_img = 1.0
    c.synset.batch_real = 256
    c.synset.init = "real"
    c.synset.eval_every = 2000
    c.synset.eval_epochs = 1000
    c.synset.eval_repeats = 5
    c.synset.checkpoint_every = 500
    return c
