"""TESLA on MNIST-5k, IPC 10: the CPU setting for TESLA.

Runs on the embedded real MNIST-5k subset (offline) in minutes on a 2-core CPU: ConvNet
width 32, IPC 10, CPU-sized settings: fewer iterations than the reference; 2 experts of 8 epochs, syn_steps 10, max_start_epoch 6.
The same settings as experiments/distill_vs_random.py.

Command:
    elf-jax distill --config configs/distill_mnist5k_tesla.py --workdir runs/tesla_mnist5k
The whole ELF pipeline on this set: ``elf-jax demo --config configs/distill_mnist5k_tesla.py ...``.

Expected: ~6 minutes of distillation on a 2-core CPU, measured 2026-11-26: the 2 experts
(~2 minutes), ~25 s compile, then 2.2 s per iteration (100 iterations; was 26 s with
rolled student loops, BENCHMARKS.md, Distillation); plus two short evaluations; memory
constant in syn_steps (BENCHMARKS.md).
"""

from elf_jax.config import demo_config


def get_config():
    c = demo_config()  # later stages: the demo's teacher, pool and evaluation
    c.dataset = "mnist5k"
    c.synset.source = "distill"
    c.synset.method = "tesla"
    c.synset.arch = "ConvNet"
    c.synset.ipc = 10
    c.synset.model_kwargs = {"width": 32}
    c.synset.init = "real"
    c.synset.checkpoint_every = 10
    c.synset.iterations = 100
    c.synset.syn_steps = 10
    c.synset.expert_epochs = 2
    c.synset.max_start_epoch = 6
    c.synset.lr_img = 100.0
    c.synset.lr_lr = 1e-5
    c.synset.lr_teacher = 1e-2
    c.synset.num_experts = 2
    c.synset.expert_train_epochs = 8
    c.synset.experts = ""
    c.synset.soft_labels = False  # True: soft labels from the expert
    c.synset.eval_every = 50
    c.synset.eval_epochs = 100
    return c
