"""The ELF objective as pure functions (docs/METHOD.md, stage 4).

Everything here is a pure ``jnp`` function: jittable, vmappable, differentiable. Inputs may be
any float dtype; the losses are computed in float32.

Reference semantics (``Lirui-Zhao/ELF``, ``utils.py``, ``evaluate_feature_synset``):

* ``ce``: ``nn.CrossEntropyLoss()(student_feat_NCHW, teacher_feat_NCHW)`` with probability
  targets, i.e. a soft-target cross-entropy over the channel axis at every spatial position,
  averaged over batch and positions; the target is the RAW teacher feature (not normalised).
  In NHWC the channel axis is the last one.
* ``l2`` / ``l1``: ``nn.MSELoss`` / ``nn.L1Loss`` (means over all elements).
* ``cos``: ``1 - <s, t> / (|s| |t| + 1e-6)`` where the WHOLE batch is flattened into one vector
  (the reference concatenates the per-sample flattened features).

Loss modes (``L = lambda_front * L_front + lambda_rear * L_rear + L_task``):
``task`` (baseline), ``front_task``, ``rear_task``, ``front_rear`` (no task term),
``front_rear_task`` (full ELF). Beyond the reference, ``kd`` is a knowledge-distillation
control (:func:`kd_loss`, :func:`kd_objective`): the same teacher's logits instead of its
features, so a report can tell ELF's gain from what plain teacher knowledge gives.

Two quirks of the reference are *not* copied by default (they only matter away from the
defaults, which the paper uses): its ``front_task`` mode always uses the channel CE whatever
distance is selected, and its ``front_rear`` mode ignores ``lambda_rear``. Here the chosen
``kind`` and both lambdas apply in every mode; ``reference_quirks=True``
(``TrainProtocol.reference_loss_quirks``, ``config.eval.reference_loss_quirks``) reproduces
the reference's (:func:`reference_loss_quirks`). With the defaults (``kind="ce"``, lambdas 1)
the two agree.

Padded batches: every function takes an optional ``mask`` (``[N]``, 1 for real rows); means
are then taken over the real rows only, so a padded batch gives exactly the loss of the
smaller batch. (The runner does not need this -- it runs the last partial batch at its own
static shape -- but it is cheap and useful for custom loops.)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

FEATURE_KINDS = ("ce", "l2", "l1", "cos")
KD_MODE = "kd"
# the modes of elf_objective; LOSS_MODES adds the KD control (kd_objective)
ELF_MODES = ("task", "front_task", "rear_task", "front_rear", "front_rear_task")
LOSS_MODES = ELF_MODES + (KD_MODE,)
DEFAULT_KD_TEMPERATURE = 4.0
# The largest lambda a config or sweep accepts: from 2^24 on, the task loss falls below
# float32's resolution of the weighted sum and the run trains on the feature terms alone.
MAX_LAMBDA = 1e6
COS_EPS = 1e-6  # as in the reference's cos_dis

__all__ = [
    "FEATURE_KINDS",
    "LOSS_MODES",
    "ELF_MODES",
    "feature_loss",
    "task_loss",
    "elf_objective",
    "mode_uses_front",
    "mode_uses_rear",
    "mode_uses_task",
    "mode_needs_features",
    "mode_needs_logits",
    "KD_MODE",
    "DEFAULT_KD_TEMPERATURE",
    "kd_loss",
    "kd_objective",
    "reference_loss_quirks",
]


def _check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature loss kind {kind!r}; choose one of {FEATURE_KINDS}")


def _check_mode(mode: str) -> None:
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown ELF loss mode {mode!r}; choose one of {LOSS_MODES}")


def mode_uses_front(mode: str) -> bool:
    _check_mode(mode)
    return "front" in mode


def mode_uses_rear(mode: str) -> bool:
    _check_mode(mode)
    return "rear" in mode


def mode_uses_task(mode: str) -> bool:
    _check_mode(mode)
    return mode.endswith("task")


def mode_needs_features(mode: str) -> bool:
    """True for every ELF mode (all but ``task`` and ``kd``): the teacher feature is needed
    (and, as in the reference, the rear is run on it, which updates BatchNorm statistics)."""
    _check_mode(mode)
    return mode not in ("task", KD_MODE)


def mode_needs_logits(mode: str) -> bool:
    """True for ``kd``: the teacher's logits of the clean images are needed."""
    _check_mode(mode)
    return mode == KD_MODE


def _row_weights(n: int, mask: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    if mask is None:
        w = jnp.ones((n,), jnp.float32)
    else:
        w = jnp.asarray(mask, jnp.float32).reshape((n,))
    return w, jnp.maximum(jnp.sum(w), 1.0)


def feature_loss(
    student: jax.Array,
    teacher: jax.Array,
    kind: str = "ce",
    *,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Distance D(student, teacher) between the student's front feature and the teacher's.

    Args:
      student: ``[N, ..., C]`` student front output (NHWC, channel last).
      teacher: same shape, the clean teacher feature (no gradient flows into it).
      kind: ``ce`` | ``l2`` | ``l1`` | ``cos`` (see module docstring).
      mask: optional ``[N]`` row weights (1 real, 0 padding).
    Returns: a float32 scalar.
    """
    _check_kind(kind)
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature_loss: student feature shape {tuple(student.shape)} does not match the "
            f"teacher feature shape {tuple(teacher.shape)}"
        )
    s = student.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    n = s.shape[0]
    w, wsum = _row_weights(n, mask)
    wb = w.reshape((n,) + (1,) * (s.ndim - 1))
    if kind == "ce":
        # -mean_{n,positions} sum_c t * log_softmax_c(s)
        per_pos = -jnp.sum(t * jax.nn.log_softmax(s, axis=-1), axis=-1)  # [N, ...]
        positions = per_pos[0].size
        return jnp.sum(per_pos * wb[..., 0]) / (wsum * positions)
    per_elem = s[0].size
    if kind == "l2":
        return jnp.sum(jnp.square(s - t) * wb) / (wsum * per_elem)
    if kind == "l1":
        return jnp.sum(jnp.abs(s - t) * wb) / (wsum * per_elem)
    # cos: the whole (real part of the) batch as ONE vector.
    sm, tm = s * wb, t * wb
    dot = jnp.sum(sm * tm)
    norm = jnp.sqrt(jnp.sum(jnp.square(sm))) * jnp.sqrt(jnp.sum(jnp.square(tm)))
    return 1.0 - dot / (norm + COS_EPS)


def task_loss(logits: jax.Array, labels: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
    """Cross-entropy with hard (int ``[N]``) or soft (float ``[N, K]``) labels, mean over rows
    (``nn.CrossEntropyLoss`` semantics for both)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    n = logp.shape[0]
    w, wsum = _row_weights(n, mask)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != (n,):
            raise ValueError(f"hard labels must have shape [{n}], got {tuple(labels.shape)}")
        per_row = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    else:
        if labels.shape != logp.shape:
            raise ValueError(
                f"soft labels must have shape {tuple(logp.shape)} (like the logits), "
                f"got {tuple(labels.shape)}"
            )
        per_row = -jnp.sum(labels.astype(jnp.float32) * logp, axis=-1)
    return jnp.sum(per_row * w) / wsum


def _accuracy(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    n = logits.shape[0]
    w, wsum = _row_weights(n, mask)
    target = labels if jnp.issubdtype(labels.dtype, jnp.integer) else jnp.argmax(labels, -1)
    hit = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
    return jnp.sum(hit * w) / wsum


def reference_loss_quirks(mode: str, kind: str, lambda_rear: Any) -> tuple[str, Any]:
    """``(kind, lambda_rear)`` as the reference's ``epoch()`` applies them in ``mode``: its
    ``front_task`` always uses the channel CE (``criterion``, not ``feature_criterion``) and
    its ``front_rear`` weighs the rear term by 1 (no ``lamda_rear``)."""
    if mode == "front_task":
        kind = "ce"
    if mode == "front_rear":
        lambda_rear = 1.0
    return kind, lambda_rear


def elf_objective(
    logits_img: jax.Array,
    logits_feat: Optional[jax.Array],
    student_feat: Optional[jax.Array],
    teacher_feat: Optional[jax.Array],
    labels: jax.Array,
    mode: str = "front_rear_task",
    kind: str = "ce",
    lambda_front: Any = 1.0,
    lambda_rear: Any = 1.0,
    *,
    mask: Optional[jax.Array] = None,
    reference_quirks: bool = False,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The ELF training objective.

    ``L = lambda_front * D(student_feat, teacher_feat) + lambda_rear * CE(logits_feat, y)
    + CE(logits_img, y)``, with the terms selected by ``mode``.

    Args:
      logits_img: ``h(phi(A(x)))``, ``[N, K]``.
      logits_feat: ``h(f)``, ``[N, K]`` (the teacher feature through the student's rear);
        may be None for modes without a rear term.
      student_feat: ``phi(A(x))``; may be None for modes without a front term.
      teacher_feat: ``f``, the clean teacher feature; may be None when not used.
      labels: int ``[N]`` or float ``[N, K]``.
      mode, kind: see module docstring. lambdas may be Python floats or traced scalars.
      mask: optional ``[N]`` row weights for padded batches.
      reference_quirks: apply :func:`reference_loss_quirks` (the reference's ablations).
    Returns:
      ``(loss, aux)`` with aux keys ``loss``, ``task``, ``front``, ``rear`` (0 for unused
      terms) and ``acc`` (training accuracy of ``logits_img``).
    """
    _check_mode(mode)
    if mode not in ELF_MODES:
        raise ValueError(f"elf_objective has no mode {mode!r} (one of {ELF_MODES}); the "
                         "'kd' mode's objective is kd_objective")
    _check_kind(kind)
    if reference_quirks:
        kind, lambda_rear = reference_loss_quirks(mode, kind, lambda_rear)
    zero = jnp.zeros((), jnp.float32)
    l_task = task_loss(logits_img, labels, mask=mask)
    l_front, l_rear = zero, zero
    if mode_uses_front(mode):
        if student_feat is None or teacher_feat is None:
            raise ValueError(f"mode {mode!r} needs student_feat and teacher_feat")
        l_front = feature_loss(student_feat, teacher_feat, kind, mask=mask)
    if mode_uses_rear(mode):
        if logits_feat is None:
            raise ValueError(f"mode {mode!r} needs logits_feat (the rear applied to the teacher feature)")
        l_rear = task_loss(logits_feat, labels, mask=mask)
    lf = jnp.asarray(lambda_front, jnp.float32)
    lr = jnp.asarray(lambda_rear, jnp.float32)
    loss = zero
    if mode_uses_front(mode):
        loss = loss + lf * l_front
    if mode_uses_rear(mode):
        loss = loss + lr * l_rear
    if mode_uses_task(mode):
        loss = loss + l_task
    aux = {
        "loss": loss,
        "task": l_task,
        "front": l_front,
        "rear": l_rear,
        "acc": _accuracy(logits_img, labels, mask),
    }
    return loss, aux


# ------------------------------------------------------------------ the KD control
# Hinton et al. (2015) distillation on the teacher's logits of the CLEAN synthetic images (the
# bank's). DSA still draws an augmentation of each image, as in every mode, and the target
# stays the clean image's logits -- the same choice as ELF's clean feature targets, so the two
# differ only in what of the teacher they use. No hard-label term: the control measures pure
# teacher knowledge. T = 4 (DEFAULT_KD_TEMPERATURE) is the usual CIFAR choice of the KD
# literature (e.g. the KD baseline of CRD, Tian et al. 2020); it is an option.
def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: Any = DEFAULT_KD_TEMPERATURE,
    *,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, summed over classes, mean over rows
    (torch's ``kl_div(..., reduction="batchmean") * T**2``); no gradient into the teacher."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; build the bank with a teacher over the "
            "same classes")
    t_inv = 1.0 / jnp.asarray(temperature, jnp.float32)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) * t_inv, -1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) * t_inv, -1)
    per_row = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    w, wsum = _row_weights(per_row.shape[0], mask)
    return jnp.sum(per_row * w) / (wsum * t_inv * t_inv)


def kd_objective(
    logits_img: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    temperature: Any = DEFAULT_KD_TEMPERATURE,
    *,
    mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The ``kd`` mode's ``(loss, aux)`` with :func:`elf_objective`'s aux keys: ``loss`` is
    :func:`kd_loss`; ``task`` (the hard-label CE) and ``acc`` are only reported."""
    zero = jnp.zeros((), jnp.float32)
    loss = kd_loss(logits_img, teacher_logits, temperature, mask=mask)
    return loss, {"loss": loss, "task": task_loss(logits_img, labels, mask=mask), "front": zero,
                  "rear": zero, "acc": _accuracy(logits_img, labels, mask)}
