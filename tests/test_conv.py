"""The CPU formulations of convolution and pooling are the same functions as XLA's:
values, gradients, second-order gradients (DC/DSA/MTT differentiate through training
steps) and under vmap (repeats side by side)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from elf_jax.models import conv as conv_module
from elf_jax.models.conv import conv2d, resolve_impl
from elf_jax.models.layers import avg_pool2, max_pool2
from elf_jax.xla_cpu import MULTI_THREADED_CONVS

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it

# (batch, size, cin, cout, kernel, stride, pad)
CASES = [(3, 8, 4, 5, 3, 1, 1), (2, 9, 3, 6, 3, 2, 1), (2, 7, 3, 4, 1, 1, 0),
         (2, 6, 2, 3, 3, 1, 0), (2, 12, 3, 8, 3, 1, 2), (2, 8, 4, 4, 1, 2, 0),
         (2, 2, 6, 5, 3, 1, 1),
         # strided input gradients by phase (conv._strided_input_grad): even sizes, even and
         # large kernels, input rows no window reads, a stride larger than the kernel
         (2, 8, 3, 4, 3, 2, 1), (1, 10, 2, 3, 4, 2, 1), (1, 11, 2, 3, 5, 3, 2),
         (1, 7, 2, 3, 3, 2, 0), (1, 7, 2, 2, 2, 3, 0)]


def _arrays(case, seed=0):
    n, s, ci, co, k, st, p = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, s, s, ci)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, ci, co)) / (k * np.sqrt(ci)), jnp.float32)
    so = (s + 2 * p - k) // st + 1
    r = jnp.asarray(rng.standard_normal((n, so, so, co)), jnp.float32)
    return x, w, r, st, p


def _close(a, b):
    """Equal to float32 reassociation (relative to the array's scale)."""
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 + 1e-4 * np.abs(b).max())


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one image, so that the tiny cases run several chunks of the ``chunked``
    filter gradient (padding to whole chunks has its own test below)."""
    monkeypatch.setattr(conv_module, "DK_CHUNK_BYTES", 600)


def _conv(x, w, st, p, impl):
    """``conv2d`` with ``impl``, or XLA's convolution with JAX's own gradient (``xla``): the
    reference every formulation is held to."""
    if impl == "xla":
        return conv_module._lax_conv(x, w, st, p)
    return conv2d(x, w, st, p, impl)


# "lax" on the CPU: XLA's convolution whose backward pass reads a stored input (conv.stored)
@pytest.mark.parametrize("impl", ["lax", "im2col", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_formulations_equal_lax_values_and_gradients(case, impl, small_chunks):
    x, w, r, st, p = _arrays(case)
    def loss(impl):
        return lambda x, w: jnp.sum(_conv(x, w, st, p, impl) * r)

    _close(conv2d(x, w, st, p, impl), _conv(x, w, st, p, "xla"))
    for a, b in zip(jax.grad(loss(impl), (0, 1))(x, w), jax.grad(loss("xla"), (0, 1))(x, w)):
        _close(a, b)


def test_stored_is_the_input_and_stays_a_buffer_of_its_own():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 3)), jnp.float32)
    np.testing.assert_array_equal(conv_module.stored(x), x)
    nan_first = x.at[0, 0, 0, 0].set(jnp.nan)  # the other branch: a copy as well
    np.testing.assert_array_equal(conv_module.stored(nan_first), nan_first)
    # the point of it: XLA keeps the conditional in the compiled gradient instead of fusing
    # the input's computation into the filter gradient's transpose (when XLA learns to fold
    # it, this says so: the values stay right, the speed of conv.py's docstring goes)
    w = jnp.ones((3, 3, 3, 5), jnp.float32) / 9
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv2d(jax.nn.relu(2 * x + 1), w, 1, 1, "lax"))))
    hlo = grad.lower(w, x).compile().as_text()
    assert ("conditional(" in hlo) == (jax.default_backend() == "cpu")


def test_chunked_filter_gradient_pads_the_batch_to_whole_chunks(monkeypatch):
    # 7 images, at most 3 per chunk: 7 has no divisor of 2-3, so 3 chunks of 3, padded to 9
    assert (conv_module._chunk_size(7, 3), conv_module._chunk_size(100, 3)) == (3, 2)
    x, w, r, st, p = _arrays((7, 6, 3, 4, 3, 1, 1))
    monkeypatch.setattr(conv_module, "DK_CHUNK_BYTES", 3 * 36 * 9 * 3 * 4)
    grads = [jax.grad(lambda w, i=i: jnp.sum(_conv(x, w, st, p, i) * r))(w)
             for i in ("chunked", "xla")]
    _close(*grads)


@pytest.mark.parametrize("impl", ["lax", "im2col", "chunked"])
@pytest.mark.parametrize("case", CASES[:2])
def test_cpu_formulations_second_order_and_vmap(case, impl, small_chunks):
    x, w, r, st, p = _arrays(case)

    def inner(impl):  # a gradient-matching-like objective: a function of d loss / d w
        def f(x, w):
            g = jax.grad(lambda w: jnp.sum(jnp.tanh(_conv(x, w, st, p, impl)) * r))(w)
            return jnp.sum(g ** 2)
        return f

    ws = jnp.stack([w, 2 * w])
    xs = jnp.stack([x, -x])  # batched inputs: the stored input's conditional under vmap
    batched = {i: jax.vmap(jax.grad(lambda w, x, i=i: jnp.sum(_conv(x, w, st, p, i) * r)))(ws, xs)
               for i in (impl, "xla")}
    _close(jax.grad(inner(impl), (0, 1))(x, w)[0], jax.grad(inner("xla"), (0, 1))(x, w)[0])
    _close(jax.grad(inner(impl), (0, 1))(x, w)[1], jax.grad(inner("xla"), (0, 1))(x, w)[1])
    _close(batched[impl], batched["xla"])


def test_impl_choice(monkeypatch):
    assert resolve_impl("lax") == "lax"
    cpu = jax.default_backend() == "cpu"
    assert resolve_impl(out_positions=4) == ("im2col" if cpu else "lax")
    assert resolve_impl(out_positions=1024, in_channels=1, out_channels=32) == (
        "im2col" if cpu else "lax")
    assert resolve_impl(out_positions=256, in_channels=64, out_channels=128, kernel_size=1) == (
        "im2col" if cpu else "lax")
    big = 4 * conv_module.DK_CHUNK_BYTES  # the patch matrix of 4 chunks or more
    # with elf_jax's XLA:CPU setting (multi-threaded XLA convolutions): lax
    assert MULTI_THREADED_CONVS in os.environ["XLA_FLAGS"]
    assert resolve_impl(out_positions=64, in_channels=256, out_channels=256,
                        patch_bytes=big) == "lax"
    # where YNNPACK's single-threaded convolutions are kept: chunked on large batches
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace(MULTI_THREADED_CONVS, ""))
    assert resolve_impl(out_positions=64, in_channels=256, out_channels=256,
                        patch_bytes=big) == ("chunked" if cpu else "lax")
    assert resolve_impl(out_positions=64, in_channels=256, out_channels=256,
                        patch_bytes=big - 1) == "lax"  # small batches: no faster, slower compile
    assert resolve_impl(out_positions=16, in_channels=512, out_channels=512) == "lax"
    monkeypatch.setenv("ELF_JAX_CONV", "chunked")
    assert resolve_impl(out_positions=4) == "chunked"
    monkeypatch.setenv("ELF_JAX_CONV", "lax")
    assert resolve_impl() == "lax"
    monkeypatch.setenv("ELF_JAX_CONV", "fast")
    with pytest.raises(ValueError, match="ELF_JAX_CONV"):
        resolve_impl()
    with pytest.raises(ValueError, match="conv impl"):
        resolve_impl("cudnn")


POOLS = {"max": (max_pool2, nn.max_pool), "avg": (avg_pool2, nn.avg_pool)}


@pytest.mark.parametrize("kind", sorted(POOLS))
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 2, 2, 1)])
def test_pools_equal_reduce_window(shape, kind):
    ours_pool, flax_pool = POOLS[kind]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    r = jnp.asarray(rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])),
                    jnp.float32)

    def ref(x):
        return jnp.sum(flax_pool(x, (2, 2), strides=(2, 2), padding="VALID") * r)

    def ours(x):
        return jnp.sum(ours_pool(x) * r)

    _close(ours(x), ref(x))
    _close(jax.grad(ours)(x), jax.grad(ref)(x))  # no ties in random data


def test_max_pool_gradient_goes_to_the_first_maximum_as_pytorch():
    x = jnp.asarray([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(max_pool2(x)))(x)
    np.testing.assert_array_equal(np.asarray(g).ravel(), [0, 1, 0, 0])
    # second order (MTT/DC differentiate through it): d/dx sum(grad(sum(pool^2))^2) = 8 x at
    # each window's maximum
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)

    def f(x):
        return jnp.sum(max_pool2(x) ** 2)

    gg = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(x)
    expect = np.zeros(16)
    expect[[5, 7, 13, 15]] = 8 * np.array([5, 7, 13, 15])
    np.testing.assert_allclose(np.asarray(gg).ravel(), expect)
