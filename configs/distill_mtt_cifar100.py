"""MTT on CIFAR-100, IPC 10: the ELF repository's setting (``distill_MTT.sh``).

Command (needs CIFAR-100 prepared by TFDS):
    elf-jax distill --config configs/distill_mtt_cifar100.py --workdir runs/mtt_c100
With expert trajectories made by the PyTorch repositories (``buffer.py``):
    elf-jax distill --config configs/distill_mtt_cifar100.py --workdir runs/mtt_c100 \
        --config.synset.experts=/path/to/buffers/CIFAR100/ConvNet/replay_buffer_0.pt
TESLA with the same objective: ``--config.synset.method=tesla`` (constant memory in
syn_steps; ``--config.synset.soft_labels=True`` for expert soft labels).

Settings: syn_steps 20, expert_epochs 2, max_start_epoch 40, lr_img 1e3, lr_lr 1e-5,
lr_teacher 1e-2, 5000 iterations, ConvNet (instance norm), DSA, init from real images,
ZCA off (the ELF script has no --zca). Without ``experts`` the run first trains
``num_experts`` ConvNet experts for 50 epochs (SGD 0.01, no momentum, no weight decay, as
MTT's buffer.py) into ``<workdir>/distill/experts``.

Expected (reference papers, 5 evaluations of ConvNet): MTT CIFAR-100 IPC 10 about 40%
test accuracy (Cazenavette et al. report 40.1 +- 0.4 with ZCA). Time per distillation
iteration on one H100 (CIFAR-10 shape, IPC 10, syn_steps 20): ~52 ms (docs/benchmarks_notes.md), so
5000 iterations take a few minutes plus the experts and the periodic evaluations.
"""

from elf_jax.config import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar100"
    c.synset.source = "distill"
    c.synset.method = "mtt"
    c.synset.arch = "ConvNet"
    c.synset.ipc = 10
    c.synset.iterations = 5000
    c.synset.syn_steps = 20
    c.synset.expert_epochs = 2
    c.synset.max_start_epoch = 40
    c.synset.lr_img = 1e3
    c.synset.lr_lr = 1e-5
    c.synset.lr_teacher = 1e-2
    c.synset.init = "real"
    c.synset.experts = ""  # a teacher workdir or replay_buffer_<n>.pt; "" = train experts
    c.synset.num_experts = 10
    c.synset.expert_train_epochs = 50
    c.synset.eval_every = 500  # the reference's is 100: configs/reference_distill_mtt.py
    c.synset.eval_epochs = 1000
    c.synset.eval_repeats = 5
    c.synset.checkpoint_every = 100
    c.eval.use_learned_lr = False  # the ELF evaluation still trains with lr 0.01
    return c
