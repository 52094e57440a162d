"""ONE per-device evaluation train step with the ELF objective.

``train_step(state, batch, key, *, net, protocol, axis_name=None) -> (state, metrics)``

Per minibatch ``(x, f, y)`` and one DSA draw ``A`` (key ``key``):

* ``z = front(A(x))`` and ``logits_img = rear(z)`` (BatchNorm in training mode; its running
  statistics are updated by this image path first),
* for every mode but ``task``: ``logits_feat = rear(f)`` on the CLEAN teacher feature, also
  in training mode,
* for a network wrapped with a feature adapter (``elf_jax.models.adapter``; its front
  output differs from the teacher feature): the front loss compares ``to_teacher(z)`` with
  ``f`` and the rear loss uses ``rear(from_teacher(f))``; the adapter trains with the net,
* ``loss = elf_objective(logits_img, logits_feat, z, f, y, mode, kind, lambda_front,
  lambda_rear)``; SGD (torch-coupled weight decay, momentum) with the lr of this epoch.
* mode ``kd`` (the knowledge-distillation control): ``loss = kd_objective(logits_img, t, y,
  protocol.kd_temperature)`` with ``t = batch["teacher_logits"]``, the teacher's logits of
  the CLEAN images (the image is augmented as in every mode); no rear pass on features.

BatchNorm in ``rear(f)`` -- what the reference does and what we do. The reference calls
``img_ftr, img_output = net(img)`` and then ``_, ftr_output = net(feature=ftr)`` with the
network in ``train()`` mode, whenever the mode is not ``task`` (also in ``front_task``, where
``ftr_output`` is not used). So in ``rear(f)`` every BN layer normalises with the batch
statistics OF THE FEATURE BATCH, and its running statistics receive a second momentum update,
from the feature batch, after the one from the image batch. We do the same: the rear is
applied to ``f`` in training mode with the batch statistics left by the image path, and the
final ``batch_stats`` are the ones after the feature path (in ``front_task`` too). This only
matters for nets with BN in the rear (ResNet18BN, VGG11BN); instance norm and the ConvNet's
dense rear have no running statistics.

Everything that can vary between repeats of a vectorised run (learning rate, lambdas) lives
in ``state.hparams`` as traced float32 scalars, so that repeats and lambda sweeps share one
compiled program; everything else is static in ``protocol``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from elf_jax.losses import elf_objective, kd_objective, mode_needs_features, mode_needs_logits
from elf_jax.keys import typed_key
from elf_jax.models.adapter import Adapted, init_variables
from elf_jax.train.protocol import TrainProtocol

__all__ = ["TrainState", "init_state", "train_step", "jit_train_step", "make_variables", "augment",
           "all_finite", "global_augment"]


def all_finite(tree) -> jax.Array:
    """True (a bool scalar) when every leaf of `tree` holds only finite values: the check
    behind every NaN stop (the engine's states, distillation's synthetic parameters)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class TrainState(NamedTuple):
    """Everything needed to continue an evaluation training exactly."""

    params: Any
    batch_stats: Any  # {} for nets without BatchNorm
    opt_state: Any
    hparams: Mapping[str, jax.Array]  # lr (base), lambda_front, lambda_rear: float32 scalars
    key: jax.Array  # raw uint32 PRNG key data for the data order and DSA of the coming epochs
    epoch: jax.Array  # int32: the next epoch to run (== epochs completed)
    step: jax.Array  # int32: optimizer steps taken


def make_variables(params, batch_stats) -> dict:
    if batch_stats:
        return {"params": params, "batch_stats": batch_stats}
    return {"params": params}


def default_hparams(protocol: TrainProtocol, lr: Optional[float] = None) -> dict:
    return {
        "lr": jnp.asarray(protocol.lr if lr is None else lr, jnp.float32),
        "lambda_front": jnp.asarray(protocol.lambda_front, jnp.float32),
        "lambda_rear": jnp.asarray(protocol.lambda_rear, jnp.float32),
    }


def init_state(
    net,
    protocol: TrainProtocol,
    init_key: jax.Array,
    train_key: jax.Array,
    sample_images: jax.Array,
    hparams: Optional[Mapping[str, Any]] = None,
) -> TrainState:
    """Initialises the network (``net.init(init_key, x, train=False)``; an adapted network's
    own weights equal the bare network's) and the optimizer."""
    variables = init_variables(net, init_key, sample_images)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    hp = default_hparams(protocol)
    if hparams:
        hp.update({k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()})
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=protocol.optimizer().init(params),
        hparams=hp,
        key=jnp.asarray(train_key, jnp.uint32),
        epoch=jnp.zeros((), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def augment(key, images, protocol: TrainProtocol):
    """DSA (mode S) on the images, or the identity for strategy ``none``/``""``."""
    if protocol.dsa_strategy in ("", "none", None):
        return images
    from elf_jax.augment import dsa

    return dsa(key, images, protocol.dsa_strategy, "S")


def _merge(old, new):
    """Deep-merges the returned mutable collection into the previous one."""
    if not isinstance(old, Mapping):
        return new
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(old[k], v) if k in old else v
    return out


def _apply(net, params, batch_stats, x, method, rng):
    """``net.apply`` in training mode; returns ``(out, new_batch_stats)``. ``rng`` feeds the
    ``dropout`` stream (only the ImageNet VGG heads use it)."""
    fn = getattr(net, method)
    rngs = {"dropout": rng}
    if batch_stats:
        out, upd = net.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            method=fn,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return out, _merge(batch_stats, upd["batch_stats"])
    return net.apply({"params": params}, x, train=True, method=fn, rngs=rngs), batch_stats


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    net,
    protocol: TrainProtocol,
    axis_name: Optional[str] = None,
):
    """One SGD step of the ELF objective (see the module docstring).

    Args:
      state: :class:`TrainState`.
      batch: ``{"images": [b,H,W,C], "labels": [b] int or [b,K] float, "features":
        [b,h,w,c], "teacher_logits": [b,K]}`` (``features`` only for the ELF modes,
        ``teacher_logits`` only for ``kd``).
      key: PRNG key (raw or typed) for this step's DSA draw.
      net: a Flax module from ``elf_jax.models.get_model`` (with ``front``/``rear``).
      protocol: static :class:`TrainProtocol`.
      axis_name: if set, gradients, BN statistics and metrics are averaged over this named
        axis (``pmap``/``shard_map`` data parallelism).
    Returns: ``(new_state, metrics)``; metrics: loss, task, front, rear, acc (float32).
    """
    mode = protocol.mode
    need_f = mode_needs_features(mode)
    images = batch["images"]
    labels = batch["labels"]
    feats = batch.get("features") if need_f else None
    if need_f and feats is None:
        raise ValueError(f"loss mode {mode!r} needs batch['features'] (the teacher feature bank)")
    t_logits = batch.get("teacher_logits") if mode_needs_logits(mode) else None
    if mode_needs_logits(mode) and t_logits is None:
        raise ValueError(f"loss mode {mode!r} needs batch['teacher_logits'] (the bank's logits)")
    cdt = protocol.compute_dtype
    key = typed_key(key)
    k_aug, k_drop_img, k_drop_feat = jax.random.split(key, 3)
    x = augment(k_aug, images, protocol).astype(cdt)
    adapted = isinstance(net, Adapted)

    def loss_fn(params):
        z, bs = _apply(net, params, state.batch_stats, x, "front", k_drop_img)
        logits_img, bs = _apply(net, params, bs, z, "rear", k_drop_img)
        logits_feat, z_vs_f = None, z
        if need_f:
            f = feats.astype(cdt)
            if adapted:
                z_vs_f, _ = _apply(net, params, bs, z, "to_teacher", k_drop_img)
            logits_feat, bs = _apply(net, params, bs, f,
                                     "rear_from_teacher" if adapted else "rear", k_drop_feat)
        if t_logits is not None:  # the KD control: the teacher's logits, no features
            loss, aux = kd_objective(logits_img, t_logits, labels, protocol.kd_temperature)
            return loss, (aux, bs)
        loss, aux = elf_objective(
            logits_img,
            logits_feat,
            z_vs_f,
            feats,
            labels,
            mode,
            protocol.kind,
            state.hparams["lambda_front"],
            state.hparams["lambda_rear"],
            reference_quirks=protocol.reference_loss_quirks,
        )
        return loss, (aux, bs)

    (_, (metrics, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
        new_bs = jax.lax.pmean(new_bs, axis_name)
    direction, opt_state = protocol.optimizer().update(grads, state.opt_state, state.params)
    lr = state.hparams["lr"] * protocol.lr_factor(state.epoch)
    params = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), state.params, direction)
    new_state = state._replace(
        params=params,
        batch_stats=jax.tree.map(lambda a, b: b.astype(a.dtype), state.batch_stats, new_bs)
        if state.batch_stats
        else state.batch_stats,
        opt_state=opt_state,
        step=state.step + 1,
    )
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("net", "protocol", "axis_name"), donate_argnums=(0,))
def jit_train_step(state, batch, key, *, net, protocol, axis_name=None):
    """``train_step`` under ``jax.jit`` with the state donated."""
    return train_step(state, batch, key, net=net, protocol=protocol, axis_name=axis_name)


def global_augment(batch: Mapping[str, Any], key, protocol) -> dict:
    """The DSA draw the per-device step would make on one device, applied to the GLOBAL
    batch: ``train_step`` splits its key into ``(k_aug, k_drop_img, k_drop_feat)`` and
    augments with ``k_aug``; so do we. The step then runs with ``dsa_strategy="none"``."""
    k_aug = jax.random.split(typed_key(key), 3)[0]
    out = dict(batch)
    out["images"] = augment(k_aug, batch["images"], protocol)
    return out
