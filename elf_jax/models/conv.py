"""2-D convolution (NHWC x HWIO, symmetric zero padding) with a choice of implementation.

XLA:CPU's convolution emitters are slow for the backward pass of small feature maps: a
3x3 512->512 convolution on 2x2 maps (VGG11's last layers) takes 30x PyTorch's time for
its input+filter gradient (BENCHMARKS.md, "Convolutions on the CPU"). The ``im2col``
implementation writes the convolution and both of its gradients as one matrix product
each, around shifted slices of the (padded) input: patches ``[N*H'*W', k*k*Cin]`` times the
kernel ``[k*k*Cin, Cout]`` forward; ``patches^T @ dy`` for the filter; ``dy @ kernel^T``
folded back onto the input (the sum of the shifted slices' transposes) for the input. It is
the same function (equal to float reassociation: tests/test_conv.py); only its cost differs.

``conv2d(..., impl="auto")`` takes ``im2col`` on the CPU for outputs of at most 2x2
positions (VGG11's last layers: 15 vs 970 ms for the gradient of one; the whole VGG11
gradient 0.58 instead of 4.2 s) and for narrow first layers (at most 4 input and 64 output
channels: the demo's width-32 ConvNet gradient 55 instead of 92 ms; with 128 outputs lax was
~6% faster), and XLA's ``lax`` convolution elsewhere: on larger maps im2col's patch
matrices cost more memory traffic than they save, and a filter gradient written as k*k
shifted matrix products, faster for one layer alone, was slower inside whole networks
(BENCHMARKS.md, "Convolutions on the CPU"). GPU/TPU always use ``lax``.
``ELF_JAX_CONV=lax|im2col`` forces one everywhere.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "lax", "im2col")


def resolve_impl(impl: str = "auto", out_positions: int = 0, in_channels: int = 0,
                 out_channels: int = 0) -> str:
    """``lax`` or ``im2col`` for a convolution with ``out_positions`` = H' * W' output
    positions and these channels: ``auto`` reads ``ELF_JAX_CONV``, else the measured CPU
    rule of the module docstring (``lax`` off the CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r}: choose one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get("ELF_JAX_CONV", "auto")
        if impl not in IMPLS:
            raise ValueError(f"ELF_JAX_CONV={impl!r}: choose one of {IMPLS}")
    if impl == "auto":
        tiny_maps = 0 < out_positions <= 4
        narrow_first = 0 < in_channels <= 4 and 0 < out_channels <= 64
        cpu = jax.default_backend() == "cpu"
        impl = "im2col" if cpu and (tiny_maps or narrow_first) else "lax"
    return impl


def conv2d(x, kernel, stride: int = 1, pad: int = 0, impl: str = "auto"):
    """``y[n, i, j, o] = sum_{a, b, c} xpad[n, s*i + a, s*j + b, c] * kernel[a, b, c, o]``."""
    k = kernel.shape[0]
    positions = _out_size(x.shape[1], k, stride, pad) * _out_size(x.shape[2], k, stride, pad)
    if resolve_impl(impl, positions, x.shape[-1], kernel.shape[-1]) == "lax":
        return _lax_conv(x, kernel, stride, pad)
    return _im2col_conv(x, kernel, int(stride), int(pad))


def _lax_conv(x, kernel, stride: int, pad: int):
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _patches(x, k: int, stride: int, pad: int):
    """``[N, H', W', k*k*C]``: the k*k shifted (strided) views of the padded input side by
    side, ordered (a, b, c) like a HWIO kernel flattened to ``[k*k*C, O]``."""
    n, h, w, c = x.shape
    ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    views = [xp[:, a: a + stride * (ho - 1) + 1: stride, b: b + stride * (wo - 1) + 1: stride, :]
             for a in range(k) for b in range(k)]
    return jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]


def _fold(cols, x_shape, k: int, stride: int, pad: int):
    """The transpose of :func:`_patches`: each of the k*k column blocks added back onto
    the input position it was read from (then the padding cut off)."""
    n, h, w, c = x_shape
    ho, wo = cols.shape[1], cols.shape[2]
    hp, wp = h + 2 * pad, w + 2 * pad
    out = jnp.zeros((n, hp, wp, c), cols.dtype)
    for idx in range(k * k):
        a, b = divmod(idx, k)
        block = cols[..., idx * c: (idx + 1) * c]
        out = out.at[:, a: a + stride * (ho - 1) + 1: stride,
                     b: b + stride * (wo - 1) + 1: stride, :].add(block)
    return out[:, pad: pad + h, pad: pad + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col_conv(x, kernel, stride: int, pad: int):
    k, _, cin, cout = kernel.shape
    cols = _patches(x, k, stride, pad)
    return jnp.dot(cols, kernel.reshape(k * k * cin, cout),
                   preferred_element_type=jnp.result_type(x, kernel)).astype(x.dtype)


def _im2col_fwd(x, kernel, stride, pad):
    return _im2col_conv(x, kernel, stride, pad), (x, kernel)


def _im2col_bwd(stride, pad, res, dy):
    x, kernel = res
    k, _, cin, cout = kernel.shape
    cols = _patches(x, k, stride, pad)
    flat = kernel.reshape(k * k * cin, cout)
    dk = jnp.einsum("nhwp,nhwo->po", cols, dy.astype(cols.dtype)).reshape(kernel.shape)
    dcols = jnp.einsum("nhwo,po->nhwp", dy, flat.astype(dy.dtype))
    dx = _fold(dcols, x.shape, k, stride, pad)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_im2col_conv.defvjp(_im2col_fwd, _im2col_bwd)

