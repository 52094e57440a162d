"""How far our float32 gradients are from float64 on this CPU (the project's rule: measure it
on each machine kind, find a kernel that loses precision and pin float32 there).

    python benchmarks/precision_vs_float64.py ConvNet ConvNetBN VGG11 ResNet18
    ELF_JAX_XLA_CPU_DEFAULTS=0 python benchmarks/precision_vs_float64.py VGG11   # YNNPACK convs

For each network: the cross-entropy gradient of 16 random 32x32x3 images (rounded to float32,
so both sides see the same inputs) at the same initial weights, once in float32 and once in
float64; printed is max |g32 - g64| over all parameters divided by max |g64|. The last column
is the network's conditioning: how much the float64 gradient itself moves when only its
inputs are perturbed by one float32 rounding (a float32 computation cannot do much better).
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import elf_jax  # noqa: E402,F401  (applies elf_jax's XLA:CPU defaults)
from elf_jax.models import get_model  # noqa: E402


def _grad_fn(net, variables, labels):
    def loss(params, x):
        logits = net.apply({**variables, "params": params}, x)
        logp = jax.nn.log_softmax(logits.astype(x.dtype))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

    return jax.jit(jax.grad(loss))


def _relative(a, b) -> float:
    scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float64) - y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


def measure(arch: str) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = jnp.asarray(np.arange(16) % 10)
    v32 = get_model(arch, 10).init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    v64 = jax.tree.map(lambda a: a.astype(jnp.float64), v32)
    g32 = _grad_fn(get_model(arch, 10), v32, labels)(v32["params"], jnp.asarray(x))
    g64_fn = _grad_fn(get_model(arch, 10, dtype="float64"), v64, labels)
    x64 = jnp.asarray(x, jnp.float64)
    g64 = g64_fn(v64["params"], x64)
    ulp = np.spacing(np.abs(x)).astype(np.float64) * rng.choice([-1.0, 1.0], size=x.shape)
    g64_moved = g64_fn(v64["params"], x64 + ulp)
    return _relative(g32, g64), _relative(g64_moved, g64)


if __name__ == "__main__":
    print(f"{'net':<10} {'float32 vs float64':>18} {'float64, inputs +-1 ulp':>24}")
    for arch in sys.argv[1:] or ["ConvNet", "ConvNetBN", "VGG11", "ResNet18"]:
        err, cond = measure(arch)
        print(f"{arch:<10} {err:>18.2e} {cond:>24.2e}")
