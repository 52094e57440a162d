"""The evaluation protocol of the reference (``evaluate_synset`` / ``evaluate_feature_synset``).

Reference semantics reproduced here (``Lirui-Zhao/ELF`` ``utils.py``):

* ``for ep in range(Epoch + 1)``: epochs ``0..E`` inclusive (``E + 1`` epochs).
* ``torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4)``: PyTorch-*coupled* weight decay on
  every parameter (``d = g + wd * p``; ``buf = m * buf + d``; ``p -= lr * buf``), no
  dampening, no Nesterov; the first step's buffer is ``d`` (optax's ``trace`` from zeros
  gives the same).
* ``if ep in [E // 2 + 1]: lr *= 0.1; optimizer = SGD(...)``, checked AFTER training epoch
  ``ep``: epochs ``0..E//2+1`` run at ``lr``, epochs ``E//2+2..E`` at ``0.1 * lr``; and because
  a NEW optimizer is built, the momentum buffers restart from zero at that point
  (``reset_momentum_at_decay=True``).
* A ``DataLoader(batch_size=256, shuffle=True)``: a fresh permutation every epoch, the last
  partial batch kept (``drop_last=False``).
* DSA on the images of every training minibatch (the teacher feature stays clean); BatchNorm
  in training mode; the test accuracy once after the last epoch, without augmentation, BN in
  eval mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elf_jax.augment import DEFAULT_STRATEGY
from elf_jax.losses import DEFAULT_KD_TEMPERATURE, FEATURE_KINDS, KD_MODE, LOSS_MODES


__all__ = ["TrainProtocol", "torch_sgd"]


def torch_sgd(
    learning_rate: Any = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, nesterov False) in optax.

    Weight decay is coupled as in PyTorch: added to the gradient of EVERY parameter (norm
    scales and biases included) before the momentum buffer. ``learning_rate`` may be a float
    or an optax schedule; ``None`` leaves the final ``-lr`` scaling out (the train step then
    applies ``-lr`` itself, which is how :mod:`elf_jax.train.step` makes the lr a traced,
    per-repeat value).
    """
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=False))
    if learning_rate is not None:
        parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts) if parts else optax.identity()


NO_LEARNED_LR = ("eval.use_learned_lr is on but the synthetic set carries no learned lr (MTT/"
                 "TESLA sets do; a reference folder's lr_best.pt): set it off to train with "
                 "eval.lr, or import the set with its lr")


@dataclasses.dataclass(frozen=True)
class TrainProtocol:
    """Static settings of one evaluation training (hashable: used as a jit static argument).

    Attributes:
      lr: base learning rate (reference 0.01; also for MTT sets unless ``use_learned_lr``).
      momentum, weight_decay: torch-style SGD (see :func:`torch_sgd`).
      batch_size: minibatch size (256); the last partial batch is kept.
      epochs: ``E``; the loop runs epochs ``0..E`` (``E + 1`` epochs).
      lr_decay: multiply the lr by ``decay_factor`` after epoch ``E // 2 + 1``.
      reset_momentum_at_decay: the reference rebuilds the optimizer at the decay, which zeroes
        the momentum buffers; True reproduces that.
      dsa_strategy: DSA groups for :func:`elf_jax.augment.dsa` (``"none"`` disables it).
      mode: ELF loss mode (``task`` is the baseline), kind: feature distance.
      lambda_front, lambda_rear: loss weights (initial values of the per-repeat hparams).
      use_learned_lr: take the synthetic set's learned lr (MTT/TESLA) as ``lr`` when given.
      dtype: compute dtype of the evaluation network, ``"float32"`` or ``"bfloat16"``
        (parameters and optimizer state stay float32; losses are computed in float32).
      test_batch_size: batch for the final test pass (does not change results).
      kd_temperature: the temperature ``T`` of the ``kd`` mode (``elf_jax.losses.kd_loss``);
        recorded by :meth:`to_dict` only in that mode, so the other modes' records (and
        their checkpoints) read as before the option existed.
      reference_loss_quirks: the reference's loss-mode quirks (``front_task`` always uses the
        channel CE; ``front_rear`` ignores ``lambda_rear``); False = ``kind`` and both
        lambdas in every mode (:func:`elf_jax.losses.reference_loss_quirks`).
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    epochs: int = 1000
    lr_decay: bool = True
    decay_factor: float = 0.1
    reset_momentum_at_decay: bool = True
    dsa_strategy: str = DEFAULT_STRATEGY
    mode: str = "front_rear_task"
    kind: str = "ce"
    lambda_front: float = 1.0
    lambda_rear: float = 1.0
    use_learned_lr: bool = False
    dtype: str = "float32"
    test_batch_size: int = 500
    kd_temperature: float = DEFAULT_KD_TEMPERATURE
    reference_loss_quirks: bool = False

    def __post_init__(self):
        if self.mode not in LOSS_MODES:
            raise ValueError(f"TrainProtocol.mode {self.mode!r}: choose one of {LOSS_MODES}")
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"TrainProtocol.kind {self.kind!r}: choose one of {FEATURE_KINDS}")
        if self.epochs < 0:
            raise ValueError(f"TrainProtocol.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"TrainProtocol.batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "weight_decay", "lambda_front", "lambda_rear", "kd_temperature"):
            v = float(getattr(self, name))
            positive = name in ("lr", "kd_temperature")
            if not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise ValueError(f"TrainProtocol.{name}={v}: it must be a finite number "
                                 f"{'> 0' if positive else '>= 0'}")
        if not 0 <= float(self.momentum) < 1:
            raise ValueError(f"TrainProtocol.momentum={self.momentum}: it must lie in [0, 1)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"TrainProtocol.dtype {self.dtype!r}: float32 | bfloat16 | float16")

    # ------------------------------------------------------------------ derived values
    @property
    def num_epochs(self) -> int:
        """Epochs actually run: ``E + 1`` (the reference's ``range(Epoch + 1)``)."""
        return self.epochs + 1

    @property
    def decay_epoch(self) -> Optional[int]:
        """The epoch AFTER which the lr is decayed (``E // 2 + 1``), or None."""
        return self.epochs // 2 + 1 if self.lr_decay else None

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def base_lr(self, learned_lr=None) -> float:
        """The base lr of a run (the one resolver of the evaluation lr): ``lr``, or the set's
        learned lr when ``use_learned_lr`` (then a positive finite number; a set without one
        is refused, never trained with ``lr`` in its place)."""
        if not self.use_learned_lr:
            return self.lr
        if learned_lr is None:
            raise ValueError(NO_LEARNED_LR)
        lr = float(np.asarray(learned_lr))
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"the synthetic set's learned lr is {lr}; expected a positive number")
        return lr

    def lr_at(self, epoch: int, lr: Optional[float] = None) -> float:
        """The lr of ``epoch`` as a Python float (no device op: for logging on the host);
        ``lr``: the base lr (default ``self.lr``)."""
        base = self.lr if lr is None else lr
        decayed = self.decay_epoch is not None and int(epoch) > self.decay_epoch
        return float(base) * (float(self.decay_factor) if decayed else 1.0)

    def lr_factor(self, epoch) -> jax.Array:
        """Multiplier of the base lr during ``epoch`` (traced or Python int)."""
        if self.decay_epoch is None:
            return jnp.ones((), jnp.float32)
        return jnp.where(jnp.asarray(epoch) > self.decay_epoch, self.decay_factor, 1.0).astype(
            jnp.float32
        )

    def optimizer(self) -> optax.GradientTransformation:
        """The SGD direction transform WITHOUT the lr (the step scales by ``-lr`` itself)."""
        return torch_sgd(None, self.momentum, self.weight_decay)

    def steps_per_epoch(self, n: int) -> int:
        return -(-n // self.batch_size)

    def batch_plan(self, n: int) -> tuple[int, int, int]:
        """``(full_batches, batch, last)``: ``full_batches`` batches of ``batch`` rows, then
        one batch of ``last`` rows (0 when ``n`` divides evenly) -- the DataLoader's batches
        with ``drop_last=False``."""
        if n < 1:
            raise ValueError("the training set is empty")
        b = min(self.batch_size, n)
        return n // b, b, n % b

    def replace(self, **kw) -> "TrainProtocol":
        return dataclasses.replace(self, **kw)

    def run_record(self) -> dict:
        """:meth:`to_dict` less the fields this mode's training never reads (the feature
        distance, the lambdas and the reference's loss quirks in the task and KD modes) and
        `use_learned_lr` (the lr a run trains with is keyed itself, in its hparams): what an
        evaluation checkpoint is keyed by, so a baseline run is not invalidated by a change
        that only the ELF modes see."""
        d = self.to_dict()
        d.pop("use_learned_lr")
        if self.mode in ("task", KD_MODE):
            for name in ("kind", "lambda_front", "lambda_rear", "reference_loss_quirks"):
                d.pop(name, None)
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.mode != KD_MODE:  # meaningless elsewhere; keeps older records comparable
            d.pop("kd_temperature")
        if not d["reference_loss_quirks"]:  # recorded when on: older records read the same
            del d["reference_loss_quirks"]
        return d
