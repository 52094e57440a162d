"""Building blocks shared by the model zoo: convolution, dense, norms, pooling, taps.

All layers work on NHWC activations and keep their parameters in float32; ``dtype`` is the
*compute* dtype (inputs and parameters are cast to it before the matmul/convolution, and
outputs are returned in it). Normalisation statistics are always computed in float32.

Initialisers (``init`` field):

* ``"torch"`` (default): PyTorch's defaults for ``nn.Conv2d`` / ``nn.Linear``: weights
  ``kaiming_uniform(a=sqrt(5))``, which is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, and biases
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; ``fan_in = in_channels * kh * kw``.
* ``"flax"``: Flax's defaults (``lecun_normal`` weights, zero biases).

Norm layers (all take ``(x, train)``; the parameters are ``scale`` and ``bias``):

* ``GroupNorm(groups)``: PyTorch ``nn.GroupNorm`` (contiguous channel groups), eps 1e-5.
  ``groups=None`` means one group per channel, i.e. the reference's "instancenorm"
  (``nn.GroupNorm(C, C, affine=True)``).
* ``LayerNormCHW``: PyTorch ``nn.LayerNorm([C, H, W])``: statistics and affine parameters
  over the whole feature map. Parameters have shape ``[H, W, C]`` (NHWC order; the torch
  tensors are ``[C, H, W]``).
* ``BatchNorm``: PyTorch ``nn.BatchNorm2d`` semantics. ``batch_stats`` holds ``mean`` and
  ``var``. ``train=True`` normalises with the batch statistics (biased variance) and updates
  the running averages with PyTorch's momentum 0.1 (``new = 0.9 * old + 0.1 * batch``)
  using the *unbiased* batch variance, exactly as PyTorch does. ``train=False`` uses the
  running averages. Under ``init`` the running averages are not updated. ``chunks > 1``
  ("ghost" BatchNorm, :func:`bn_chunk_sizes`) reproduces PyTorch ``nn.DataParallel`` on
  ``chunks`` GPUs: every chunk of the batch is normalised with its own statistics and the
  running averages are updated from the first chunk only (DataParallel's replica 0 updates
  the module's own buffers in place; the other replicas update copies that are dropped).
* ``LayerNorm``: last-axis layer norm (transformers), eps 1e-5 like PyTorch.

Variances use the one-pass form ``E[x^2] - E[x]^2`` in float32 (clamped at 0), which lets
XLA compute both moments in one read of the activations.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from elf_jax.models.conv import conv2d

Dtype = Any

INITS = ("torch", "flax")
NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
_NORM_ALIASES = {
    "instancenorm": "instancenorm", "instance": "instancenorm", "in": "instancenorm",
    "batchnorm": "batchnorm", "batch": "batchnorm", "bn": "batchnorm",
    "layernorm": "layernorm", "layer": "layernorm", "ln": "layernorm",
    "groupnorm": "groupnorm", "group": "groupnorm", "gn": "groupnorm",
    "none": "none", "nn": "none", None: "none",
}
POOLS = ("avgpooling", "maxpooling", "none")
_POOL_ALIASES = {
    "avgpooling": "avgpooling", "avg": "avgpooling", "ap": "avgpooling",
    "maxpooling": "maxpooling", "max": "maxpooling", "mp": "maxpooling",
    "none": "none", "np": "none", None: "none",
}
ACTS = ("relu", "sigmoid", "leakyrelu", "swish", "gelu")


def canonical_norm(norm) -> str:
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in _NORM_ALIASES:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    return _NORM_ALIASES[key]


def canonical_pool(pool) -> str:
    key = pool.lower() if isinstance(pool, str) else pool
    if key not in _POOL_ALIASES:
        raise ValueError(f"unknown pool {pool!r}; choose one of {list(POOLS)}")
    return _POOL_ALIASES[key]


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    return init


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "relu":
        return nn.relu
    if name == "sigmoid":
        return nn.sigmoid
    if name == "leakyrelu":
        return lambda x: nn.leaky_relu(x, negative_slope=0.01)
    if name == "swish":
        return nn.swish
    if name == "gelu":
        return lambda x: nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}; choose one of {list(ACTS)}")


# ----------------------------------------------------------------------------- init


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def kernel_init(init: str, fan_in: int):
    if init == "torch":
        # kaiming_uniform(a=sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
        return _uniform(1.0 / np.sqrt(fan_in))
    return nn.initializers.lecun_normal()


def bias_init(init: str, fan_in: int):
    if init == "torch":
        return _uniform(1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0)
    return nn.initializers.zeros


def _module_path(module: nn.Module) -> str:
    try:
        path = "/".join(module.scope.path)
    except Exception:  # pragma: no cover - unbound module
        path = ""
    return path or (module.name or type(module).__name__)


def _check_existing(module: nn.Module, col: str, name: str, shape, what: str):
    """Readable error when a parameter exists with another shape (input shape mismatch)."""
    if module.has_variable(col, name):
        have = tuple(module.get_variable(col, name).shape)
        if have != tuple(shape):
            raise ValueError(
                f"{_module_path(module)}: {what(have)} (parameter '{name}' has shape {have}, "
                f"this input needs {tuple(shape)}). The model was initialized for a "
                "different input shape; pass inputs of that shape or re-initialize.")


# ----------------------------------------------------------------------------- conv/dense


class Conv(nn.Module):
    """Square-kernel 2-D convolution, NHWC x HWIO, symmetric zero padding (PyTorch style).

    ``padding`` may be overridden per call (the ConvNet's MNIST first-layer padding is
    decided from the input shape at call time).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    init_mode: str = "torch"

    @nn.compact
    def __call__(self, x, padding: Optional[int] = None):
        pad = self.padding if padding is None else padding
        k, cin = self.kernel_size, x.shape[-1]
        shape = (k, k, cin, self.features)
        _check_existing(self, "params", "kernel", shape,
                        lambda have: f"input has {cin} channels but the layer expects "
                                     f"{have[2]}")
        fan_in = k * k * cin
        kernel = self.param("kernel", kernel_init(self.init_mode, fan_in), shape, jnp.float32)
        # lax's convolution on GPU/TPU, matrix products on the CPU (models/conv.py)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad)
        if self.use_bias:
            b = self.param("bias", bias_init(self.init_mode, fan_in), (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return y


class Dense(nn.Module):
    """``y = x @ kernel + bias`` over the last axis; kernel ``[in, out]`` (torch: ``W.T``)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    init_mode: str = "torch"

    @nn.compact
    def __call__(self, x):
        din = x.shape[-1]
        shape = (din, self.features)
        _check_existing(self, "params", "kernel", shape,
                        lambda have: f"input has {din} features but the layer expects "
                                     f"{have[0]} (a different input height/width?)")
        kernel = self.param("kernel", kernel_init(self.init_mode, din), shape, jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            b = self.param("bias", bias_init(self.init_mode, din), (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return y


class Tap(nn.Module):
    """Identity; exists so that ``capture_intermediates`` records a value under its name."""

    @nn.compact
    def __call__(self, x):
        return x


# ----------------------------------------------------------------------------- norms


def _moments(x, axes):
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axes, keepdims=True) - jnp.square(mean), 0.0)
    return mean, var


class GroupNorm(nn.Module):
    """PyTorch ``nn.GroupNorm``; ``groups=None`` = one group per channel (instance norm)."""

    groups: Optional[int] = None
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        c = x.shape[-1]
        g = c if self.groups is None else self.groups
        if c % g:
            raise ValueError(f"{_module_path(self)}: {c} channels not divisible into {g} groups")
        _check_existing(self, "params", "scale", (c,),
                        lambda have: f"input has {c} channels but the norm expects {have[0]}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        if g == c:
            mean, var = _moments(xf, (1, 2))
        else:
            xg = xf.reshape(x.shape[:-1] + (g, c // g))
            mean, var = _moments(xg, (1, 2, 4))
            mean = jnp.repeat(mean, c // g, axis=-1).reshape(mean.shape[:3] + (c,))
            var = jnp.repeat(var, c // g, axis=-1).reshape(var.shape[:3] + (c,))
        mul = lax.rsqrt(var + self.epsilon) * scale
        return ((xf - mean) * mul + bias).astype(self.dtype)


class LayerNormCHW(nn.Module):
    """PyTorch ``nn.LayerNorm([C, H, W])`` on NHWC input; parameters ``[H, W, C]``."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        shape = tuple(x.shape[1:])
        _check_existing(self, "params", "scale", shape,
                        lambda have: f"input feature map {shape} differs from {have}")
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        xf = x.astype(jnp.float32)
        mean, var = _moments(xf, (1, 2, 3))
        return ((xf - mean) * lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
    """Last-axis layer norm (PyTorch ``nn.LayerNorm(D)``), eps 1e-5."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean, var = _moments(xf, (-1,))
        return ((xf - mean) * lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


def bn_chunk_sizes(n: int, chunks: int) -> list[int]:
    """Row counts of the ``chunks`` pieces ``nn.DataParallel`` scatters a batch of ``n`` into.

    Its scatter is ``tensor.chunk(len(devices))``: pieces of ``ceil(n / chunks)`` rows, the
    last smaller, and FEWER pieces than devices when that size covers the batch sooner
    (``n=6, chunks=4 -> [2, 2, 2]``; DataParallel then uses 3 replicas)."""
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"bn_chunks must be an int >= 1, got {chunks!r}")
    if n < 1:
        return [n]
    size = -(-n // chunks)
    return [size] * (n // size) + ([n % size] if n % size else [])


def _chunk_moments(xf, sizes):
    """Per-chunk ``(mean, E[x^2])`` over all but the last axis, as ``[len(sizes), C]``."""
    full, size = sum(sizes) // sizes[0] * sizes[0], sizes[0]
    axes = tuple(range(1, xf.ndim))
    head = xf[:full].reshape((full // size, size) + xf.shape[1:])
    means, sqs = [jnp.mean(head, axes)], [jnp.mean(jnp.square(head), axes)]
    if full < xf.shape[0]:  # the short last chunk
        tail = xf[full:]
        tail_axes = tuple(range(xf.ndim - 1))
        means.append(jnp.mean(tail, tail_axes)[None])
        sqs.append(jnp.mean(jnp.square(tail), tail_axes)[None])
    return jnp.concatenate(means), jnp.concatenate(sqs)


class BatchNorm(nn.Module):
    """PyTorch ``nn.BatchNorm2d`` (see module docstring). ``momentum`` is PyTorch's (0.1).

    ``axis_name``: if set, batch statistics are averaged over that mapped axis (sync BN).
    ``chunks``: ghost BatchNorm as ``nn.DataParallel`` on ``chunks`` devices (statistics per
    chunk of the batch, running averages from the first chunk; :func:`bn_chunk_sizes`).
    Under data parallelism the chunks are those of each device's local batch, which needs
    per-device statistics: ``chunks > 1`` with ``axis_name`` (sync BN) is refused.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: Optional[str] = None
    chunks: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        _check_existing(self, "params", "scale", (c,),
                        lambda have: f"input has {c} channels but the norm expects {have[0]}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        sizes = bn_chunk_sizes(x.shape[0], self.chunks)
        if train and len(sizes) > 1:
            if self.axis_name is not None:
                raise ValueError(
                    f"{_module_path(self)}: bn_chunks={self.chunks} (per-chunk statistics of "
                    f"each device's batch) cannot be combined with sync BN over "
                    f"{self.axis_name!r}; set parallel.sync_bn=False or bn_chunks=1")
            means, sqs = _chunk_moments(xf, sizes)
            variances = jnp.maximum(sqs - jnp.square(means), 0.0)
            rows = np.repeat(np.arange(len(sizes)), sizes)  # chunk of every row (static)
            bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
            mean, var = means[rows].reshape(bshape), variances[rows].reshape(bshape)
            # replica 0's update: the first chunk's mean and unbiased variance
            n = sizes[0] * int(np.prod(x.shape[1:-1]))
            self._update_running(ra_mean, ra_var, means[0], variances[0], n)
        elif train:
            n = int(np.prod([x.shape[a] for a in axes]))
            mean = jnp.mean(xf, axes)
            sq = jnp.mean(jnp.square(xf), axes)
            if self.axis_name is not None and not self.is_initializing():
                mean, sq = lax.pmean((mean, sq), self.axis_name)
                n = n * lax.psum(1, self.axis_name)
            var = jnp.maximum(sq - jnp.square(mean), 0.0)
            self._update_running(ra_mean, ra_var, mean, var, n)
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = lax.rsqrt(var + self.epsilon) * scale
        return ((xf - mean) * mul + bias).astype(self.dtype)

    def _update_running(self, ra_mean, ra_var, mean, var, n):
        """PyTorch's momentum update with the unbiased variance of ``n`` values."""
        if self.is_initializing():
            return
        m = self.momentum
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_mean.value = (1 - m) * ra_mean.value + m * lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * lax.stop_gradient(unbiased)


def make_norm(kind: str, dtype: Dtype, name: str, *, axis_name: Optional[str] = None,
              bn_chunks: int = 1):
    """Norm module for a canonical norm name, or None for ``"none"``; ``axis_name`` and
    ``bn_chunks`` apply to BatchNorm only (the other norms are per sample)."""
    kind = canonical_norm(kind)
    if kind == "none":
        return None
    if kind == "instancenorm":
        return GroupNorm(groups=None, dtype=dtype, name=name)
    if kind == "groupnorm":
        return GroupNorm(groups=4, dtype=dtype, name=name)
    if kind == "layernorm":
        return LayerNormCHW(dtype=dtype, name=name)
    return BatchNorm(dtype=dtype, axis_name=axis_name, chunks=bn_chunks, name=name)


# ----------------------------------------------------------------------------- pooling


def avg_pool2(x):
    """2x2/2 average pooling (PyTorch floor mode) as the sum of each window's four corners:
    no reduce_window, and no reduction either. XLA:CPU hands a reduction, with the ReLU
    before it, to a YNNPACK fusion, which first writes the ReLU's zero and the mean's 1/4 out
    as full-size arrays (ConvNet: a [100, 32, 32, 128] array of zeros, 16 ms a step);
    elementwise adds stay in XLA's own fusion (docs/benchmarks_notes.md, "Average pooling"). The
    sum's order differs from the reduction's: equal to 1 ulp."""
    h, w = x.shape[1:3]
    if h // 2 == 0 or w // 2 == 0:
        raise ValueError(f"cannot 2x2-pool a {h}x{w} feature map (input too small)")
    top_left, top_right, bottom_left, bottom_right = _windows(x)
    return (((top_left + top_right) + (bottom_left + bottom_right)) * 0.25).astype(x.dtype)


def max_pool2(x):
    """2x2/2 max pooling (PyTorch floor mode); the gradient goes to the first maximum of each
    window in row-major order, as PyTorch's. Written as a reshape and elementwise maxima: XLA's
    reduce_window gradient (select_and_scatter) is ~3x slower on the CPU."""
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"cannot 2x2-pool a {x.shape[1]}x{x.shape[2]} feature map "
                         "(input too small)")
    return _max_pool2(x)


def _windows(x):
    """The four [N, H/2, W/2, C] corners of every 2x2 window, row-major (floor mode)."""
    n, h, w, c = x.shape
    v = x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
    return [v[:, :, a, :, b, :] for a in (0, 1) for b in (0, 1)]


@jax.custom_vjp
def _max_pool2(x):
    a, b, c, d = _windows(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool2_fwd(x):
    y = _max_pool2(x)
    return y, (x, y)


def _max_pool2_bwd(res, g):
    x, y = res
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for corner in _windows(x):  # the first corner equal to the maximum takes the gradient
        first = (corner == y) & ~taken
        taken = taken | first
        parts.append(jnp.where(first, g, 0).astype(x.dtype))
    n, h2, w2, c = y.shape
    grid = jnp.stack(parts, axis=3).reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(n, 2 * h2, 2 * w2, c)
    dx = jnp.pad(grid, ((0, 0), (0, x.shape[1] - 2 * h2), (0, x.shape[2] - 2 * w2), (0, 0)))
    return (dx,)


_max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)


def pool2(kind: str, x):
    if kind == "avgpooling":
        return avg_pool2(x)
    if kind == "maxpooling":
        return max_pool2(x)
    return x


def flatten(x):
    """Flatten NHWC features to ``[N, H*W*C]`` (H, W, C order; torch flattens C, H, W)."""
    return x.reshape(x.shape[0], -1)


def check_images(x, model: str, what: str = "input"):
    """Rank/layout check with a readable ValueError."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{model}: expected a 4-D NHWC {what} [N, H, W, C], got shape {shape}")
    if shape[-1] not in (1, 3) and shape[1] in (1, 3) and what == "input":
        raise ValueError(
            f"{model}: input shape {tuple(shape)} looks like NCHW; models take NHWC "
            "[N, H, W, C] (use x.transpose(0, 2, 3, 1))")


def mnist_padding(x) -> bool:
    """Reference rule for 1-channel 28x28 input: the first conv gets extra padding."""
    return x.shape[-1] == 1 and x.shape[1] == 28


__all__ = [
    "Conv", "Dense", "Tap", "GroupNorm", "LayerNormCHW", "LayerNorm", "BatchNorm",
    "bn_chunk_sizes", "make_norm",
    "avg_pool2", "max_pool2", "pool2", "flatten", "activation", "canonical_norm",
    "canonical_pool", "check_init", "check_images", "mnist_padding",
    "kernel_init", "bias_init",
]
