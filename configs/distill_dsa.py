"""DSA (gradient matching with siamese augmentation) at IPC 1 / 10 / 50 on CIFAR-10/100.

Commands (the IPC and the dataset are fields):
    elf-jax distill --config configs/distill_dsa.py --workdir runs/dsa_c10_ipc10
    elf-jax distill --config configs/distill_dsa.py --config.synset.ipc=1  --workdir runs/dsa_c10_ipc1
    elf-jax distill --config configs/distill_dsa.py --config.synset.ipc=50 --workdir runs/dsa_c10_ipc50
    elf-jax distill --config configs/distill_dsa.py --config.dataset=cifar100 \
        --config.synset.ipc=10 --workdir runs/dsa_c100_ipc10
(ELF's own ``distill_DSA.sh`` for CIFAR-100 uses ``--config.synset.dis_metric=mse``.)

Reference settings: 1000 iterations, lr_img 0.1 (momentum 0.5), lr_net 0.01, batch_real
256, init from real images, the layer-wise distance ("ours"), (outer_loop, inner_loop) from
the IPC: (1, 1), (10, 50), (50, 10); evaluation every 500 iterations, best set kept.

Expected (DSA paper, ConvNet): CIFAR-10 28.8 / 52.1 / 60.6 %, CIFAR-100 13.9 / 32.3 /
42.8 % at IPC 1 / 10 / 50. One IPC-10 iteration takes ~0.5 s on an H100 (docs/benchmarks_notes.md),
so 1000 iterations are ~8 minutes plus evaluations.
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.synset.source = "distill"
    c.synset.method = "dsa"
    c.synset.arch = "ConvNet"
    c.synset.ipc = 10  # 1 | 10 | 50
    c.synset.iterations = 1000
    c.synset.lr_img = 0.1
    c.synset.lr_net = 0.01
    c.synset.batch_real = 256
    c.synset.init = "real"
    c.synset.dis_metric = "ours"
    c.synset.eval_every = 500
    c.synset.eval_epochs = 1000
    c.synset.eval_repeats = 5
    c.synset.checkpoint_every = 50
    return c
