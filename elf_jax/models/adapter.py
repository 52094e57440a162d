"""Feature adapters: ELF for an evaluation net whose front does not output the teacher's shape.

The reference applies ELF only where the student's front output has exactly the teacher
feature's shape. Beyond it, :class:`Adapted` wraps any split network with a small learned
:class:`FeatureAdapter` (trained jointly with the network, in the same SGD state):

* front loss: ``to_teacher(front(x))`` against the teacher feature ``f`` (student -> teacher),
* rear loss: ``rear(from_teacher(f))`` (teacher -> the rear's input shape).

Each direction is a 1x1 convolution (a linear map of channels at every position) and a
spatial resampling of the grid: area averaging when the size shrinks by integer factors,
nearest-neighbour repetition when it grows by integer factors, linear interpolation
otherwise. Token fronts (ViT, no class token) are already NHWC grids, and vector fronts
(MLP) are 1x1 grids, so one adapter serves every architecture. Both maps are linear and the
resampling weights sum to one, so their order does not change the result (a constant bias
commutes); the smaller grid gets the convolution, which is only a matter of cost.

The image path's ``rear(front(x))``, the test-time forward pass and the baseline (mode
``task``) never touch the adapter. :func:`init_variables` initializes the wrapped net exactly
as the bare net (same key, same values), so the paired baseline/ELF repeats still share their
initial weights; the adapter draws from its own key.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L

__all__ = ["FeatureAdapter", "Adapted", "adapt", "resize_grid", "init_variables",
           "adapter_params"]


def resize_grid(x, hw: Tuple[int, int]):
    """``[N, h, w, C] -> [N, H, W, C]``: area mean for integer shrink factors, repetition for
    integer growth factors, linear interpolation otherwise (weights always sum to one)."""
    n, h, w, c = x.shape
    H, W = hw
    if (h, w) == (H, W):
        return x
    if h % H == 0 and w % W == 0:
        return x.reshape(n, H, h // H, W, w // W, c).mean(axis=(2, 4))
    if H % h == 0 and W % w == 0:
        return jnp.repeat(jnp.repeat(x, H // h, axis=1), W // w, axis=2)
    return jax.image.resize(x, (n, H, W, c), method="linear", antialias=True)


class FeatureAdapter(nn.Module):
    """1x1 convolutions + resampling between a student grid ``student`` and a teacher grid
    ``teacher`` (both ``(H, W, C)``); parameters ``to_teacher`` and ``from_teacher``."""

    student: Tuple[int, int, int]
    teacher: Tuple[int, int, int]
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    def setup(self):
        kw = dict(padding=0, dtype=self.dtype, init_mode=self.init_mode)
        self.to_teacher_proj = L.Conv(self.teacher[-1], 1, **kw)
        self.from_teacher_proj = L.Conv(self.student[-1], 1, **kw)

    def _map(self, x, proj, src, dst):
        if src[0] * src[1] > dst[0] * dst[1]:  # shrink first: the 1x1 conv on fewer positions
            return proj(resize_grid(x, dst[:2]))
        return resize_grid(proj(x), dst[:2])

    def to_teacher(self, z):
        """The student front output in the teacher feature's shape (the front loss's input)."""
        return self._map(z, self.to_teacher_proj, self.student, self.teacher)

    def from_teacher(self, f):
        """The teacher feature in the student front's shape (the rear loss's input)."""
        return self._map(f, self.from_teacher_proj, self.teacher, self.student)

    def __call__(self, z, f):
        return self.to_teacher(z), self.from_teacher(f)


class Adapted(nn.Module):
    """A split network plus a :class:`FeatureAdapter`; variables ``{"net": ..., "adapter":
    ...}``. ``front``/``rear``/``__call__`` are the network's own."""

    net: nn.Module
    adapter: FeatureAdapter

    has_split = True

    def front(self, x, train: bool = False):
        return self.net.front(x, train)

    def rear(self, z, train: bool = False):
        return self.net.rear(z, train)

    def to_teacher(self, z, train: bool = False):
        return self.adapter.to_teacher(z)

    def rear_from_teacher(self, f, train: bool = False):
        return self.net.rear(self.adapter.from_teacher(f), train)

    def __call__(self, x, train: bool = False):
        if self.is_initializing():  # plain `init` creates the adapter too (memory estimates)
            z = self.net.front(x, train)
            self.adapter(z, jnp.zeros((x.shape[0],) + tuple(self.adapter.teacher), z.dtype))
        return self.net(x, train)


def _nest(variables: dict, name: str) -> dict:
    return {col: {name: tree} for col, tree in variables.items()}


def init_variables(net, key, sample_images) -> dict:
    """``net.init(key, x, train=False)``; for :class:`Adapted` the wrapped network gets exactly
    the bare network's values for ``key`` and the adapter its own key."""
    if not isinstance(net, Adapted):
        return net.init(key, sample_images, train=False)
    inner = net.net.init(key, sample_images, train=False)
    x = jnp.asarray(sample_images[:1])
    z = jax.eval_shape(lambda v: net.net.apply(v, x, method=net.net.front), inner)
    f = jnp.zeros((1,) + tuple(net.adapter.teacher), jnp.float32)
    ad = net.adapter.init(jax.random.fold_in(key, 0x0ADA), jnp.zeros(z.shape, z.dtype), f)
    out = _nest(inner, "net")
    out["params"]["adapter"] = ad["params"]
    return out


def adapt(net, student: Tuple[int, int, int], teacher: Tuple[int, int, int]) -> Adapted:
    """``net`` (a split network whose front outputs ``student`` per image) with an adapter to
    the teacher feature shape ``teacher``."""
    if len(student) != 3 or len(teacher) != 3:
        raise ValueError(f"adapters map NHWC grids: got front {tuple(student)} and teacher "
                         f"feature {tuple(teacher)} (per image)")
    ad = FeatureAdapter(tuple(int(v) for v in student), tuple(int(v) for v in teacher),
                        dtype=getattr(net, "dtype", jnp.float32),
                        init_mode=getattr(net, "init_mode", "torch"))
    return Adapted(net, ad)


def adapter_params(net) -> int:
    """The number of adapter parameters of ``net`` (0 for a bare network)."""
    if not isinstance(net, Adapted):
        return 0
    a = net.adapter
    shapes = jax.eval_shape(a.init, jax.random.key(0), jnp.zeros((1,) + a.student),
                            jnp.zeros((1,) + a.teacher))
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes["params"]))
