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

import jax
import jax.numpy as jnp

from elf_jax.data.sampler import class_index
from elf_jax.distill import common as C
from elf_jax.train.step import all_finite
from elf_jax.distill.settings import DMSettings

__all__ = ["make_dm_step", "run_dm"]


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
                 dsa_strategy: str = C.DEFAULT_STRATEGY):
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
        return state, {"loss": loss / real.shape[0], "finite": all_finite(state.syn)}

    step.optimizer = optimizer
    return step


def setup(method: str, s: DMSettings, p: C.Prelude) -> C.Plan:
    """The driver's hook: a fresh network per iteration, ``batch_real`` real images of every
    class drawn outside the step (``class_index``: from the device copy of an in-memory
    split, or read from a ``StreamedSplit``; the same draws either way)."""
    if not getattr(p.net, "has_split", False):
        raise ValueError(f"DM needs an embedding network with a front (ConvNet/VGG/ResNet "
                         f"families); {s.arch} has none")
    b = C.real_batch_size(p.train, s.batch_real)
    index = class_index(p.train)
    step = make_dm_step(p.net, lr_img=s.lr_img, momentum=s.momentum,
                        dsa_strategy=s.dsa_strategy)

    def advance(state):
        k_real, k_step = jax.random.split(C.iteration_key(state))
        return step(state, k_step, index.sample_all_classes(k_real, b))

    return C.Plan({"images": p.images}, step.optimizer, advance,
                  {"batch_real": b, "num_train": int(len(p.train.labels))})


def run_dm(dataset, **kwargs) -> "C.SyntheticSet":
    """DM: :func:`elf_jax.distill.common.distill` with :class:`DMSettings` fields."""
    return C.distill("dm", dataset, **kwargs)
