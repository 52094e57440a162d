"""What each distillation method reads: one frozen dataclass per method family, also the
schema of ``config.synset`` (``base_config`` declares every field from :func:`schema`).

A field whose default is None or differs between methods is a typed None placeholder in the
config (still overridable: ``--config.synset.lr_img=2``), None meaning the method's default.
A method reads only its dataclass's fields; other methods' fields are ignored.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional

from elf_jax.augment import DEFAULT_STRATEGY



@dataclasses.dataclass(frozen=True)
class Settings:
    """The fields every method reads.

    arch, model_kwargs: the distillation network (``get_model(arch, K, **model_kwargs)``).
    ipc: synthetic images per class. iterations: updates of the set.
    init: ``"real"`` (random real images of each class, the reference) or ``"noise"``.
    lr_img, momentum: the SGD on the images. dsa_strategy: the DSA groups (DC uses none).
    checkpoint_every: iterations between checkpoints (a killed run resumes from the last).
    eval_every, eval_epochs, eval_repeats: evaluate the set every ``eval_every`` iterations
    (0 = never) by ``eval_repeats`` trainings of ``eval_epochs`` epochs; the best set by test
    accuracy is kept.
    """

    arch: str = "ConvNet"
    ipc: int = 10
    iterations: int = 1000
    init: str = "real"
    lr_img: float = 1.0
    momentum: float = 0.5
    dsa_strategy: str = DEFAULT_STRATEGY
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_epochs: int = 300
    eval_repeats: int = 1


@dataclasses.dataclass(frozen=True)
class DMSettings(Settings):
    """DM. batch_real: real images per class per iteration (at most the smallest class)."""

    batch_real: int = 256


@dataclasses.dataclass(frozen=True)
class GradientMatchingSettings(Settings):
    """DC and DSA. lr_net: the SGD of the network between rounds; batch_real: real images
    per class per round; batch_train: minibatch of the network's training; outer_loop,
    inner_loop: rounds per iteration and training epochs between rounds (None: the
    reference's values for the ipc, ``get_loops``); dis_metric: ours | mse | cos."""

    lr_img: float = 0.1
    lr_net: float = 0.01
    batch_real: int = 256
    batch_train: int = 256
    outer_loop: Optional[int] = None
    inner_loop: Optional[int] = None
    dis_metric: str = "ours"


@dataclasses.dataclass(frozen=True)
class TrajectorySettings(Settings):
    """MTT and TESLA.

    syn_steps: student steps per iteration, from epoch ``start < max_start_epoch`` of an
    expert towards epoch ``start + expert_epochs``. lr_lr: SGD on the learned lr, which
    starts at lr_teacher. batch_syn: student minibatch (None: all images).
    experts: a teacher workdir, or reference buffers: a ``replay_buffer_<n>.pt``, a
    directory of them (all files n = 0, 1, ... as the reference's ``--load_all``), a glob or
    a comma list (or, from Python, a list of trajectories); None or "": train
    ``num_experts`` experts for ``expert_train_epochs`` (None: ``max_start_epoch - 1 +
    expert_epochs``) into ``<workdir>/experts``.
    max_experts: use the first this many trajectories of all (None: all); max_files: read
    the first this many buffer files (None: all).
    gradient: unrolled | remat | tesla ("": ``unrolled`` for MTT, ``remat`` instead with
    ``remat=True``; ``tesla`` for TESLA). soft_labels: labels from expert ``0``'s logits at
    epoch ``soft_label_epoch`` (None: its last); learn_labels: learn them (SGD lr_label).
    eval_learned_lr: the periodic evaluation that keeps the best set trains with the set's
    learned lr (the reference's ``distill_MTT.py``: ``args.lr_net = syn_lr.item()``);
    False: with 0.01. syn_batch_remainder: when ``batch_syn`` does not divide the set,
    ``"drop"`` skips the short last chunk of each permutation (static shapes) and
    ``"reference"`` uses it, and first (the reference's ``indices_chunks.pop()``), as a
    masked full-size batch (refused for BatchNorm nets, whose statistics would see padding).
    """

    iterations: int = 5000
    lr_img: float = 1e3
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    lr_lr: float = 1e-5
    lr_teacher: float = 1e-2
    batch_syn: Optional[int] = None
    experts: Optional[str] = None
    num_experts: int = 5
    expert_train_epochs: Optional[int] = None
    max_experts: Optional[int] = None
    max_files: Optional[int] = None
    gradient: str = ""
    remat: bool = False
    soft_labels: bool = False
    learn_labels: bool = False
    lr_label: float = 10.0
    soft_label_epoch: Optional[int] = None
    eval_learned_lr: bool = True
    syn_batch_remainder: str = "drop"


# One line per ``config.synset`` field (``elf-jax config`` prints them; a test checks every
# schema field has one). The dataclass docstrings above say the same at more length.
FIELD_DOCS = {
    "arch": "the distillation network (a models registry name)",
    "ipc": "synthetic images per class",
    "iterations": "updates of the synthetic set",
    "init": "initial images: real (random real images per class, the reference) | noise",
    "lr_img": "SGD learning rate on the images (None: the method's default)",
    "momentum": "SGD momentum on the images",
    "dsa_strategy": "DSA groups joined by '_' while distilling, or 'none'",
    "model_kwargs": "get_model overrides of the distillation network, e.g. {'width': 32}",
    "checkpoint_every": "iterations between distillation checkpoints",
    "eval_every": "evaluate the set every this many iterations and keep the best (0 = never)",
    "eval_epochs": "training epochs of each of those evaluations",
    "eval_repeats": "trainings per evaluation (their mean picks the best set)",
    "batch_real": "real images per class per iteration (DM) or round (DC/DSA)",
    "lr_net": "DC/DSA: SGD learning rate of the network between rounds",
    "batch_train": "DC/DSA: minibatch of the network's training on the set",
    "outer_loop": "DC/DSA: rounds per iteration (None: the reference's get_loops(ipc))",
    "inner_loop": "DC/DSA: network epochs between rounds (None: the reference's get_loops(ipc))",
    "dis_metric": "DC/DSA: gradient distance ours | mse | cos",
    "syn_steps": "MTT/TESLA: student steps per iteration",
    "expert_epochs": "MTT/TESLA: expert epochs the student steps must match",
    "max_start_epoch": "MTT/TESLA: start epochs are drawn below this",
    "lr_lr": "MTT/TESLA: SGD learning rate of the learned lr",
    "lr_teacher": "MTT/TESLA: initial learned lr (the experts' lr)",
    "batch_syn": "MTT/TESLA: student minibatch (None: all images)",
    "experts": "MTT/TESLA: teacher workdir, or replay_buffer_<n>.pt / dir / glob / comma list",
    "num_experts": "MTT/TESLA: experts to train when none are given",
    "expert_train_epochs": "MTT/TESLA: epochs per trained expert (None: max_start_epoch-1+expert_epochs)",
    "max_experts": "MTT/TESLA: use the first this many expert trajectories (None: all)",
    "max_files": "MTT/TESLA: read the first this many reference buffer files (None: all)",
    "gradient": "MTT/TESLA: unrolled | remat | tesla ('': the method's)",
    "remat": "MTT: rematerialize the unrolled student steps (less memory)",
    "soft_labels": "TESLA: labels from expert 0's logits",
    "learn_labels": "TESLA: learn the soft labels too",
    "lr_label": "TESLA: SGD learning rate of the learned labels",
    "soft_label_epoch": "TESLA: the expert epoch of the soft labels (None: its last)",
    "eval_learned_lr": "MTT/TESLA: best-set evaluations train with the learned lr (the reference)",
    "syn_batch_remainder": "MTT/TESLA: short last student batch: drop | reference (used, first)",
}


METHOD_SETTINGS = {"dc": GradientMatchingSettings, "dsa": GradientMatchingSettings,
                   "dm": DMSettings, "mtt": TrajectorySettings, "tesla": TrajectorySettings}


def schema() -> dict:
    """``{field: (default, type)}`` over all methods' settings; ``default`` is None where it
    is None or the methods' defaults differ; ``Optional[int]`` gives ``int``, a mapping
    ``dict``."""
    out: dict = {}
    for cls in dict.fromkeys(METHOD_SETTINGS.values()):
        for name, hint in typing.get_type_hints(cls).items():
            f = cls.__dataclass_fields__[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if typing.get_origin(hint) is typing.Union:  # Optional[X]
                hint = typing.get_args(hint)[0]
            if name in out and out[name][0] != default:
                default = None  # the methods differ: each keeps its own
            out[name] = (default, dict if typing.get_origin(hint) else hint)
    return out


def from_config(method: str, section) -> Settings:
    """The settings of ``method`` from ``config.synset``: its fields that are set (not
    None); nested ConfigDicts (``model_kwargs``) become dicts."""
    cls = METHOD_SETTINGS[method]
    values = {f.name: section.get(f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: v.to_dict() if hasattr(v, "to_dict") else v
                  for k, v in values.items() if v is not None})
