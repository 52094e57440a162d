"""2-D convolution (NHWC x HWIO, symmetric zero padding) with a choice of implementation.

XLA:CPU's convolution emitters are slow for the backward pass of small feature maps: a
3x3 512->512 convolution on 2x2 maps (VGG11's last layers) takes 30x PyTorch's time for
its input+filter gradient (docs/benchmarks_notes.md, "Convolutions on the CPU"). The ``im2col``
implementation writes the convolution and both of its gradients as one matrix product
each, around shifted slices of the (padded) input: patches ``[N*H'*W', k*k*Cin]`` times the
kernel ``[k*k*Cin, Cout]`` forward; ``patches^T @ dy`` for the filter; ``dy @ kernel^T``
folded back onto the input (the sum of the shifted slices' transposes) for the input. It is
the same function (equal to float reassociation: tests/test_conv.py); only its cost differs.

The ``chunked`` implementation keeps XLA's convolutions for the output and the input
gradient and computes only the filter gradient as ``patches^T @ dy``, summed over chunks of
the batch, one chunk's patch matrix (``DK_CHUNK_BYTES``, 6 MB) at a time, which stays in
cache: XLA's filter-gradient convolution is 2-4x slower than its forward one on the CPU
(32x32 64->64: 225 ms against 60 forward, 90-150 chunked). Its own gradient (DC/DSA/MTT
differentiate through training steps) is again two XLA convolutions.

``conv2d(..., impl="auto")`` on the CPU takes ``im2col`` for outputs of at most 2x2
positions (VGG11's last layers: 15 vs 970 ms for the gradient of one), 1x1 convolutions
(ResNet shortcuts: a plain matrix product) and narrow first layers (at most 4 input
channels), and XLA's ``lax`` convolution otherwise: with elf_jax's XLA:CPU setting
(elf_jax/xla_cpu.py: XLA's multi-threaded convolutions instead of YNNPACK's single-threaded
ones) ``lax`` is the fastest there, filter gradient included. Only where a process keeps
YNNPACK's convolutions does ``auto`` take ``chunked`` for outputs of at least 8x8 positions
whose whole-batch patch matrix is at least ``CHUNKED_MIN_CHUNKS`` chunks (on small batches
``chunked`` is no faster while its gradient takes twice as long to compile), and ``lax`` on
4x4 maps (docs/benchmarks_notes.md, "Convolutions on the CPU"). GPU/TPU always use ``lax``.
``ELF_JAX_CONV=lax|im2col|chunked`` forces one everywhere.

On the CPU the ``lax`` convolution saves its input for the backward pass as a buffer of its
own (:func:`stored`). XLA's filter-gradient convolution reads the input transposed to
``[C, H, W, N]``, and XLA fuses that transpose with the elementwise chain that produced the
input (norm, shortcut add, ReLU, up to three residual blocks deep) and recomputes the chain
in the transpose's strided order instead of reading the activation it already stored:
ResNet18's gradient spent ~570 ms of ~2 s per step in these transposes. From a stored input
the gradient takes 8-14% less time for ResNet18(BN), VGG11(BN) and AlexNet (ConvNet(BN),
whose convolutions read pooled maps: within 3%), with the same values (docs/benchmarks_notes.md,
"The convolution's input, stored"). Its input gradient at a stride of 2 or more is one stride-1
convolution per phase of the input (:func:`_strided_input_grad`) instead of XLA's
convolution of the stride-dilated output gradient, three quarters of whose products are
with zeros at stride 2: ResNet18's 32x32 64->128 stride-2 layer, 64 -> 18 ms
(docs/benchmarks_notes.md, "Strided input gradients by phase").
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from elf_jax import xla_cpu

IMPLS = ("auto", "lax", "im2col", "chunked")

# bytes of one chunk's patch matrix in the ``chunked`` filter gradient (see _filter_grad)
DK_CHUNK_BYTES = 6 << 20
# ``auto`` takes ``chunked`` only from this many chunks of the batch's patch matrix: below
# (e.g. 32x32 64->64 under 16 images) it is not faster than ``lax`` and compiles 2x slower
CHUNKED_MIN_CHUNKS = 4


def resolve_impl(impl: str = "auto", out_positions: int = 0, in_channels: int = 0,
                 out_channels: int = 0, kernel_size: int = 3, patch_bytes: int = 0) -> str:
    """``lax``, ``im2col`` or ``chunked`` for a convolution with ``out_positions`` = H' * W'
    output positions, these channels, this kernel size and a whole-batch im2col patch matrix
    of ``patch_bytes``: ``auto`` reads ``ELF_JAX_CONV``, else the measured CPU rule of the
    module docstring (``lax`` off the CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r}: choose one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get("ELF_JAX_CONV", "auto")
        if impl not in IMPLS:
            raise ValueError(f"ELF_JAX_CONV={impl!r}: choose one of {IMPLS}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "lax"
    if 0 < out_positions <= 4 or kernel_size == 1 or 0 < in_channels <= 4:
        return "im2col"  # tiny maps, 1x1 convolutions (plain products), narrow first layers
    if not xla_cpu.ynn_convolutions():
        return "lax"  # XLA's multi-threaded convolutions (elf_jax/xla_cpu.py): fastest
    big = patch_bytes >= CHUNKED_MIN_CHUNKS * DK_CHUNK_BYTES
    return "chunked" if out_positions >= 64 and big else "lax"


def conv2d(x, kernel, stride: int = 1, pad: int = 0, impl: str = "auto"):
    """``y[n, i, j, o] = sum_{a, b, c} xpad[n, s*i + a, s*j + b, c] * kernel[a, b, c, o]``."""
    k = kernel.shape[0]
    positions = _out_size(x.shape[1], k, stride, pad) * _out_size(x.shape[2], k, stride, pad)
    patch_bytes = x.shape[0] * positions * k * k * x.shape[-1] * x.dtype.itemsize
    impl = resolve_impl(impl, positions, x.shape[-1], kernel.shape[-1], k, patch_bytes)
    if impl == "lax":
        if jax.default_backend() == "cpu":
            return _stored_input_conv(x, kernel, int(stride), int(pad))
        return _lax_conv(x, kernel, stride, pad)
    if impl == "chunked":
        return _chunked_conv(x, kernel, int(stride), int(pad))
    return _im2col_conv(x, kernel, int(stride), int(pad))


def _lax_conv(x, kernel, stride: int, pad: int):
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def stored(x):
    """``x`` itself, as the output of a conditional: a buffer of its own, which XLA reads
    rather than fusing (and recomputing) the computation of ``x`` into each consumer. The
    predicate depends on the data because XLA folds a conditional on a constant; both
    branches copy, so either gives ``x``."""
    first = x.reshape(-1)[0]
    return lax.cond(jnp.isnan(first), jnp.copy, jnp.copy, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _stored_input_conv(x, kernel, stride: int, pad: int):
    """XLA's convolution, whose backward pass reads its input from :func:`stored`."""
    return _lax_conv(x, kernel, stride, pad)


def _stored_input_fwd(x, kernel, stride, pad):
    return _lax_conv(x, kernel, stride, pad), (stored(x), kernel)


def _stored_input_bwd(stride, pad, res, dy):
    x, kernel = res
    if stride == 1:
        _, vjp = jax.vjp(lambda x, kernel: _lax_conv(x, kernel, stride, pad), x, kernel)
        return vjp(dy)
    _, vjp = jax.vjp(lambda kernel: _lax_conv(x, kernel, stride, pad), kernel)
    (dk,) = vjp(dy)
    return _strided_input_grad(dy, kernel, x.shape, stride, pad).astype(x.dtype), dk


_stored_input_conv.defvjp(_stored_input_fwd, _stored_input_bwd)


def _strided_input_grad(dy, kernel, x_shape, stride: int, pad: int):
    """The input gradient of a strided convolution without the zeros of XLA's: XLA writes it
    as a convolution of ``dy`` dilated by the stride (3 of 4 of its products are with zeros at
    stride 2). Input row ``u = s*m + r`` only meets the taps ``a`` with ``(a - pad) % s == r``,
    so each of the s*s phases ``(r, q)`` of the input is a stride-1 convolution of ``dy`` with
    those taps; the phases are then interleaved (rows past the input's end cut off)."""
    n, h, w, cin = x_shape
    rows = (-(-h // stride), -(-w // stride))  # per phase: ceil(h / s) x ceil(w / s)
    flipped = jnp.swapaxes(kernel, 2, 3)  # [k, k, Cout, Cin]: dy's channels in, x's out
    phases = [jnp.stack([_phase_input_grad(dy, flipped, rows, (r, q), stride, pad)
                         for q in range(stride)], 3)
              for r in range(stride)]
    dx = jnp.stack(phases, 2).reshape(n, rows[0] * stride, rows[1] * stride, cin)
    return dx[:, :h, :w]  # [n, m, r, m', q, c] -> rows s*m + r, columns s*m' + q


def _phase_input_grad(dy, flipped, rows, phase, stride: int, pad: int):
    """``dx[:, s*m + r, s*m' + q]`` for the ``rows`` of m and m': the taps of phase ``r`` are
    ``a0, a0 + s, ...`` (``a0 = (r + pad) % s``), and tap ``a`` reads ``dy[m - off(a)]`` with
    ``off(a) = (a - pad - r) // s``, consecutive offsets: a stride-1 convolution with those
    taps in reverse order."""
    (hm, wm), (r, q), k = rows, phase, flipped.shape[0]
    a0, b0 = (r + pad) % stride, (q + pad) % stride
    if a0 >= k or b0 >= k:  # a phase no tap reaches (stride > kernel size)
        return jnp.zeros((dy.shape[0], hm, wm, flipped.shape[-1]), dy.dtype)
    sub = flipped[a0::stride, b0::stride][::-1, ::-1]
    lo_a, lo_b = (a0 - pad - r) // stride, (b0 - pad - q) // stride  # the smallest offsets
    hi_a, hi_b = lo_a + sub.shape[0] - 1, lo_b + sub.shape[1] - 1
    padding = ((hi_a, hm - 1 - lo_a - (dy.shape[1] - 1)),
               (hi_b, wm - 1 - lo_b - (dy.shape[2] - 1)))
    return lax.conv_general_dilated(dy, sub, (1, 1), padding,
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _filter_grad(x, dy, k: int, stride: int, pad: int):
    """The filter gradient ``dk[a, b, c, o] = sum_{n,i,j} xpad[n, s*i+a, s*j+b, c] *
    dy[n, i, j, o]`` (float32 for float inputs) as ``patches(x)^T @ dy`` summed over chunks of
    the batch, one chunk's patch matrix (about DK_CHUNK_BYTES) at a time: the patches stay in
    cache instead of streaming ``[N*H'*W', k*k*C]`` through memory (1.5-2.5x faster than
    XLA's filter-gradient convolution on 8x8 to 32x32 maps)."""
    n = x.shape[0]
    per_image = dy.shape[1] * dy.shape[2] * k * k * x.shape[-1] * x.dtype.itemsize
    size = _chunk_size(n, max(1, min(n, DK_CHUNK_BYTES // max(per_image, 1))))
    chunks = -(-n // size)
    # zero images add nothing to the sum; padding once here, not per chunk, saves ~20%
    x = jnp.pad(x, ((0, chunks * size - n), (pad, pad), (pad, pad), (0, 0)))
    acc_dtype = jnp.promote_types(dy.dtype, jnp.float32)
    dy = dy.astype(x.dtype)  # once, not in every chunk
    if chunks * size > n:
        dy = jnp.pad(dy, ((0, chunks * size - n),) + ((0, 0),) * 3)

    def chunk_grad(xc, dc):
        return jnp.einsum("nhwp,nhwo->po", _patches(xc, k, stride, 0), dc,
                          preferred_element_type=acc_dtype)

    if chunks == 1:
        total = chunk_grad(x, dy)
    else:
        xs = x.reshape(chunks, size, *x.shape[1:])
        dys = dy.reshape(chunks, size, *dy.shape[1:])
        init = jnp.zeros((k * k * x.shape[-1], dy.shape[-1]), acc_dtype)
        total, _ = lax.scan(lambda acc, xd: (acc + chunk_grad(*xd), None), init, (xs, dys))
    return total.reshape(k, k, x.shape[-1], dy.shape[-1])


def _chunk_size(n: int, most: int) -> int:
    """Images per chunk: the largest divisor of ``n`` up to ``most`` if it is at least half
    of ``most`` (padding the batch to whole chunks costs more than a smaller chunk: 32x32
    64->64, 100 images: 156 ms in chunks of 3 padded to 102, 129 in chunks of 2), else
    ``most``."""
    best = max(d for d in range(1, most + 1) if n % d == 0)
    return best if 2 * best >= most else most


def _filter_grad_fwd(x, dy, k, stride, pad):
    return _filter_grad(x, dy, k, stride, pad), (x, dy)


def _filter_grad_bwd(k, stride, pad, res, ct):
    # dk is bilinear in (x, dy): d/d dy = conv(x, ct), d/dx = conv(., ct)'s input transpose
    # at dy; both as XLA convolutions, so that DC/DSA/MTT's second-order gradients through a
    # training step cost what they did with ``lax``
    x, dy = res
    ct = ct.astype(x.dtype)
    conv_ct, input_vjp = jax.vjp(lambda x: _lax_conv(x, ct, stride, pad), x)
    (dx,) = input_vjp(dy.astype(conv_ct.dtype))
    return dx, conv_ct.astype(dy.dtype)


_filter_grad.defvjp(_filter_grad_fwd, _filter_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _chunked_conv(x, kernel, stride: int, pad: int):
    return _lax_conv(x, kernel, stride, pad)


def _chunked_fwd(x, kernel, stride, pad):
    return _lax_conv(x, kernel, stride, pad), (x, kernel)


def _chunked_bwd(stride, pad, res, dy):
    x, kernel = res
    _, input_vjp = jax.vjp(lambda x: _lax_conv(x, kernel, stride, pad), x)
    (dx,) = input_vjp(dy)
    return dx, _filter_grad(x, dy, kernel.shape[0], stride, pad).astype(kernel.dtype)


_chunked_conv.defvjp(_chunked_fwd, _chunked_bwd)
