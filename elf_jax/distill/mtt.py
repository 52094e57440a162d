"""MTT (Cazenavette et al. 2022, trajectory matching) and TESLA (Cui et al. 2023, constant
memory), as the reference ``distill_MTT.py``.

One iteration: a random expert trajectory and ``start ~ randint(0, max_start_epoch)``
(exclusive, numpy semantics); the student starts at ``expert[start]`` (a flat parameter
vector, ``jax.flatten_util.ravel_pytree``; the network is applied with the unraveled
parameters) and takes ``syn_steps`` SGD steps ``theta <- theta - syn_lr * grad CE`` on
minibatches of ``batch_syn`` synthetic images (default all; a fresh permutation whenever one
is used up; a short last chunk is dropped, or with ``syn_batch_remainder="reference"`` used
first as the reference does), each augmented with its own DSA draw (not siamese). The loss is

    ||theta_N - expert[start + expert_epochs]||^2 / ||expert[start] - expert[start + expert_epochs]||^2

and the images (SGD lr_img, momentum 0.5) and ``syn_lr`` (SGD lr_lr, momentum 0.5, starting
at lr_teacher) take one step on its gradient.

Gradients (``gradient=``):

* ``"unrolled"`` (MTT): reverse-mode through the ``lax.scan`` of the student steps; XLA keeps
  every step's residuals (activations), so memory grows linearly with ``syn_steps``.
* ``"remat"``: the same exact gradient with ``jax.checkpoint`` around each student step: the
  scan keeps only the carried parameters per step (``syn_steps * P`` floats) and recomputes
  the activations in the backward pass.
* ``"tesla"`` (TESLA's algorithm, the default of :func:`run_tesla`): with
  ``theta_N = theta_0 - syn_lr * sum_i g_i(theta_i, X_i)`` and ``a = dL/dtheta_N``, TESLA
  takes ``dL/dX = sum_i -syn_lr * a^T dg_i/dX`` and ``dL/dsyn_lr = -a^T sum_i g_i``, i.e. it
  drops the terms through ``theta_i``'s dependence on earlier batches (the Hessian
  products). Two passes: a forward pass to ``theta_N`` (nothing stored), then a second pass
  that recomputes ``theta_i`` step by step and accumulates each step's vector-Jacobian
  product. Memory is constant in ``syn_steps`` (no per-step parameters either); the cost is
  one extra gradient per step.

On XLA:CPU the student-step scans are fully unrolled up to ``elf_jax.loops.CPU_UNROLL_MAX`` steps
(:func:`elf_jax.loops.scan`: convolutions in a rolled loop take a slow CPU path);
the results are the rolled scan's up to float reassociation.

Soft labels (TESLA, ``soft_labels=True``): the label logits are the expert's logits (epoch
``soft_label_epoch`` of expert 0, default its last) on the initial images; the student loss
is the cross-entropy with ``softmax(logits)``; ``learn_labels=True`` also learns the logits
(SGD ``lr_label``). The set stores ``softmax(logits)`` as its soft labels.

Expert trajectories: a ``train_teacher``/``train_experts`` workdir, reference buffers
(``replay_buffer_<n>.pt``: one file, a directory of them read as the reference's
``--load_all``, a glob or a comma list; :func:`elf_jax.interop.torch.replay_buffer_files`),
or a list of trajectories (lists of per-epoch parameter trees). Without any, :func:`run_mtt` trains
``num_experts`` experts into ``<workdir>/experts`` (momentum 0, weight decay 0, as MTT's
``buffer.py``). BatchNorm networks run in training mode (batch statistics), as the
reference's functional ``ReparamModule``; the default ConvNet uses instance norm.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from elf_jax import loops
from elf_jax.distill import common as C
from elf_jax.train.step import all_finite
from elf_jax.hashing import fingerprint
from elf_jax.distill.settings import TrajectorySettings

__all__ = ["GRADIENTS", "load_expert_array", "make_mtt_step", "run_mtt", "run_tesla"]

GRADIENTS = ("unrolled", "remat", "tesla")
REMAINDERS = ("drop", "reference")  # a student batch_syn that does not divide the set


# ----------------------------------------------------------------------------- experts
def _describe(arch, model_kwargs, k, shape):
    kw = "".join(f", {a}={b}" for a, b in sorted(dict(model_kwargs or {}).items()))
    return f"{arch}({k} classes, input {tuple(shape)}{kw})"


def _params_of(tree):
    return tree["params"] if isinstance(tree, Mapping) and "params" in tree else tree


def load_expert_array(experts, *, arch: str, num_classes: int, image_shape: Sequence[int],
                      model_kwargs: Optional[Mapping[str, Any]] = None,
                      epochs_needed: int, max_experts: Optional[int] = None,
                      max_files: Optional[int] = None):
    """Expert trajectories as a float32 array ``[E, T, P]`` (``T = epochs_needed + 1``
    snapshots 0..epochs_needed, flat in ``ravel_pytree`` order of our parameter tree) plus
    the ``unravel`` function. ``experts``: a teacher workdir, reference buffers
    (:func:`elf_jax.interop.torch.replay_buffer_files`: a file, a directory, a glob or a
    comma list; every trajectory of every file in that order, the reference's
    ``--load_all``; ``max_files`` reads the first files only) or a list of trajectories;
    ``max_experts`` keeps the first trajectories of all. ``ValueError`` naming both
    architectures when the experts were trained for another network, or when the
    trajectories are too short; ``FileNotFoundError`` for a path holding neither."""
    from elf_jax.models import canonical_name, get_model

    model_kwargs = dict(model_kwargs or {})
    net = get_model(arch, num_classes, **model_kwargs)
    template = jax.eval_shape(lambda: net.init(jax.random.key(0),
                                               jnp.zeros((1,) + tuple(image_shape))))
    template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template["params"])
    flat0, unravel = ravel_pytree(template)
    want = _describe(arch, model_kwargs, num_classes, image_shape)
    trajs = []
    if isinstance(experts, (str, Path)) and (Path(experts) / "trajectory.json").is_file():
        from elf_jax.teacher import load_trajectory, read_manifest

        m = read_manifest(experts)
        have = _describe(m["net_name"], m.get("model_kwargs"), m["num_classes"],
                         m["image_shape"])
        same = (canonical_name(m["net_name"]) == canonical_name(arch)
                and dict(m.get("model_kwargs") or {}) == model_kwargs
                and int(m["num_classes"]) == int(num_classes)
                and tuple(m["image_shape"]) == tuple(image_shape))
        if not same:
            raise ValueError(f"expert trajectories in {experts} were trained for {have}, but "
                             f"this distillation uses {want}; train experts for {arch} (or "
                             "distill with the experts' architecture)")
        if int(m["epochs"]) < epochs_needed:
            raise ValueError(f"expert trajectories in {experts} have {m['epochs']} epochs, "
                             f"but max_start_epoch + expert_epochs needs {epochs_needed}")
        n = int(m.get("num_experts", 1))
        for e in range(min(n, max_experts or n)):
            trajs.append([_params_of(v) for v in load_trajectory(
                experts, expert=e, epochs=range(epochs_needed + 1))])
    elif isinstance(experts, (str, Path)):
        trajs = _reference_trajectories(experts, arch, num_classes, image_shape, model_kwargs,
                                        epochs_needed + 1, max_experts, max_files)
    else:
        trajs = [[_params_of(v) for v in t] for t in experts][:max_experts]
    if not trajs:
        raise ValueError("no expert trajectories were given")
    out = np.zeros((len(trajs), epochs_needed + 1, flat0.size), np.float32)
    for i, t in enumerate(trajs):
        if len(t) < epochs_needed + 1:
            raise ValueError(f"expert trajectory {i} has {len(t)} snapshots, but "
                             f"max_start_epoch + expert_epochs needs {epochs_needed + 1}")
        for j in range(epochs_needed + 1):
            ok = jax.tree.structure(t[j]) == jax.tree.structure(template) and all(
                a.shape == b.shape for a, b in zip(jax.tree.leaves(t[j]),
                                                   jax.tree.leaves(template)))
            if not ok:
                shapes = [tuple(a.shape) for a in jax.tree.leaves(t[j])]
                raise ValueError(f"expert trajectory {i}, epoch {j} does not fit {want} "
                                 f"(parameter shapes {shapes[:6]}...); the experts were "
                                 "trained for another architecture")
            out[i, j] = np.asarray(ravel_pytree(t[j])[0])
    return out, unravel


def _reference_trajectories(source, arch, num_classes, image_shape, model_kwargs, snapshots,
                            max_experts, max_files) -> list:
    """Every trajectory of the reference buffers ``source`` names, concatenated in the
    reference's order, each cut to its first ``snapshots`` snapshots."""
    from elf_jax.interop.torch import load_replay_buffer, replay_buffer_files

    if Path(source).is_dir() and not (Path(source) / "replay_buffer_0.pt").is_file():
        raise FileNotFoundError(f"{source} holds neither expert trajectories of ours "
                                "(trajectory.json: train_teacher / train_experts) nor reference "
                                "buffers (replay_buffer_0.pt, ...)")
    trajs = []
    for path in replay_buffer_files(source)[:max_files]:
        left = None if max_experts is None else int(max_experts) - len(trajs)
        if left is not None and left <= 0:
            break
        trajs += [[_params_of(v) for v in t] for t in load_replay_buffer(
            path, arch, num_classes, tuple(image_shape), max_trajectories=left,
            max_epochs=snapshots, **model_kwargs)]
    return trajs


# ----------------------------------------------------------------------------- steps
def _soft_ce(logits, targets, weights=None):
    per_row = -jnp.sum(targets * jax.nn.log_softmax(logits), -1)
    if weights is None:
        return jnp.mean(per_row)
    return jnp.sum(per_row * weights) / jnp.sum(weights)  # the mean over the real rows


class _Student:
    """The functional student: per-step gradient of CE w.r.t. the flat parameters."""

    def __init__(self, net, unravel, *, num_classes, batch_syn, syn_steps, dsa_strategy,
                 bn_template=None, remainder="drop"):
        if remainder not in REMAINDERS:
            raise ValueError(f"syn_batch_remainder={remainder!r}: choose one of "
                             f"{', '.join(REMAINDERS)}")
        self.remainder = remainder
        self.net, self.unravel = net, unravel
        self.k, self.b, self.steps = num_classes, batch_syn, syn_steps
        self.dsa = dsa_strategy if dsa_strategy not in (None, "", "none", "None") else None
        self.bn = bn_template

    def logits(self, flat, x):
        params = self.unravel(flat)
        if self.bn:
            out, _ = self.net.apply({"params": params, "batch_stats": self.bn}, x, train=True,
                                    mutable=["batch_stats"])
            return out
        return self.net.apply({"params": params}, x, train=True)

    def targets(self, syn, hard_labels):
        if "labels" in syn:
            return jax.nn.softmax(syn["labels"], -1)
        if hard_labels.ndim == 2:  # fixed soft-label logits
            return jax.nn.softmax(hard_labels, -1)
        return jax.nn.one_hot(hard_labels, self.k)

    def schedule(self, key, n):
        """Per student step ``(indices [b], DSA key[, row weights [b]])``, stacked over the
        ``syn_steps``: a fresh permutation when one is used up. A partial last chunk of a
        permutation is skipped (``remainder="drop"``: static shapes), or used first as a
        full-size batch whose padding rows weigh 0 (``"reference"``)."""
        b = min(self.b or n, n)
        short = n % b if self.remainder == "reference" else 0
        per = n // b + (short > 0)
        nperm = -(-self.steps // per)
        k_perm, k_aug = jax.random.split(key)
        perms = jax.vmap(lambda kk: jax.random.permutation(kk, n))(
            jax.random.split(k_perm, nperm))
        keys = jax.random.split(k_aug, self.steps)
        if not short:
            idx = perms[:, :(n // b) * b].reshape(nperm * per, b)[:self.steps]
            return idx, keys
        idx = jax.vmap(lambda p: _reference_chunks(p, b))(perms).reshape(nperm * per, b)
        w = jnp.tile(jnp.concatenate([(jnp.arange(b) < short)[None].astype(jnp.float32),
                                      jnp.ones((per - 1, b), jnp.float32)]), (nperm, 1))
        return idx[:self.steps], keys, w[:self.steps]

    def grad(self, flat, images, targets, xs):
        idx, key, w = xs if len(xs) == 3 else (*xs, None)
        x = images[idx]
        if self.dsa is not None:
            from elf_jax.augment import dsa

            x = dsa(key, x, self.dsa, "S")
        return jax.grad(lambda p: _soft_ce(self.logits(p, x), targets[idx], w))(flat)


def _reference_chunks(perm, b):
    """The reference's order of ``torch.split(perm, b)`` under ``pop()``: the short last
    chunk first (padded to ``b`` with rows of the permutation's start, weighed 0 by the
    caller), then the full chunks, last first. ``[ceil(n / b), b]``."""
    m = perm.shape[0] // b
    short = jnp.concatenate([perm[m * b:], perm[:b - (perm.shape[0] - m * b)]])
    return jnp.concatenate([short[None], perm[:m * b].reshape(m, b)[::-1]])


def _param_loss(theta_n, start, target):
    return jnp.sum((theta_n - target) ** 2) / jnp.sum((start - target) ** 2)


def _make_step(net, unravel, *, num_classes, syn_steps, lrs, momentum, batch_syn,
               dsa_strategy, hard_labels, gradient, bn_template=None, remainder="drop"):
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
    optimizer = C.make_optimizer(lrs, momentum)
    st = _Student(net, unravel, num_classes=num_classes, batch_syn=batch_syn,
                  syn_steps=syn_steps, dsa_strategy=dsa_strategy, bn_template=bn_template,
                  remainder=remainder)
    hard = jnp.asarray(hard_labels)

    def unrolled_loss(syn, start, target, key):
        images, lr = syn["images"], syn["lr"]
        targets = st.targets(syn, hard)
        sched = st.schedule(key, images.shape[0])

        def body(theta, xs):
            return theta - lr * st.grad(theta, images, targets, xs), None

        if gradient == "remat":
            body = jax.checkpoint(body)
        theta_n, _ = loops.scan(body, start, sched)
        return _param_loss(theta_n, start, target)

    def tesla_value_and_grad(syn, start, target, key):
        images, lr = syn["images"], syn["lr"]
        learn_labels = "labels" in syn
        sched = st.schedule(key, images.shape[0])
        targets = st.targets(syn, hard)

        def fwd(theta, xs):
            return theta - lr * st.grad(theta, images, targets, xs), None

        theta_n, _ = loops.scan(fwd, start, sched)
        den = jnp.sum((start - target) ** 2)
        loss = jnp.sum((theta_n - target) ** 2) / den
        a = 2.0 * (theta_n - target) / den  # dL/dtheta_N

        def bwd(carry, xs):
            theta, g_sum, g_img, g_lab = carry
            if learn_labels:
                g, vjp = jax.vjp(lambda im, lab: st.grad(theta, im, jax.nn.softmax(lab, -1), xs),
                                 images, syn["labels"])
                d_img, d_lab = vjp(-lr * a)
                g_lab = g_lab + d_lab
            else:
                g, vjp = jax.vjp(lambda im: st.grad(theta, im, targets, xs), images)
                (d_img,) = vjp(-lr * a)
            return (theta - lr * g, g_sum + g, g_img + d_img, g_lab), None

        g_lab0 = jnp.zeros_like(syn["labels"]) if learn_labels else jnp.zeros(())
        (_, g_sum, g_img, g_lab), _ = loops.scan(
            bwd, (start, jnp.zeros_like(start), jnp.zeros_like(images), g_lab0), sched)
        grads = {"images": g_img, "lr": -jnp.vdot(a, g_sum)}
        if learn_labels:
            grads["labels"] = g_lab
        return loss, grads

    @jax.jit
    def step(state: C.DistillState, key, start, target):
        if gradient == "tesla":
            loss, grads = tesla_value_and_grad(state.syn, start, target, key)
        else:
            loss, grads = jax.value_and_grad(unrolled_loss)(state.syn, start, target, key)
        state = C.apply_grads(state, grads, optimizer)
        return state, {"loss": loss, "syn_lr": state.syn["lr"],
                       "finite": all_finite(state.syn)}

    step.optimizer = optimizer
    return step


def make_mtt_step(net, unravel, *, num_classes, hard_labels, syn_steps=20, lr_img=1e3,
                  lr_lr=1e-5, momentum=0.5, batch_syn=None, dsa_strategy=C.DEFAULT_STRATEGY,
                  gradient="unrolled", bn_template=None, lr_label=None,
                  syn_batch_remainder="drop"):
    """The jitted MTT step ``(state, key, start [P], target [P]) -> (state, metrics)``;
    ``state.syn = {"images", "lr"[, "labels"]}``. ``syn_batch_remainder``: see
    :class:`elf_jax.distill.settings.TrajectorySettings`."""
    lrs = {"images": lr_img, "lr": lr_lr}
    if lr_label is not None:
        lrs["labels"] = lr_label
    return _make_step(net, unravel, num_classes=num_classes, syn_steps=syn_steps, lrs=lrs,
                      momentum=momentum, batch_syn=batch_syn, dsa_strategy=dsa_strategy,
                      hard_labels=hard_labels, gradient=gradient, bn_template=bn_template,
                      remainder=syn_batch_remainder)


# ----------------------------------------------------------------------------- driver hook
def _train_experts(method, s: TrajectorySettings, p: C.Prelude, epochs: int) -> Path:
    """Trains ``num_experts`` experts into ``<workdir>/experts`` (no experts were given)."""
    if p.workdir is None:
        raise ValueError(f"{method} needs expert trajectories: pass experts= (a teacher "
                         "workdir, a replay_buffer_<n>.pt or a list) or a workdir to "
                         "train them in")
    from elf_jax.teacher import train_experts

    train_experts(s.arch, p.train, epochs=int(s.expert_train_epochs or epochs),
                  num_experts=int(s.num_experts), workdir=Path(p.workdir) / "experts",
                  model_kwargs=dict(s.model_kwargs), progress=p.progress)
    return Path(p.workdir) / "experts"


def _remainder(s: TrajectorySettings, bn_template, n: int) -> str:
    """``s.syn_batch_remainder``, refused where a padded short batch would not be exact: a
    BatchNorm student (the padding rows would enter the batch statistics)."""
    mode = s.syn_batch_remainder
    if mode not in REMAINDERS:
        raise ValueError(f"syn_batch_remainder={mode!r}: choose one of {', '.join(REMAINDERS)}")
    b = min(int(s.batch_syn or n), n)
    if mode == "reference" and n % b and bn_template:
        raise ValueError(f"syn_batch_remainder='reference' with batch_syn={b} on {n} images "
                         f"pads a short batch of {n % b}, whose padding rows would enter "
                         f"{s.arch}'s BatchNorm statistics; use 'drop' or a batch_syn that "
                         "divides the set")
    return mode


def setup(method: str, s: TrajectorySettings, p: C.Prelude) -> C.Plan:
    """The driver's hook: expert trajectories (loaded, or trained first), optional soft
    labels, the MTT/TESLA step, and ``advance`` drawing the expert and the start epoch."""
    gradient = s.gradient or {"mtt": "unrolled", "tesla": "tesla"}[method]
    if s.remat and gradient == "unrolled":
        gradient = "remat"
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
    if int(s.max_start_epoch) < 1 or int(s.expert_epochs) < 1 or int(s.syn_steps) < 1:
        raise ValueError("max_start_epoch, expert_epochs and syn_steps must be >= 1")
    if not np.isfinite(s.lr_teacher):
        raise C.DistillationDiverged(f"{method}: lr_teacher (the initial syn_lr) is "
                                     f"{s.lr_teacher}; it must be a finite positive number")
    needed = int(s.max_start_epoch) - 1 + int(s.expert_epochs)  # start < max_start_epoch
    experts = s.experts or _train_experts(method, s, p, needed)
    traj, unravel = load_expert_array(experts, arch=s.arch, num_classes=p.num_classes,
                                      image_shape=p.images.shape[1:],
                                      model_kwargs=s.model_kwargs, epochs_needed=needed,
                                      max_experts=s.max_experts, max_files=s.max_files)
    variables = p.net.init(jax.random.key(0), jnp.asarray(p.images[:1]), train=False)
    bn_template = variables.get("batch_stats") or None

    syn0 = {"images": p.images, "lr": np.float32(s.lr_teacher)}
    hard = p.labels
    if s.soft_labels:
        e0 = traj.shape[1] - 1 if s.soft_label_epoch is None else int(s.soft_label_epoch)
        logits = p.net.apply({"params": unravel(jnp.asarray(traj[0, e0])),
                              **({"batch_stats": bn_template} if bn_template else {})},
                             jnp.asarray(p.images), train=False)
        if s.learn_labels:
            syn0["labels"] = np.asarray(logits, np.float32)
        else:
            hard = np.asarray(logits, np.float32)  # fixed soft-label logits
    step = make_mtt_step(p.net, unravel, num_classes=p.num_classes, hard_labels=hard,
                         syn_steps=int(s.syn_steps), lr_img=s.lr_img, lr_lr=s.lr_lr,
                         momentum=s.momentum, batch_syn=s.batch_syn,
                         dsa_strategy=s.dsa_strategy, gradient=gradient,
                         bn_template=bn_template,
                         lr_label=s.lr_label if (s.soft_labels and s.learn_labels) else None,
                         syn_batch_remainder=_remainder(s, bn_template, len(p.images)))
    traj_dev = jnp.asarray(traj)

    def advance(state):
        k_e, k_s, k_step = jax.random.split(C.iteration_key(state), 3)
        e = int(jax.random.randint(k_e, (), 0, traj.shape[0]))
        t = int(jax.random.randint(k_s, (), 0, int(s.max_start_epoch)))
        return step(state, k_step, traj_dev[e, t], traj_dev[e, t + int(s.expert_epochs)])

    meta = {"syn_steps": int(s.syn_steps), "expert_epochs": int(s.expert_epochs),
            "max_start_epoch": int(s.max_start_epoch), "lr_lr": s.lr_lr,
            "lr_teacher": s.lr_teacher, "batch_syn": s.batch_syn, "gradient": gradient,
            "soft_labels": bool(s.soft_labels), "learn_labels": bool(s.learn_labels),
            # recorded when not the default (older runs resume as before)
            **({} if s.syn_batch_remainder == "drop" else
               {"syn_batch_remainder": s.syn_batch_remainder}),
            "experts_hash": fingerprint(json.dumps([float(traj.sum()), list(traj.shape)]))}
    labels = None if np.ndim(hard) == 1 else np.asarray(jax.nn.softmax(jnp.asarray(hard), -1))
    return C.Plan(syn0, step.optimizer, advance, meta, labels, {"gradient": gradient})


def run_mtt(dataset, **kwargs):
    """MTT: :func:`elf_jax.distill.common.distill` with :class:`TrajectorySettings` fields."""
    return C.distill("mtt", dataset, **kwargs)


def run_tesla(dataset, **kwargs):
    """TESLA: MTT with the constant-memory gradient (see the module docstring)."""
    return C.distill("tesla", dataset, **kwargs)
