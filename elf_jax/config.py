"""The defaults every `configs/*.py` file starts from: the reference's settings (SPEC.md).

A config file calls `base_config()` and changes what its experiment needs; every field is
overridable on the command line (`--config.eval.repeats=3`).
"""

from __future__ import annotations

import ml_collections

from elf_jax.augment import DEFAULT_STRATEGY
from elf_jax.distill.settings import schema

# The reference's cross-architecture pool ("cross"); "-IN" names are instance norm.
CROSS_POOL = ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "VGG11BN")


def base_config() -> ml_collections.ConfigDict:
    """Reference settings for CIFAR-10 with a ConvNetW512 teacher and the cross pool."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    c.zca = False
    c.seed = 0
    c.dtype = "float32"  # compute dtype of the networks: float32 | bfloat16

    # Stage 1: the teacher ("feature model") trained on the full real training set.
    c.teacher = ml_collections.ConfigDict()
    c.teacher.arch = "ConvNetW512"
    c.teacher.epochs = 200
    c.teacher.lr = 0.01
    c.teacher.momentum = 0.9
    c.teacher.weight_decay = 5e-4
    c.teacher.batch_size = 256
    c.teacher.dsa_strategy = DEFAULT_STRATEGY
    c.teacher.lr_decay = True  # lr x0.1 once after epoch epochs//2 + 1
    c.teacher.feature_epoch = 100  # the snapshot ELF uses
    # Teacher per feature width: an eval net whose front has C channels uses the teacher
    # of width C (SPEC: ConvNet fronts are 4x4x128 and take a width-128 ConvNet teacher).
    # "" = this rule; otherwise one architecture name for every eval net.
    c.teacher.override_arch = ""

    # Stage 2: the synthetic set.
    c.synset = ml_collections.ConfigDict()
    c.synset.source = "distill"  # distill | import | real_random
    c.synset.path = ""  # for source=import: a synset dir, .npz, or a reference .pt folder
    c.synset.method = "dm"  # for source=distill: dc | dsa | dm | mtt | tesla
    c.synset.ipc = 10
    c.synset.iterations = 1000
    c.synset.arch = "ConvNet"  # the distillation model
    # Every distillation setting (elf_jax.distill.settings, where they are documented); a
    # typed None: the method's default.
    for name, (default, kind) in schema().items():
        if name not in c.synset:
            c.synset[name] = (ml_collections.config_dict.placeholder(kind) if default is None
                              else default)

    # Stage 3: the feature bank.
    c.bank = ml_collections.ConfigDict()
    c.bank.layer = ""  # "" = the teacher's front output (last conv block after pooling)
    c.bank.batch_size = 256

    # Stage 4: evaluation, the reference protocol.
    c.eval = ml_collections.ConfigDict()
    c.eval.pool = CROSS_POOL
    c.eval.modes = ("task", "front_rear_task")
    c.eval.repeats = 5
    c.eval.epochs = 1000  # the loop runs epochs 0..epochs, as the reference
    c.eval.lr = 0.01
    c.eval.use_learned_lr = False  # MTT sets: the reference still uses 0.01
    c.eval.momentum = 0.9
    c.eval.weight_decay = 5e-4
    c.eval.batch_size = 256
    c.eval.dsa_strategy = DEFAULT_STRATEGY
    c.eval.kind = "ce"  # feature distance: ce | l2 | l1 | cos
    c.eval.lambda_front = 1.0
    c.eval.lambda_rear = 1.0
    c.eval.repeat_strategy = "auto"  # auto | sequential | vmap | devices
    c.eval.checkpoint_every = 100  # epochs between evaluation checkpoints
    c.eval.width = 0  # >0 overrides the ConvNet-family width of pool nets (demo only)
    return c


# Norm and pooling variants of the distillation model: the architectures a 2-core CPU can
# train in the demo's budget whose fronts all fit one width-32 ConvNet teacher.
DEMO_POOL = ("ConvNet", "ConvNetBN", "ConvNetLN", "ConvNetMP")


def demo_config() -> ml_collections.ConfigDict:
    """The main job on the embedded real `mnist5k`, sized for ~5 minutes on 2 CPU cores.

    Full-size equivalent: `configs/cifar10_cross.py` (ConvNetW512 teacher for 200 epochs,
    DM/MTT IPC-10 sets, the six-network cross pool, 1000 epochs x 5 repeats).
    """
    c = base_config()
    c.dataset = "mnist5k"
    c.teacher.epochs = 8
    c.teacher.feature_epoch = 8
    c.synset.source = "distill"
    c.synset.method = "dm"
    c.synset.ipc = 10
    c.synset.iterations = 200
    c.synset.batch_real = 64
    c.synset.model_kwargs = {"width": 32}
    c.eval.pool = DEMO_POOL
    c.eval.width = 32  # pool nets and their teacher at width 32 instead of 128 / 512
    c.eval.epochs = 100
    c.eval.repeats = 2
    c.eval.checkpoint_every = 50
    return c


# CPU-sized distillation on mnist5k per method (configs/distill_mnist5k_*.py): fewer
# iterations and shorter loops than the reference, the same as experiments/distill_vs_random.py.
_MNIST5K_DISTILL = {
    "dm": dict(iterations=200, lr_img=1.0, batch_real=64, eval_every=100),
    "dc": dict(iterations=10, outer_loop=5, inner_loop=5, batch_real=64, lr_img=0.1,
               dsa_strategy="none", eval_every=5),  # DC: no augmentation while distilling
    "dsa": dict(iterations=10, outer_loop=5, inner_loop=5, batch_real=64, lr_img=0.1,
                eval_every=5),
    "mtt": dict(iterations=100, syn_steps=10, expert_epochs=2, max_start_epoch=6, lr_img=100.0,
                lr_lr=1e-5, lr_teacher=1e-2, num_experts=2, expert_train_epochs=8, experts="",
                eval_every=50),
}
_MNIST5K_DISTILL["tesla"] = dict(_MNIST5K_DISTILL["mtt"], soft_labels=False)


def mnist5k_distill_config(method: str) -> ml_collections.ConfigDict:
    """Distill `method` on mnist5k (ConvNet width 32, IPC 10, real init) in minutes on the CPU;
    the later stages are the demo's (teacher, pool, evaluation)."""
    if method not in _MNIST5K_DISTILL:
        raise ValueError(f"no mnist5k setting for {method!r}; choose from {sorted(_MNIST5K_DISTILL)}")
    c = demo_config()
    s = c.synset
    s.method = method
    s.arch = "ConvNet"
    s.ipc = 10
    s.init = "real"
    s.checkpoint_every = 10
    s.eval_epochs = 100
    for key, value in _MNIST5K_DISTILL[method].items():
        s[key] = value
    return c


def imagenet64_config() -> ml_collections.ConfigDict:
    """ImageNet-1k at 64x64 with the 64x64 splits (configs/imagenet64*.py)."""
    c = base_config()
    c.dataset = "imagenet_resized/64x64"
    c.teacher.arch = "ConvNetD4W512"
    c.teacher.epochs = 50
    c.teacher.feature_epoch = 25
    c.synset.arch = "ConvNetD4"
    c.eval.pool = ("ConvNetD4", "ResNet18ImageNet", "VGG11ImageNet")
    c.dtype = "bfloat16"
    return c
