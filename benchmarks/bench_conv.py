"""One 3x3 convolution's input+filter gradient, per implementation, next to PyTorch's.

The shapes are the convolutions of the cross pool on CIFAR (batch 100): ConvNet/VGG11's
first layer, VGG11's middle ones and its last two on 2x2 maps, where XLA:CPU's backward
convolution emitters are slowest. Per shape: ms of the jitted forward+backward with
``lax.conv_general_dilated``, the ``im2col`` and ``chunked`` formulations and the default
(``auto``) of elf_jax/models/conv.py, and with ``torch.nn.functional.conv2d`` when torch is
installed, all in one run.

    python benchmarks/bench_conv.py [--batch 100] [--steps 5] [--json out.jsonl]

``--nets ConvNet,VGG11,...`` instead times the whole network's plain CE gradient (random
32x32x3 images, 10 classes; ``ConvNet:w32`` is the demo's width-32 ConvNet on 28x28x1) with
each implementation forced (``lax``, ``im2col``, ``chunked``) and with the default
(``auto``), compiled in one process and timed alternately, so the choice is judged inside
whole networks.

``--pieces`` instead times one layer's forward, input gradient and filter gradient apart
(elf_jax's ``lax`` path, and the ``chunked`` filter gradient at stride 1), next to PyTorch's
forward, input gradient and filter gradient, each alone.

``--batches 2,8,16,32,100`` instead times one layer's gradient with ``lax`` and ``chunked``
at each batch size (ms and the first call's compile seconds) and says which one ``auto``
takes: the batch gate of ``chunked`` (``CHUNKED_MIN_CHUNKS``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.models.conv import conv2d

# (spatial size, Cin, Cout, stride)
SHAPES = [(32, 3, 64, 1), (32, 3, 128, 1), (32, 64, 64, 1), (16, 64, 128, 1), (16, 128, 128, 1),
          (8, 128, 256, 1), (8, 256, 256, 1), (4, 256, 512, 1), (4, 512, 512, 1), (2, 512, 512, 1),
          (32, 64, 128, 2), (16, 128, 256, 2)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _median_ms(fn, steps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def time_jax(impl: str, x, w, r, stride: int) -> float:
    def loss(x, w):
        return jnp.sum(conv2d(x, w, stride, 1, impl) * r)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(x, w))


def time_torch(x, w, r, stride: int):
    import torch

    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    wt = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy(), requires_grad=True)
    rt = torch.tensor(np.asarray(r).transpose(0, 3, 1, 2).copy())

    def step():
        xt.grad = wt.grad = None
        (torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1) * rt).sum().backward()
    return step


def time_nets(names, batch: int, steps: int) -> None:
    """The whole-network A/B of the module docstring, one JSON line per network."""
    import optax

    from elf_jax.models import get_model

    rng = np.random.default_rng(0)
    for spec in names:
        name, _, width = spec.partition(":w")
        shape = (28, 28, 1) if width == "32" else (32, 32, 3)
        net = get_model(name, 10, **({"width": int(width)} if width else {}))
        x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
        y = jnp.asarray(np.arange(batch) % 10)
        v = net.init(jax.random.key(0), x)

        def loss(p):
            out = net.apply({**v, "params": p}, x, True, mutable=["batch_stats"])[0] \
                if "batch_stats" in v else net.apply({**v, "params": p}, x, True)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

        fns = {}
        for impl in ("lax", "im2col", "chunked", "auto"):  # the choice is made while tracing
            os.environ["ELF_JAX_CONV"] = impl
            fns[impl] = jax.jit(jax.grad(loss)).lower(v["params"]).compile()
        os.environ.pop("ELF_JAX_CONV")
        times = {impl: [] for impl in fns}
        for impl, f in fns.items():
            jax.block_until_ready(f(v["params"]))
        for _ in range(steps):
            for impl, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(v["params"]))
                times[impl].append(time.perf_counter() - t)
        print(json.dumps({"net": spec, **{f"ms_{k}": round(1e3 * float(np.median(t)), 1)
                                         for k, t in times.items()}}), flush=True)


def time_pieces(batch: int, steps: int, only: str) -> None:
    """The ``--pieces`` rows: where one layer's gradient time goes, one JSON line per shape."""
    from elf_jax.models.conv import _filter_grad

    rng = np.random.default_rng(0)
    for size, cin, cout, stride in SHAPES:
        shape = f"{size}x{size} {cin}->{cout} s{stride}"
        if only and not any(shape.startswith(o) for o in only.split(",")):
            continue
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.float32)
        out = -(-size // stride)
        dy = jnp.asarray(rng.standard_normal((batch, out, out, cout)), jnp.float32)
        conv = jax.jit(lambda x, w: conv2d(x, w, stride, 1, "lax"))
        dx = jax.jit(lambda w, dy: jax.vjp(lambda x: conv2d(x, w, stride, 1, "lax"), x)[1](dy)[0])
        dk = jax.jit(lambda x, dy: jax.vjp(lambda w: conv2d(x, w, stride, 1, "lax"), w)[1](dy)[0])
        pieces = [("fwd", lambda: conv(x, w)), ("dx", lambda: dx(w, dy)), ("dk", lambda: dk(x, dy))]
        if stride == 1:
            dk_chunked = jax.jit(lambda x, dy: _filter_grad(x, dy, 3, 1, 1))
            pieces.append(("dk_chunked", lambda: dk_chunked(x, dy)))
        row = {"shape": shape}
        for name, fn in pieces:
            row[f"ms_{name}"] = round(_median_ms(lambda: jax.block_until_ready(fn()), steps), 1)
        try:
            row.update(_torch_pieces(x, w, dy, stride, steps))
        except ImportError:
            pass
        print(json.dumps(row), flush=True)


def _torch_pieces(x, w, dy, stride: int, steps: int) -> dict:
    """PyTorch's forward, input gradient and filter gradient of the same layer, each alone
    (``convolution_backward`` computes only the gradients its output mask asks for)."""
    import torch

    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())
    wt = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy())
    dyt = torch.tensor(np.asarray(dy).transpose(0, 3, 1, 2).copy())
    args = (dyt, xt, wt, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1)
    backward = torch.ops.aten.convolution_backward
    row = {}
    with torch.no_grad():
        for name, fn in (
                ("fwd", lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)),
                ("dx", lambda: backward(*args, [True, False, False])),
                ("dk", lambda: backward(*args, [False, True, False]))):
            row[f"ms_torch_{name}"] = round(_median_ms(fn, steps), 1)
    return row


def time_batches(batches, steps: int, only: str) -> None:
    """The ``--batches`` rows: ``lax`` vs ``chunked`` by batch size, one JSON line each."""
    from elf_jax.models.conv import resolve_impl

    rng = np.random.default_rng(0)
    for size, cin, cout, stride in SHAPES:
        shape = f"{size}x{size} {cin}->{cout} s{stride}"
        if stride != 1 or size < 8 or (only and not any(shape.startswith(o)
                                                         for o in only.split(","))):
            continue
        for n in batches:
            x = jnp.asarray(rng.standard_normal((n, size, size, cin)), jnp.float32)
            w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.float32)
            r = jnp.asarray(rng.standard_normal((n, size, size, cout)), jnp.float32)
            patch_bytes = n * size * size * 9 * cin * 4  # the whole batch's im2col matrix
            row = {"shape": shape, "batch": n, "patch_mb": round(patch_bytes / 2**20, 1),
                   "auto": resolve_impl("auto", size * size, cin, cout, 3, patch_bytes)}
            for impl in ("lax", "chunked"):
                fn = time_jax(impl, x, w, r, stride)
                t = time.perf_counter()
                fn()
                row[f"compile_s_{impl}"] = round(time.perf_counter() - t, 2)
                row[f"ms_{impl}"] = round(_median_ms(fn, steps), 2)
            row["chunked/lax"] = round(row["ms_chunked"] / row["ms_lax"], 2)
            print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--only", default="", help="comma-separated shape prefixes, e.g. '32x32 64'")
    p.add_argument("--nets", default="", help="whole networks instead, e.g. 'ConvNet:w32,VGG11'")
    p.add_argument("--pieces", action="store_true",
                   help="forward / input gradient / filter gradient apart, stride-1 shapes")
    p.add_argument("--batches", default="",
                   help="lax vs chunked at these batch sizes, e.g. '2,8,16,32,100'")
    args = p.parse_args()
    if args.batches:
        print(json.dumps({"cpu": cpu_model(), "jax": jax.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M")}))
        return time_batches([int(b) for b in args.batches.split(",")], args.steps, args.only)
    if args.pieces:
        print(json.dumps({"cpu": cpu_model(), "jax": jax.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M")}))
        return time_pieces(args.batch, args.steps, args.only)
    if args.nets:
        print(json.dumps({"cpu": cpu_model(), "jax": jax.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M")}))
        return time_nets(args.nets.split(","), args.batch, args.steps)
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    meta = {"cpu": cpu_model(), "backend": jax.default_backend(), "jax": jax.__version__,
            "torch": getattr(torch, "__version__", None), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(meta))
    for size, cin, cout, stride in SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.float32)
        so = (size + 2 - 3) // stride + 1
        r = jnp.asarray(rng.standard_normal((args.batch, so, so, cout)), jnp.float32)
        row = {"shape": f"{size}x{size} {cin}->{cout} s{stride}"}
        if args.only and not any(row["shape"].startswith(o) for o in args.only.split(",")):
            continue
        for impl in ("lax", "im2col", "chunked", "auto"):
            row[f"ms_{impl}"] = round(_median_ms(time_jax(impl, x, w, r, stride), args.steps), 2)
        if torch is not None:
            row["ms_torch"] = round(_median_ms(time_torch(x, w, r, stride), args.steps), 2)
            for impl in ("lax", "im2col", "chunked", "auto"):
                row[f"{impl}/torch"] = round(row[f"ms_{impl}"] / row["ms_torch"], 2)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
    main()
