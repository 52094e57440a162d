"""DM: distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution
Matching"), as the reference ``distill_DM.py``.

One iteration: a freshly initialized network (not trained; its parameters are constants);
for every class c, ``batch_real`` random real images of c and the ipc synthetic images of c
go through the SAME DSA draw (siamese, one key per class); the loss is
``sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2`` with ``embed`` = the network's
front output flattened (the reference ``net.embed``: features before the classifier); one
SGD step (lr_img 1.0, momentum 0.5) on the images. The reported loss is divided by the
number of classes, as the reference logs it.

All classes go through the network as one concatenated batch, which for BatchNorm networks
is exactly the reference's ``ConvNetBN`` branch, and for instance norm equals the per-class
loop.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from elf_jax.distill import common as C

__all__ = ["make_dm_step", "run_dm", "DM_DEFAULTS"]

DM_DEFAULTS = dict(lr_img=1.0, momentum=0.5, batch_real=256, init="real",
                   dsa_strategy=C.FULL_STRATEGY)


def dm_loss(net, variables, syn_images, real, key, dsa_strategy):
    """Sum over classes of squared distances of mean embeddings; ``real [K,B,H,W,C]``,
    ``syn_images [K*ipc,H,W,C]`` class-ordered."""
    k, b = real.shape[:2]
    ipc = syn_images.shape[0] // k
    img_shape = real.shape[2:]
    syn = syn_images.reshape((k, ipc) + img_shape)
    real_a, syn_a = C.per_class_siamese(key, real, syn, dsa_strategy)
    f_real = C.apply_front(net, variables, real_a.reshape((k * b,) + img_shape))
    f_syn = C.apply_front(net, variables, syn_a.reshape((k * ipc,) + img_shape))
    mu_real = jax.lax.stop_gradient(f_real.reshape(k, b, -1).mean(1))
    mu_syn = f_syn.reshape(k, ipc, -1).mean(1)
    return jnp.sum((mu_real - mu_syn) ** 2)


@functools.lru_cache(maxsize=16)
def make_dm_step(net, *, lr_img: float = 1.0, momentum: float = 0.5,
                 dsa_strategy: str = C.FULL_STRATEGY):
    """The jitted DM step ``(state, key, real [K,B,H,W,C]) -> (state, metrics)`` (cached per
    network and settings, so repeated runs reuse the compiled step)."""
    optimizer = C.make_optimizer({"images": lr_img}, momentum)

    @jax.jit
    def step(state: C.DistillState, key, real):
        k_net, k_aug = jax.random.split(key)
        variables = net.init(k_net, real[0, :1], train=False)  # a fresh random network
        variables = jax.lax.stop_gradient(variables)

        def loss_fn(syn):
            return dm_loss(net, variables, syn["images"], real, k_aug, dsa_strategy)

        loss, grads = jax.value_and_grad(loss_fn)(state.syn)
        state = C.apply_grads(state, grads, optimizer)
        return state, {"loss": loss / real.shape[0], "finite": C.all_finite(state.syn)}

    step.optimizer = optimizer
    return step


def run_dm(dataset, *, arch: str = "ConvNet", ipc: int = 10, iterations: int = 1000,
           lr_img: float = 1.0, momentum: float = 0.5, batch_real: int = 256,
           init: str = "real", dsa_strategy: str = C.FULL_STRATEGY,
           model_kwargs: Optional[Mapping[str, Any]] = None, workdir=None, key=None,
           checkpoint_every: int = 100, eval_every: int = 0,
           evaluation: Optional[C.EvalSettings] = None, test_dataset=None,
           progress: bool = True, callback=None) -> "C.SyntheticSet":
    """Distills ``dataset`` (an ``ArrayDataset`` or a name) with DM; returns the best set by
    evaluation accuracy (``eval_every > 0``) or the final one. See
    :func:`elf_jax.distill.common.run_loop` for checkpoints, resume and NaN handling."""
    from elf_jax.models import get_model

    ev = evaluation or C.EvalSettings()
    if eval_every:
        ev = C.dataclasses.replace(ev, every=int(eval_every))
    train, test, images0, labels0, k, _, k_run = C.prepare(
        dataset, ipc=ipc, init=init, key=key, eval_settings=ev, test_dataset=test_dataset)
    model_kwargs = dict(model_kwargs or {})
    net = get_model(arch, k, **model_kwargs)
    if not getattr(net, "has_split", False):
        raise ValueError(f"DM needs an embedding network with a front (ConvNet/VGG/ResNet "
                         f"families); {arch} has none")
    b = C.real_batch_size(train, batch_real)
    pool = C.make_pool(train)
    step = make_dm_step(net, lr_img=lr_img, momentum=momentum, dsa_strategy=dsa_strategy)
    sample = jax.jit(C.sample_all_classes, static_argnums=2)

    def advance(state):
        k_it = C.iteration_key(state)
        k_real, k_step = jax.random.split(k_it)
        return step(state, k_step, sample(pool, k_real, b))

    state = C.init_state({"images": images0}, step.optimizer, k_run)
    to_synset = C.synset_factory(method="dm", dataset=train, ipc=ipc, arch=arch,
                                 model_kwargs=model_kwargs, num_classes=k, hard_labels=labels0)
    run_meta = {"dataset": getattr(train, "name", None), "ipc": int(ipc), "arch": arch,
                "model_kwargs": model_kwargs, "lr_img": lr_img, "momentum": momentum,
                "batch_real": b, "init": init, "dsa_strategy": dsa_strategy,
                "num_train": int(len(train.labels)),
                "key": C.raw_key(k_run).tolist()}
    return C.run_loop(method="dm", state=state, advance=advance, iterations=iterations,
                      to_synset=to_synset, run_meta=run_meta, workdir=workdir,
                      checkpoint_every=checkpoint_every, eval_settings=ev, test=test, arch=arch,
                      model_kwargs=model_kwargs, progress=progress, callback=callback)
