"""Plain jitted training step (CE, SGD) of the zoo networks, batch 256 of 32x32x3, 100
classes: ms/step, float32 vs bfloat16. The floor the ELF step is compared against.

    python benchmarks/bench_models.py
"""
import time, jax, jax.numpy as jnp, optax, numpy as np
from elf_jax.models import get_model
print(jax.devices(), jax.__version__, flush=True)

def bench(name, dtype, bs=256, steps=50, k=100):
    net = get_model(name, k, dtype=dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((bs, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, bs))
    v = jax.jit(net.init)(jax.random.key(0), x)
    params, bstats = v["params"], v.get("batch_stats", {})
    tx = optax.sgd(0.01, 0.9)
    opt = tx.init(params)
    has_bn = bool(bstats)

    def loss_fn(p, b, x, y):
        if has_bn:
            out, upd = net.apply({"params": p, "batch_stats": b}, x, True, mutable=["batch_stats"])
            b = upd["batch_stats"]
        else:
            out = net.apply({"params": p}, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y).mean(), b

    @jax.jit
    def step(p, o, b, x, y):
        (l, b), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, b, l

    for _ in range(5):
        params, opt, bstats, l = step(params, opt, bstats, x, y)
    jax.block_until_ready(l)
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            params, opt, bstats, l = step(params, opt, bstats, x, y)
        jax.block_until_ready(l)
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    print(f"{name:12s} {jnp.dtype(dtype).name:9s} bs{bs}: {best:.2f} ms/step loss {float(l):.3f}", flush=True)

for name in ["ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "ViT"]:
    for dt in ["float32", "bfloat16"]:
        bench(name, dt)
