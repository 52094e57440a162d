"""DC and DSA: gradient matching (Zhao et al. 2021; Zhao & Bilen 2021), as the reference
``distill_DSA.py`` / DC ``main.py``.

One iteration (one jitted step; on XLA:CPU, and for a ``StreamedSplit`` on every backend, a
Python loop of jitted pieces, see :func:`make_gm_step`'s ``host_loop``): a freshly
initialized network; ``outer_loop`` rounds of

1. (BatchNorm nets) running statistics from 16 real images per class, then frozen;
2. for every class c: the CE gradient of the network's parameters on ``batch_real`` real
   images of c (a constant) and on the ipc synthetic images of c (differentiable w.r.t. the
   images); DSA: both batches go through the same DSA draw (siamese); the distance between
   the two gradients (``dis_metric``) summed over classes;
3. one SGD step on the images (lr_img 0.1, momentum 0.5);
4. except after the last round: ``inner_loop`` epochs of training the network on the
   (detached) synthetic set, SGD lr_net 0.01 without momentum, minibatches of
   ``batch_train`` reshuffled each epoch, DSA (not siamese) for DSA, none for DC.

Classes run one after another under ``lax.map`` (``class_loop="map"``, default) or
vectorised with ``vmap`` (``"vmap"``: per-class parameter gradients of one network become
grouped convolutions, slower on the CPU); the DSA draws run per class under ``lax.map`` so
each class computes only its drawn group.

Distances (``dis_metric``), over the parameter gradient tensors:

* ``ours`` (reference default): per tensor, rows = output units, ``sum_rows 1 - cos``; our
  kernels are HWIO / [in, out], so a tensor is reshaped to ``[out, rest]`` with ``out`` its
  LAST axis (the reference's first axis in OIHW / [out, in]); 1-D tensors contribute 0.
* ``mse``: squared Euclidean distance of the concatenated gradients.
* ``cos``: ``1 - cos`` of the concatenated gradients.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elf_jax.data.sampler import (ClassArrays, StreamedClassIndex, class_index,
                                  sample_all_classes)
from elf_jax import loops
from elf_jax.distill import common as C
from elf_jax.train.step import all_finite
from elf_jax.distill.settings import GradientMatchingSettings

__all__ = ["get_loops", "gradient_distance", "make_gm_step", "run_dc", "run_dsa",
           "DIS_METRICS"]

DIS_METRICS = ("ours", "mse", "cos")
_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
BN_SIZE_PER_CLASS = 16


def get_loops(ipc: int):
    """``(outer_loop, inner_loop)`` of the reference for ``ipc``."""
    if int(ipc) not in _LOOPS:
        raise ValueError(f"the reference defines (outer_loop, inner_loop) only for ipc in "
                         f"{sorted(_LOOPS)}; got ipc={ipc}: pass outer_loop and inner_loop")
    return _LOOPS[int(ipc)]


def _safe_norm(x, axis=-1):
    ss = jnp.sum(x * x, axis=axis)
    pos = ss > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)  # grad 0 at 0, as torch


def _rows(g):
    """``[out, rest]`` with ``out`` = the last axis (HWIO conv / [in, out] dense kernels)."""
    return jnp.moveaxis(g, -1, 0).reshape(g.shape[-1], -1)


def gradient_distance(g_real, g_syn, metric: str = "ours"):
    """The reference ``match_loss`` between two gradient pytrees."""
    lr_, ls_ = jax.tree.leaves(g_real), jax.tree.leaves(g_syn)
    if metric == "ours":
        total = jnp.zeros((), jnp.float32)
        for a, b in zip(lr_, ls_):
            if a.ndim <= 1:
                continue  # biases and norm scales contribute 0
            ra, rb = _rows(a), _rows(b)
            cos = jnp.sum(ra * rb, -1) / (_safe_norm(ra) * _safe_norm(rb) + 1e-6)
            total = total + jnp.sum(1.0 - cos)
        return total
    va = jnp.concatenate([a.reshape(-1) for a in lr_])
    vb = jnp.concatenate([b.reshape(-1) for b in ls_])
    if metric == "mse":
        return jnp.sum((vb - va) ** 2)
    if metric == "cos":
        return 1.0 - jnp.sum(va * vb) / (_safe_norm(va) * _safe_norm(vb) + 1e-6)
    raise ValueError(f"unknown dis_metric {metric!r}; choose one of {DIS_METRICS}")


def _ce(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _variables(params, bstats):
    return {"params": params, "batch_stats": bstats} if bstats else {"params": params}


@functools.lru_cache(maxsize=16)
def make_gm_step(net, *, num_classes: int, ipc: int, outer_loop: int, inner_loop: int,
                 lr_img: float = 0.1, momentum: float = 0.5, lr_net: float = 0.01,
                 batch_real: int = 256, batch_train: int = 256, dis_metric: str = "ours",
                 dsa_strategy: Optional[str] = C.DEFAULT_STRATEGY, class_loop: str = "map",
                 host_loop: Optional[bool] = None):
    """The DC/DSA step ``(state, key, pool) -> (state, metrics)``; real batches are drawn
    from ``pool``: ``ClassIndex(train).arrays`` (the split on the device), drawn inside the
    jitted round (``outer_loop * K * batch_real`` images per iteration would not fit as an
    argument), or a ``StreamedClassIndex`` (a ``StreamedSplit``): each round's indices are
    drawn with the same keys and functions before the rounds run, each round's rows read on
    the host and passed into that round (needs ``host_loop=True``; the same draws, so the
    same result to float reassociation). ``dsa_strategy=None``: DC. ``class_loop``:
    ``"map"`` (classes one after another under ``lax.map``) or ``"vmap"`` (vectorised: the
    per-class weight gradients become batched/grouped convolutions, measured slower on the
    CPU, see docs/benchmarks_notes.md).

    ``host_loop`` (default: on XLA:CPU): the outer rounds and inner epochs are a Python
    loop dispatching jitted pieces (one round's matching + image update, one training
    epoch; no host synchronisation) instead of one jitted step with ``lax.scan``: on the
    CPU convolutions in a rolled loop take a slow path, and unrolling the whole step would
    compile for minutes. The class loop and an epoch's minibatches are unrolled there
    (:func:`elf_jax.loops.scan`). Same results as the jitted step up to float
    reassociation. ``False``: one jitted step (GPU/TPU). A ``StreamedClassIndex`` pool
    needs the host loop on every backend (``setup`` turns it on for a ``StreamedSplit``)."""
    if class_loop not in ("map", "vmap"):
        raise ValueError(f"class_loop must be 'map' or 'vmap', got {class_loop!r}")
    if dis_metric not in DIS_METRICS:
        raise ValueError(f"unknown dis_metric {dis_metric!r}; choose one of {DIS_METRICS}")
    if outer_loop < 1 or inner_loop < 0:
        raise ValueError(f"outer_loop must be >= 1 and inner_loop >= 0, got "
                         f"({outer_loop}, {inner_loop})")
    if host_loop is None:
        host_loop = loops.cpu_loops()
    optimizer = C.make_optimizer({"images": lr_img}, momentum)
    k, dsa = num_classes, dsa_strategy if dsa_strategy not in ("", "none", "None") else None
    labels = jnp.repeat(jnp.arange(k, dtype=jnp.int32), ipc)
    train_between = inner_loop > 0 and outer_loop > 1

    def match_loss(images, params, bstats, real, key):
        syn = images.reshape((k, ipc) + images.shape[1:])
        real_a, syn_a = C.per_class_siamese(key, real, syn, dsa)
        variables = lambda p: _variables(p, bstats)  # noqa: E731

        def grads(x, c):
            y = jnp.full((x.shape[0],), c, jnp.int32)
            return jax.grad(lambda p: _ce(net.apply(variables(p), x, train=False), y))(params)

        def per_class(xr, xs, c):
            return gradient_distance(jax.lax.stop_gradient(grads(xr, c)), grads(xs, c),
                                     dis_metric)

        if class_loop == "vmap":
            return jnp.sum(jax.vmap(per_class)(real_a, syn_a, jnp.arange(k)))
        return jnp.sum(loops.map_(lambda a: per_class(*a), (real_a, syn_a, jnp.arange(k))))

    def sgd_step(pb, images, idx, kk):
        p, bs = pb
        x = images[idx]
        if dsa is not None:
            from elf_jax.augment import dsa as dsa_fn
            x = dsa_fn(kk, x, dsa, "S")

        def loss_fn(p_):
            if bs:
                out, upd = net.apply(_variables(p_, bs), x, train=True, mutable=["batch_stats"])
                return _ce(out, labels[idx]), upd["batch_stats"]
            return _ce(net.apply({"params": p_}, x, train=True), labels[idx]), bs

        g, new_bs = jax.grad(loss_fn, has_aux=True)(p)
        return (jax.tree.map(lambda a, d: a - lr_net * d, p, g), new_bs)

    def epoch(pb, images, kk):
        """One epoch of SGD(lr_net) on the (detached) synthetic set (BN in train mode)."""
        n = images.shape[0]
        b = min(batch_train, n)
        nfull, last = n // b, n % b
        k_perm, k_aug = jax.random.split(kk)
        perm = jax.random.permutation(k_perm, n)
        keys = jax.random.split(k_aug, nfull + 1)
        pb, _ = loops.scan(lambda c, xs: (sgd_step(c, images, xs[0], xs[1]), None), pb,
                       (perm[:nfull * b].reshape(nfull, b), keys[:nfull]))
        if last:
            pb = sgd_step(pb, images, perm[nfull * b:], keys[nfull])
        return pb

    def train_net(params, bstats, images, key):
        """``inner_loop`` epochs on the synthetic set."""
        (params, bstats), _ = jax.lax.scan(lambda pb, kk: (epoch(pb, images, kk), None),
                                           (params, bstats), jax.random.split(key, inner_loop))
        return params, bstats

    def init_net(key, example):
        k_net, k_rounds = jax.random.split(key)
        variables = net.init(k_net, example, train=False)  # its shape only
        return (variables["params"], variables.get("batch_stats", {}),
                jax.random.split(k_rounds, outer_loop))

    def draw(sample, kk, bn: bool):
        """A round's ``(BN batch or None, matching batch)`` of ``sample(key, n)`` (images
        [K, n, ...] or, streamed, their indices [K, n]) with the round's keys."""
        k_bn, k_real, _, _ = jax.random.split(kk, 4)
        return (sample(k_bn, BN_SIZE_PER_CLASS) if bn else None, sample(k_real, batch_real))

    def match_drawn(params, bstats, syn, opt_state, xbn, real, kk):
        """Steps 1-3 of a round on its drawn real images (``xbn [K, 16, ...]`` or None,
        ``real [K, B, ...]``); returns the statistics, set, optimizer state, the loss and
        the key of the round's training."""
        _, _, k_aug, k_train = jax.random.split(kk, 4)
        if bstats:  # running statistics from 16 real images per class, then frozen
            xbn = xbn.reshape((-1,) + xbn.shape[2:])
            _, upd = net.apply(_variables(params, bstats), xbn, train=True,
                               mutable=["batch_stats"])
            bstats = upd["batch_stats"]
        loss, g = jax.value_and_grad(match_loss)(syn["images"], params, bstats, real, k_aug)
        updates, opt_state = optimizer.update({"images": g}, opt_state, syn)
        syn = optax.apply_updates(syn, updates)
        return bstats, syn, opt_state, loss, k_train

    def match_round(params, bstats, syn, opt_state, pool, kk):
        """`match_drawn` on the round's draws from the device ``pool``."""
        xbn, real = draw(functools.partial(sample_all_classes, pool), kk, bool(bstats))
        return match_drawn(params, bstats, syn, opt_state, xbn, real, kk)

    def finish(state, syn, opt_state, losses):
        state = state._replace(syn=syn, opt_state=opt_state, iteration=state.iteration + 1)
        return state, {"loss": jnp.mean(losses) / k, "finite": all_finite(syn)}

    if host_loop:
        j_init = jax.jit(init_net)
        j_round = jax.jit(match_round)
        j_drawn = jax.jit(match_drawn)
        j_epoch = jax.jit(epoch)
        j_finish = jax.jit(finish)
        j_epoch_keys = jax.jit(lambda kk: jax.random.split(kk, inner_loop))

        def step(state: C.DistillState, key, pool: Union[ClassArrays, StreamedClassIndex]):
            streamed = isinstance(pool, StreamedClassIndex)
            params, bstats, round_keys = j_init(key, _example(pool))
            if streamed:  # every round's indices first: reading a round's rows then
                # overlaps the previous round's (asynchronously dispatched) device work
                def indices(kk, n):
                    return np.asarray(pool.sample_all_classes_indices(kk, n))

                drawn = [draw(indices, round_keys[ol], bool(bstats)) for ol in range(outer_loop)]
            syn, opt_state, losses = state.syn, state.opt_state, []
            for ol in range(outer_loop):
                if streamed:
                    xbn, real = (None if i is None else pool.images_at(i) for i in drawn[ol])
                    bstats, syn, opt_state, loss, k_train = j_drawn(
                        params, bstats, syn, opt_state, xbn, real, round_keys[ol])
                else:
                    bstats, syn, opt_state, loss, k_train = j_round(
                        params, bstats, syn, opt_state, pool, round_keys[ol])
                losses.append(loss)
                if train_between and ol < outer_loop - 1:
                    images = jax.lax.stop_gradient(syn["images"])
                    pb, epoch_keys = (params, bstats), j_epoch_keys(k_train)
                    for e in range(inner_loop):
                        pb = j_epoch(pb, images, epoch_keys[e])
                    params, bstats = pb
            return j_finish(state, syn, opt_state, jnp.stack(losses))
    else:
        @jax.jit
        def jitted_step(state: C.DistillState, key, pool: ClassArrays):
            params, bstats0, round_keys = init_net(key, _example(pool))

            def round_(carry, xs):
                params, bstats, syn, opt_state = carry
                ol, kk = xs
                bstats, syn, opt_state, loss, k_train = match_round(params, bstats, syn,
                                                                    opt_state, pool, kk)
                if train_between:
                    params, bstats = jax.lax.cond(
                        ol < outer_loop - 1,
                        lambda pb: train_net(pb[0], pb[1],
                                             jax.lax.stop_gradient(syn["images"]), k_train),
                        lambda pb: pb, (params, bstats))
                return (params, bstats, syn, opt_state), loss

            (_, _, syn, opt_state), losses = jax.lax.scan(
                round_, (params, bstats0, state.syn, state.opt_state),
                (jnp.arange(outer_loop), round_keys))
            return finish(state, syn, opt_state, losses)

        def step(state: C.DistillState, key, pool: ClassArrays):
            if isinstance(pool, StreamedClassIndex):
                raise ValueError("a StreamedSplit's real batches are read on the host every "
                                 "round: make the step with host_loop=True")
            return jitted_step(state, key, pool)

    step.optimizer = optimizer
    return step


def _example(pool) -> jax.Array:
    """A zero image batch ``[1, H, W, C]`` of the pool's shape (to initialize the net)."""
    shape = pool.split.image_shape if isinstance(pool, StreamedClassIndex) else \
        pool.images.shape[1:]
    return jnp.zeros((1,) + tuple(shape), jnp.float32)


def setup(method: str, s: GradientMatchingSettings, p: C.Prelude) -> C.Plan:
    """The driver's hook: DC (no augmentation) or DSA; (outer_loop, inner_loop) not given
    are the reference's for the ipc. A ``StreamedSplit`` train set runs the host loop on
    every backend (its rows are read on the host round by round); an in-memory one draws
    from its device copy (host loop on XLA:CPU only)."""
    outer, inner = s.outer_loop, s.inner_loop
    if outer is None or inner is None:
        o, i = get_loops(s.ipc)
        outer, inner = o if outer is None else outer, i if inner is None else inner
    b = C.real_batch_size(p.train, s.batch_real)
    index = class_index(p.train)
    streamed = isinstance(index, StreamedClassIndex)
    pool = index if streamed else index.arrays
    step = make_gm_step(p.net, num_classes=p.num_classes, ipc=s.ipc, outer_loop=int(outer),
                        inner_loop=int(inner), lr_img=s.lr_img, momentum=s.momentum,
                        lr_net=s.lr_net, batch_real=b, batch_train=s.batch_train,
                        dis_metric=s.dis_metric,
                        dsa_strategy=s.dsa_strategy if method == "dsa" else None,
                        host_loop=True if streamed else None)

    def advance(state):
        return step(state, C.iteration_key(state), pool)

    return C.Plan({"images": p.images}, step.optimizer, advance,
                  {"lr_net": s.lr_net, "batch_real": b, "batch_train": s.batch_train,
                   "outer_loop": int(outer), "inner_loop": int(inner),
                   "dis_metric": s.dis_metric, "num_train": int(len(p.train.labels)),
                   "dsa_strategy": s.dsa_strategy if method == "dsa" else "none"})


def run_dsa(dataset, **kwargs):
    """DSA: :func:`elf_jax.distill.common.distill` with GradientMatchingSettings fields."""
    return C.distill("dsa", dataset, **kwargs)


def run_dc(dataset, **kwargs):
    """DC (DSA without augmentation); see :func:`run_dsa`."""
    return C.distill("dc", dataset, **kwargs)
