"""The defaults every `configs/*.py` file starts from: the reference's settings (docs/METHOD.md).

A config file calls `base_config()` and changes what its experiment needs; every field is
overridable on the command line (`--config.eval.repeats=3`), has a one-line description in
`FIELD_DOCS` (`elf-jax config` prints them) and is checked by `check_config` before any
stage runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections

from elf_jax.augment import DEFAULT_STRATEGY
from elf_jax.data.validation import VALIDATION_FRACTION
from elf_jax.distill.settings import FIELD_DOCS as SYNSET_DOCS
from elf_jax.distill.settings import METHOD_SETTINGS, schema
from elf_jax.losses import MAX_LAMBDA
from elf_jax.parallel.mesh import ParallelConfig

# The reference's cross-architecture pool ("cross"); "-IN" names are instance norm.
CROSS_POOL = ("ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "VGG11BN")
# Its 64x64 pool ("cross_imagenet": the _L4/_L6 split names of these nets).
IMAGENET_CROSS_POOL = ("ConvNetD4", "ConvNetD4BN", "ResNet18ImageNet", "ResNet18BNImageNet",
                       "VGG11ImageNet", "VGG11BNImageNet")


def base_config() -> ml_collections.ConfigDict:
    """Reference settings for CIFAR-10 with a ConvNetW512 teacher and the cross pool."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    # Real data in memory or streamed from its array_record files (elf_jax.data.stream):
    # auto streams a split whose float32 images exceed stream_above_gb.
    c.data_mode = "auto"  # auto | memory | stream
    c.stream_above_gb = 2.0
    c.zca = False
    c.seed = 0
    c.dtype = "float32"  # compute dtype of the networks: float32 | bfloat16

    # Real training images held out for every choice a run makes (the distillation's best
    # set, the sweep's lambdas), never trained on: elf_jax.data.validation. fraction 0 holds
    # nothing out and chooses on the test split, as the reference does (reference_preset).
    c.validation = ml_collections.ConfigDict()
    c.validation.fraction = VALIDATION_FRACTION
    c.validation.seed = 0

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
    # of width C (docs/METHOD.md: ConvNet fronts are 4x4x128 and take a width-128 ConvNet teacher).
    # "" = this rule; otherwise one architecture name for every eval net.
    c.teacher.override_arch = ""
    c.teacher.model_kwargs = {}  # get_model overrides of the teacher, e.g. {"width": 64}

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
    # The same evaluation on a random real subset of the set's IPC (same seeds: paired), its
    # rows and set-minus-random beside the set's (issue 29); doubles the evaluation's time.
    c.eval.random_reference = False
    # ... and on every training image the validation split left (in memory; costly): the
    # full-data row, the same protocol
    c.eval.full_reference = False
    # An lr per (architecture, mode) chosen on the validation split from this grid (every lr
    # x lr_grid_repeats runs in one program), then eval.repeats at the chosen lr; () = eval.lr
    c.eval.lr_grid = ()
    c.eval.lr_grid_repeats = 1
    # A learned adapter where a pool net's front and its teacher feature differ in shape
    # (beyond the reference, which needs them equal); "off" refuses such pool nets.
    c.eval.adapter = "auto"
    c.eval.checkpoint_every = 100  # epochs between evaluation checkpoints
    c.eval.width = 0  # >0 overrides the ConvNet-family width of pool nets (demo only)
    c.eval.model_kwargs = {}  # {pool arch: get_model overrides}, e.g. {"ViT": {"dim": 64}}

    # Reference reproduction (issue 13; docs/REFERENCE.md). Ghost BatchNorm: the reference's
    # published runs use nn.DataParallel on 4 GPUs (bn_chunks=4); 1 = whole-batch BN.
    c.teacher.bn_chunks = 1
    c.eval.bn_chunks = 1
    # Normalization of the data: "dc" (true statistics; the reference's DC/DSA/DM utils.py) or
    # "mtt" (its MTT/ELF utils.py: CIFAR-10's mean/std for cifar100; the same elsewhere).
    c.stats = "dc"
    # The space an imported set is in when its file does not record one: "" = a reference
    # .pt folder is in "mtt" (the space the reference's ELF evaluation reads every set in),
    # our .npz / synset dirs in the run's; "dc" | "mtt" name it.
    c.synset.import_stats = ""

    # The knowledge-distillation control (issue 12): mode "kd" in eval.modes trains on the
    # teacher's logits of the clean synthetic images (the bank's) at this temperature.
    c.eval.kd_temperature = 4.0

    # `elf-jax sweep`: a lambda_front x lambda_rear grid, every point trained with the
    # evaluation protocol and repeats in the ELF mode of eval.modes (all points as the runs
    # of one compiled program; elf_jax.elf.sweep).
    c.sweep = ml_collections.ConfigDict()
    c.sweep.lambda_front = (0.0, 0.5, 1.0, 2.0)
    c.sweep.lambda_rear = (0.0, 0.5, 1.0, 2.0)
    c.sweep.pool = ()  # () = eval.pool; otherwise some of its architectures
    c.sweep.baseline = True  # also the task-mode repeats, for each point's paired gain
    # A reference teacher: the bank from snapshot feature_epoch of one trajectory of the
    # reference's own buffer (`replay_buffer_<n>.pt` of ELF_buffer.sh) instead of a teacher
    # trained here; one teacher (override_arch or arch) for the whole pool, as the reference.
    c.teacher.reference_buffer = ""
    c.teacher.reference_trajectory = -1  # -1: the last (ELF_eval.py reads buffer[-1])
    # The reference's loss-mode quirks: front_task always uses the channel CE, front_rear
    # ignores lambda_rear (False: eval.kind and both lambdas apply in every mode).
    c.eval.reference_loss_quirks = False

    # Several devices (elf_jax.parallel.ParallelConfig; README "Several devices and hosts"):
    # "none" trains on one device; "shard_map" trains every step data parallel over a
    # ("runs", "data") mesh of all devices.
    c.parallel = ml_collections.ConfigDict(dataclasses.asdict(ParallelConfig()))
    # Several processes (elf_jax.parallel.distributed): "" / 0 / -1 = from the environment
    # (ELF_JAX_COORDINATOR, ELF_JAX_NUM_PROCESSES, ELF_JAX_PROCESS_ID); unset = one process.
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1})
    # Curves (elf_jax.metrics): TensorBoard event files under <workdir>/tb/<stage>/.
    c.log = ml_collections.ConfigDict({"tensorboard": True})
    return c


# The distillation model, its BatchNorm variant, and three architectures unlike it (an MLP,
# LeNet and a small ViT) that a 2-core CPU trains in the demo's budget: the cross-architecture
# rows ELF is about. Their fronts reach the width-32 ConvNet teacher through adapters.
DEMO_POOL = ("ConvNet", "ConvNetBN", "MLP", "LeNet", "ViT")
DEMO_VIT = {"dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128, "split_block": 1}


def demo_config() -> ml_collections.ConfigDict:
    """The main job on the embedded real `mnist5k`: ~3.5 minutes on 2 Intel cores, ~7 on AMD.

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
    c.eval.model_kwargs = {"ViT": DEMO_VIT}
    c.eval.epochs = 100
    c.eval.repeats = 2
    c.eval.checkpoint_every = 50
    return c


def get_config() -> ml_collections.ConfigDict:
    """This module as a config file is the demo (`elf-jax demo` without --config loads it)."""
    return demo_config()


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
    """ImageNet-1k at 64x64 with the 64x64 splits (configs/imagenet64*.py), the reference's
    ImageNet setting where its code states it (docs/REFERENCE.md):

    * float32 compute, as the reference; bfloat16 (faster on GPUs, other numerics) is an
      option: `--config.dtype=bfloat16`;
    * the pool of its `cross_imagenet` eval mode: ConvNetD4, ResNet18ImageNet and
      VGG11ImageNet with their BatchNorm variants;
    * a 200-epoch teacher at lr 0.01 (its `ELF_eval.py` reads ImageNet feature buffers
      from `lr_0.01/epoch_200`); the snapshot it used is not stated anywhere we found:
      `feature_epoch` 100 is our reading (the snapshot before the lr decay, as its CIFAR
      setting's 100 of 200).
    """
    c = base_config()
    c.dataset = "imagenet_resized/64x64"
    c.teacher.arch = "ConvNetD4W512"
    c.teacher.epochs = 200
    c.teacher.feature_epoch = 100
    c.synset.arch = "ConvNetD4"
    c.eval.pool = IMAGENET_CROSS_POOL
    c.dtype = "float32"
    return c


# ------------------------------------------------------------------ the reference preset
# The published runs of the reference scripts ran on 4 GPUs with nn.DataParallel.
REFERENCE_GPUS = 4


def reference_preset(config) -> ml_collections.ConfigDict:
    """A copy of `config` with the reference's behaviours on, where they differ from ours
    (issue 13; each stays a named option). So far:

    * `eval.bn_chunks = teacher.bn_chunks = 4`: BatchNorm statistics per 64-row chunk of a
      256 batch and running statistics from the first chunk, as `nn.DataParallel` on the 4
      GPUs of the published runs (no effect on nets without BatchNorm);
    * `stats = "mtt"`: the data normalized as the reference's ELF `utils.py` (teacher, test
      set, MTT sets) does: CIFAR-10's mean/std for cifar100, the same as "dc" elsewhere;
    * `parallel.sync_bn = False` when the config has a parallel section (chunks are per
      device; with 4 data devices and bn_chunks 1 it is DataParallel's per-replica BN);
    * `eval.reference_loss_quirks = True`: `front_task` always uses the channel CE and
      `front_rear` ignores `lambda_rear` (the reference's `epoch()`);
    * `synset.syn_batch_remainder = "reference"`: an MTT/TESLA `batch_syn` that does not
      divide the set uses the short chunk, and first;
    * `synset.eval_learned_lr = True`: MTT/TESLA keep the best set by evaluations trained
      with the learned lr (`distill_MTT.py`; also our default);
    * `validation.fraction = 0`: the whole training split trains, and the best set is chosen
      on the test split, as the reference's `images_best.pt` is (every report says so).

    The hyperparameters of each script (iterations, evaluation schedules, expert counts,
    `dis_metric`, ...) are in the `configs/reference_*.py` files, which apply this preset.
    docs/REFERENCE.md lists every known difference from the reference, with its option and
    whether this preset turns it on (a test checks that list against this function).
    With data parallelism on (`parallel.parallel != "none"`) `bn_chunks` counts chunks of
    each device's batch, so the preset sets `4 / parallel.data` of them per device (4 data
    devices: per-device BatchNorm, which is DataParallel's) and refuses a data axis that
    does not divide 4 or is left to the device count (`parallel.data = 0`).
    """
    c = config.copy_and_resolve_references()
    c.eval.bn_chunks = REFERENCE_GPUS
    c.teacher.bn_chunks = REFERENCE_GPUS
    c.stats = "mtt"
    c.eval.reference_loss_quirks = True
    c.synset.syn_batch_remainder = "reference"
    c.synset.eval_learned_lr = True
    if "validation" in c:
        c.validation.fraction = 0.0
    if "parallel" in c:
        c.parallel.sync_bn = False
        if c.parallel.get("parallel", "none") != "none":
            n_data = int(c.parallel.get("data", 0) or 0)
            if n_data < 1 or REFERENCE_GPUS % n_data:
                raise ValueError(
                    f"reference_preset emulates {REFERENCE_GPUS} DataParallel replicas, so the "
                    f"data axis must divide {REFERENCE_GPUS}: set parallel.data to 1, 2 or 4 "
                    f"(got {n_data}; 0 = all devices, unknown here)")
            c.eval.bn_chunks = c.teacher.bn_chunks = REFERENCE_GPUS // n_data
    return c


# ------------------------------------------------------------------ the schema, documented
FIELD_DOCS = {
    "dataset": "registry name (mnist5k, cifar10, ...), tfds:NAME[@HxW] or folder:PATH[@HxW]",
    "data_dir": "TFDS data dir ('' = the TFDS default, ~/tensorflow_datasets)",
    "data_mode": "real splits in memory or streamed from their files: auto | memory | stream",
    "stream_above_gb": "data_mode=auto streams a split whose float32 images exceed this (GB)",
    "zca": "ZCA-whiten the images (as the reference does for some MTT runs)",
    "seed": "base seed; each stage draws its own stream from it (elf_jax.keys)",
    "validation.fraction": "share of each class of the real training split held out to choose "
                           "on (best set, sweep); 0: choose on the test split (reference)",
    "validation.seed": "seed of the held-out images (not the run's seed: every run of a study "
                       "holds out the same ones)",
    "dtype": "compute dtype of every network: float32 | bfloat16",
    "teacher.arch": "teacher architecture; its width follows each pool net's front (override_arch)",
    "teacher.epochs": "teacher training epochs on the real training set",
    "teacher.lr": "teacher SGD learning rate",
    "teacher.momentum": "teacher SGD momentum",
    "teacher.weight_decay": "teacher weight decay",
    "teacher.batch_size": "teacher minibatch size",
    "teacher.dsa_strategy": "DSA groups while training the teacher, or 'none'",
    "teacher.lr_decay": "lr x0.1 once after epoch epochs//2 + 1 (the reference)",
    "teacher.feature_epoch": "the teacher snapshot (epoch) whose features ELF uses",
    "teacher.override_arch": "one teacher for every pool net ('' = the width rule)",
    "teacher.model_kwargs": "get_model overrides of the teacher, e.g. {'width': 64}",
    "synset.source": "where the synthetic set comes from: distill | import | real_random",
    "synset.path": "source=import: a synset dir, an .npz, or a reference .pt folder",
    "synset.method": "source=distill: dc | dsa | dm | mtt | tesla",
    "bank.layer": "teacher layer of the features ('' = the front output)",
    "bank.batch_size": "batch size of the bank's forward passes",
    "eval.pool": "architectures to evaluate (models registry names)",
    "eval.modes": "loss modes: task (baseline), ELF modes such as front_rear_task, kd (KD control)",
    "eval.repeats": "trainings per (architecture, mode) from different initializations",
    "eval.epochs": "evaluation epochs (the loop runs epochs 0..epochs, as the reference)",
    "eval.lr": "evaluation SGD learning rate",
    "eval.use_learned_lr": "use an MTT set's learned lr instead of eval.lr",
    "eval.momentum": "evaluation SGD momentum",
    "eval.weight_decay": "evaluation weight decay",
    "eval.batch_size": "evaluation minibatch size",
    "eval.dsa_strategy": "DSA groups while evaluating, or 'none'",
    "eval.kind": "ELF feature distance: ce | l2 | l1 | cos",
    "eval.lambda_front": "weight of ELF's front (feature) loss",
    "eval.lambda_rear": "weight of ELF's rear (teacher feature -> rear) loss",
    "eval.repeat_strategy": "how repeats run: auto | sequential | vmap | devices",
    "eval.lr_grid": "lrs to choose each (arch, mode)'s evaluation lr from, on the validation "
                    "split (() = eval.lr for all)",
    "eval.lr_grid_repeats": "networks trained per lr of eval.lr_grid (same seeds for every lr)",
    "eval.full_reference": "also evaluate on the whole training split (same protocol and seeds): "
                           "the full-data row",
    "eval.random_reference": "also evaluate a random real subset of the same IPC (paired seeds): "
                             "set minus random, ELF's gain on each",
    "eval.adapter": "auto: a learned adapter where front and teacher feature shapes differ | off",
    "eval.checkpoint_every": "epochs between evaluation checkpoints",
    "eval.width": "> 0: width of ConvNet-family pool nets and their teacher (demo only)",
    "eval.model_kwargs": "{pool arch: get_model overrides}, e.g. {'ViT': {'dim': 64}}",
    "eval.kd_temperature": "temperature T of mode kd: T^2 KL(softmax(teacher/T) || softmax(net/T))",
    "stats": "data mean/std: dc (true stats) | mtt (MTT/ELF utils.py: CIFAR-10's for cifar100)",
    "synset.import_stats": "space of an imported set without a record: '' (.pt: mtt, else the run's) | "
                            "dc | mtt | pixels ([0, 1]) | pixels255 ([0, 255])",
    "teacher.reference_buffer": "a reference replay_buffer_<n>.pt as the teacher ('' = train one)",
    "teacher.reference_trajectory": "its trajectory whose feature_epoch snapshot is used (-1 = last)",
    "eval.reference_loss_quirks": "reference's quirks: front_task uses CE, front_rear ignores lambda_rear",
    "teacher.bn_chunks": "BatchNorm statistics per chunk of the batch, as DataParallel on N GPUs",
    "eval.bn_chunks": "BatchNorm statistics per chunk of the batch, as DataParallel on N GPUs",
    "sweep.lambda_front": "elf-jax sweep: the lambda_front values (distinct numbers >= 0)",
    "sweep.lambda_rear": "elf-jax sweep: the lambda_rear values (distinct numbers >= 0)",
    "sweep.pool": "elf-jax sweep: architectures to sweep, some of eval.pool (() = all of it)",
    "sweep.baseline": "elf-jax sweep: also train the task-mode baseline (paired gain per point)",
    "parallel.parallel": "none (one device) | shard_map (data parallel on a runs x data mesh)",
    "parallel.runs": "repeats side by side on the 'runs' mesh axis",
    "parallel.data": "devices per run on the 'data' axis (0 = all the rest)",
    "parallel.sync_bn": "BatchNorm moments over all data devices (equals one device)",
    "parallel.dsa": "global (one DSA draw per global batch) | per_device",
    "parallel.drop_remainder": "drop a last minibatch that does not split over the devices",
    "parallel.bank_dtype": "storage dtype of the feature bank on the devices",
    "parallel.shard_bank": "split the synthetic set and bank over the data devices",
    "parallel.memory_headroom": "fraction of a device's memory the estimate may use",
    "distributed.coordinator_address": "jax.distributed coordinator ('' = environment)",
    "distributed.num_processes": "number of processes (0 = environment)",
    "distributed.process_id": "this process's index (-1 = environment)",
    "log.tensorboard": "write training curves as TensorBoard files in <workdir>/tb/<stage>/",
    **{f"synset.{k}": v for k, v in SYNSET_DOCS.items()},
}


def fields(config, prefix: str = "") -> dict:
    """``{dotted name: value}`` of every leaf field (a ``model_kwargs`` dict is one leaf)."""
    out = {}
    for key, value in config.items():
        name = prefix + key
        if isinstance(value, ml_collections.ConfigDict) and not key.endswith("model_kwargs"):
            out.update(fields(value, name + "."))
        else:
            out[name] = value
    return out


def describe(config) -> str:
    """Every field with its value and description, one per line (`elf-jax config`)."""
    items = fields(config)
    width = min(44, max(len(f"{k}={v!r}") for k, v in items.items()))
    return "\n".join(f"{f'{k}={v!r}':<{width}}  # {FIELD_DOCS.get(k, '(undocumented)')}"
                     for k, v in items.items())


# ------------------------------------------------------------------ numeric ranges
@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or half-open interval of finite numbers; `optional`: None is allowed
    (the method's default)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def holds(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            text = f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = (f"a number in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        return text + (" (or None: the method's default)" if self.optional else "")


_POSITIVE = Range(0.0, low_open=True)
_MOMENTUM = Range(0.0, 1.0, high_open=True)
_LAMBDA = Range(0.0, MAX_LAMBDA)
# Every numeric field with a range, in one place (the sweep's grid values: check_axis, with
# the same MAX_LAMBDA).
FIELD_RANGES = {
    "stream_above_gb": Range(0.0),
    "validation.fraction": Range(0.0, 0.5),
    "teacher.lr": _POSITIVE, "teacher.momentum": _MOMENTUM, "teacher.weight_decay": Range(0.0),
    "eval.lr": _POSITIVE, "eval.momentum": _MOMENTUM, "eval.weight_decay": Range(0.0),
    "eval.lambda_front": _LAMBDA, "eval.lambda_rear": _LAMBDA,
    "eval.kd_temperature": _POSITIVE,
    "synset.lr_img": Range(0.0, low_open=True, optional=True),
    "synset.momentum": Range(0.0, 1.0, high_open=True, optional=True),
    "synset.lr_net": Range(0.0, low_open=True, optional=True),
    "synset.lr_lr": Range(0.0, low_open=True, optional=True),
    "synset.lr_teacher": Range(0.0, low_open=True, optional=True),
    "synset.lr_label": Range(0.0, low_open=True, optional=True),
}


def check_range(name: str, value) -> None:
    """One-line `ValueError` unless `value` lies in `FIELD_RANGES[name]`."""
    allowed = FIELD_RANGES[name]
    if not allowed.holds(value):
        raise ValueError(f"config.{name}={value!r}: must be {allowed.describe()}")


def _check_ranges(config) -> None:
    values = fields(config)
    for name in FIELD_RANGES:
        if name in values:
            check_range(name, values[name])


def _check_known_fields(config) -> None:
    """A field no stage reads (a misspelling in a config file: `c.eval.repeatz = 3`) is an
    error, as an unknown `--config.` flag is; the nearest declared name is suggested."""
    for name in fields(config):
        if name not in FIELD_DOCS:
            near = difflib.get_close_matches(name, list(FIELD_DOCS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"config.{name}: unknown config field (set in the config file; no "
                             f"stage reads it){hint} (`elf-jax config` lists every field)")


def _one_of(name: str, value, options) -> None:
    if value not in options:
        near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        listed = ", ".join(str(o) if o != "" else "''" for o in options)
        raise ValueError(f"config.{name}={value!r}: choose one of {listed}{hint}")


def _at_least(config, names, low) -> None:
    values = fields(config)
    for name in names:
        value = values[name]
        if value is None or value < low:
            raise ValueError(f"config.{name}={value!r}: must be >= {low}")


def check_config(config) -> None:
    """One-line `ValueError` for the first bad value, naming the field and what is allowed
    (the nearest valid name where one is close); nothing when the config is usable."""
    from elf_jax.augment import parse_strategy
    from elf_jax.data import resolve_info
    from elf_jax.elf.evaluate import ADAPTER_CHOICES
    from elf_jax.losses import FEATURE_KINDS, LOSS_MODES
    from elf_jax.models.registry import canonical_name
    from elf_jax.parallel.mesh import ParallelConfig
    from elf_jax.train.protocol import TrainProtocol
    from elf_jax.train.runner import REPEAT_STRATEGIES

    from elf_jax.data.stream import DATA_MODES

    _check_known_fields(config)
    resolve_info(config.dataset, data_dir=config.get("data_dir") or None)
    _one_of("dtype", config.dtype, ("float32", "bfloat16"))
    _check_ranges(config)
    _one_of("data_mode", config.get("data_mode", "auto"), DATA_MODES)
    if config.get("data_mode", "auto") == "stream" and config.zca:
        raise ValueError("config.data_mode='stream' with config.zca=True: ZCA needs the whole "
                         "split in memory to fit; set zca=False or data_mode=memory")
    t, s, e = config.teacher, config.synset, config.eval
    for name, arch in [("teacher.arch", t.arch), ("synset.arch", s.arch)] + [
            ("eval.pool", a) for a in e.pool] + (
            [("teacher.override_arch", t.override_arch)] if t.override_arch else []):
        try:
            canonical_name(arch)
        except ValueError as err:
            raise ValueError(f"config.{name}: {err}") from None
    _at_least(config, ["teacher.epochs", "teacher.feature_epoch", "teacher.batch_size",
                       "synset.ipc", "bank.batch_size", "eval.repeats", "eval.epochs",
                       "eval.batch_size", "eval.checkpoint_every"], 1)
    _at_least(config, ["synset.iterations", "eval.width"], 0)
    if t.feature_epoch > t.epochs and not t.get("reference_buffer", ""):
        raise ValueError(f"config.teacher.feature_epoch={t.feature_epoch} is after the last "
                         f"teacher epoch (teacher.epochs={t.epochs}): lower it or train longer")
    TrainProtocol(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                  batch_size=int(t.batch_size), epochs=int(t.epochs), dtype=config.dtype)
    _one_of("synset.source", s.source, ("distill", "import", "real_random"))
    _one_of("synset.method", s.method, tuple(METHOD_SETTINGS))
    if s.source == "import" and not s.path:
        raise ValueError("config.synset.source='import' needs config.synset.path")
    if not e.pool:
        raise ValueError("config.eval.pool is empty: name at least one architecture")
    _check_pool_kwargs(e)
    if not e.modes:
        raise ValueError("config.eval.modes is empty: name at least one loss mode, e.g. "
                         "('task', 'front_rear_task')")
    for mode in e.modes:
        _one_of("eval.modes", mode, LOSS_MODES)
    _one_of("eval.kind", e.kind, FEATURE_KINDS)
    _one_of("eval.repeat_strategy", e.repeat_strategy, REPEAT_STRATEGIES)
    _one_of("eval.adapter", e.adapter, ADAPTER_CHOICES)
    for name in ("teacher.dsa_strategy", "synset.dsa_strategy", "eval.dsa_strategy"):
        try:
            parse_strategy(fields(config)[name])
        except ValueError as err:
            raise ValueError(f"config.{name}: {err}") from None
    pc = ParallelConfig.from_config(config.get("parallel", None))
    _check_bn_chunks(config, pc)
    _one_of("stats", config.get("stats", "dc"), ("dc", "mtt"))
    _one_of("synset.import_stats", s.get("import_stats", ""),
            ("", "dc", "mtt", "pixels", "pixels255"))
    _check_sweep(config)
    _check_reference_teacher(t)
    _one_of("eval.reference_loss_quirks", e.get("reference_loss_quirks", False), (False, True))
    _one_of("synset.syn_batch_remainder", s.get("syn_batch_remainder", "drop"),
            ("drop", "reference"))
    _check_lr_grid(e)


def _check_lr_grid(e) -> None:
    """`eval.lr_grid`: () or distinct lrs > 0, not with `use_learned_lr` (which lr would
    train?); `lr_grid_repeats` >= 1."""
    from elf_jax.elf.evaluate import check_lr_grid

    grid = tuple(e.get("lr_grid", ()) or ())
    if not grid:
        return
    check_lr_grid(grid)
    if e.use_learned_lr:
        raise ValueError("config.eval.lr_grid with eval.use_learned_lr=True: choose one (the "
                         "grid chooses the lr on the validation split; the learned lr is the set's)")
    repeats = e.get("lr_grid_repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"config.eval.lr_grid_repeats={repeats!r}: must be an integer >= 1")


def _check_pool_kwargs(e) -> None:
    """`eval.model_kwargs`: registry names (entries for nets not in the pool wait unused)
    with overrides that `get_model` accepts."""
    from elf_jax.models import get_model

    for arch, kwargs in dict(e.get("model_kwargs", {}) or {}).items():
        try:
            get_model(arch, 10, **dict(kwargs))
        except (ValueError, TypeError) as err:
            raise ValueError(f"config.eval.model_kwargs.{arch}: {err}") from None


def _check_reference_teacher(t) -> None:
    """teacher.reference_buffer: a path string ('' = none); reference_trajectory: an int."""
    path, traj = t.get("reference_buffer", ""), t.get("reference_trajectory", -1)
    if not isinstance(path, str):
        raise ValueError(f"config.teacher.reference_buffer={path!r}: give a replay_buffer_<n>.pt "
                         "path as a string ('' = train the teacher here)")
    if isinstance(traj, bool) or not isinstance(traj, int):
        raise ValueError(f"config.teacher.reference_trajectory={traj!r}: must be an int "
                         "(an index into the buffer's trajectories; -1 = the last)")


def _check_bn_chunks(config, pc) -> None:
    """bn_chunks: an int >= 1; with chunks, BatchNorm statistics are per device (no sync BN)."""
    for name in ("teacher.bn_chunks", "eval.bn_chunks"):
        value = fields(config).get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}={value!r}: must be an int >= 1 (1 = whole-batch "
                             "BatchNorm; 4 = the reference's 4-GPU DataParallel runs)")
        if value > 1 and pc.parallel != "none" and pc.sync_bn:
            raise ValueError(f"config.{name}={value} chunks each device's batch, which needs "
                             "per-device BatchNorm statistics: set parallel.sync_bn=False")


# ------------------------------------------------------------------ the sweep section
def _check_sweep(config) -> None:
    """`sweep.lambda_*`: distinct numbers >= 0; `sweep.pool`: architectures of eval.pool."""
    from elf_jax.elf.sweep import check_axis

    sweep = config.get("sweep", None)
    if sweep is None:  # a config made without base_config(): `elf-jax sweep` says so
        return
    for name in ("lambda_front", "lambda_rear"):
        check_axis(f"config.sweep.{name}", sweep[name])
    others = [a for a in sweep.pool if a not in config.eval.pool]
    if others:
        raise ValueError(f"config.sweep.pool={tuple(sweep.pool)!r}: {', '.join(others)} not in "
                         f"config.eval.pool {tuple(config.eval.pool)!r} (a sweep uses the "
                         "evaluation's teachers and banks); add them there, or () for all of it")
