"""Distillation benchmarks: time per iteration per method, and MTT vs TESLA peak memory.

    python benchmarks/bench_distill.py time                      # CIFAR-10 shape, IPC 10
    python benchmarks/bench_distill.py time --methods dm,mtt,tesla --width 128
    python benchmarks/bench_distill.py time --methods dsa --outer 2 --inner 5   # CPU-sized
    python benchmarks/bench_distill.py memory --syn-steps 10,20,40,80

``time``: random CIFAR-10-shaped data (32x32x3, 10 classes, 500 real images per class),
ConvNet (width ``--width``, depth 3, instance norm), IPC ``--ipc``; one jitted step per
method is compiled, run ``--warmup`` times, then timed over ``--iters`` iterations
(``block_until_ready``). DC/DSA use the reference (outer, inner) loops for the IPC unless
``--outer/--inner`` are given (an iteration is then a fraction of the reference's). MTT and
TESLA: ``--syn-steps`` (first value) student steps, batch_syn = all images.

``memory``: peak memory of the compiled MTT step (unrolled gradient), the remat variant and
TESLA's two-pass gradient, from XLA's ``compiled.memory_analysis()`` (arguments + outputs +
temporaries - aliased), deterministic and available on the CPU; nothing is run.
Prints a Markdown table; ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.data.sampler import ClassIndex
from elf_jax.distill import common as C
from elf_jax.distill.dm import make_dm_step
from elf_jax.distill.gradient_matching import get_loops, make_gm_step
from elf_jax.distill.mtt import make_mtt_step
from elf_jax.models import get_model

K, PER_CLASS, SHAPE = 10, 500, (32, 32, 3)


def _pool(key):
    x = jax.random.normal(key, (K * PER_CLASS,) + SHAPE, jnp.float32)
    labels = np.repeat(np.arange(K, dtype=np.int32), PER_CLASS)

    class D:  # minimal dataset view
        images, num_classes, name = np.asarray(x), K, "random_cifar10_shape"

    D.labels = labels
    return D, ClassIndex(D)


def _mtt_setup(net, ipc, syn_steps, gradient):
    images = jax.random.normal(jax.random.key(1), (K * ipc,) + SHAPE)
    params = net.init(jax.random.key(2), images[:1])["params"]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    labels = np.repeat(np.arange(K, dtype=np.int32), ipc)
    step = make_mtt_step(net, unravel, num_classes=K, hard_labels=labels, syn_steps=syn_steps,
                         gradient=gradient)
    state = C.init_state({"images": images, "lr": np.float32(0.01)}, step.optimizer,
                         jax.random.key(3))
    target = flat + 0.01 * jax.random.normal(jax.random.key(4), flat.shape)
    return step, state, (flat, target)


def bench_time(args):
    net = get_model("ConvNet", K, width=args.width)
    ds, pool = _pool(jax.random.key(0))
    images, _ = C.init_synthetic(jax.random.key(1), ds, args.ipc)
    rows = []
    for method in args.methods.split(","):
        extra = ""
        if method == "dm":
            step = make_dm_step(net, lr_img=1.0)
            state = C.init_state({"images": images}, step.optimizer, jax.random.key(2))

            def run(st, k):
                return step(st, k, pool.sample_all_classes(k, args.batch_real))
        elif method in ("dc", "dsa"):
            outer, inner = get_loops(args.ipc)
            if args.outer:
                outer, inner = args.outer, args.inner
                extra = f"outer {outer}, inner {inner} (reference {get_loops(args.ipc)})"
            step = make_gm_step(net, num_classes=K, ipc=args.ipc, outer_loop=outer,
                                inner_loop=inner, batch_real=args.batch_real,
                                dsa_strategy=C.DEFAULT_STRATEGY if method == "dsa" else None,
                                class_loop=args.class_loop)
            extra += f" class_loop {args.class_loop}"
            state = C.init_state({"images": images}, step.optimizer, jax.random.key(2))

            def run(st, k):
                return step(st, k, pool.arrays)
        elif method in ("mtt", "tesla", "remat"):
            gradient = {"mtt": "unrolled", "tesla": "tesla", "remat": "remat"}[method]
            n = int(args.syn_steps.split(",")[0])
            step, state, (start, target) = _mtt_setup(net, args.ipc, n, gradient)
            extra = f"syn_steps {n}, batch_syn {K * args.ipc}"

            def run(st, k):
                return step(st, k, start, target)
        else:
            raise SystemExit(f"unknown method {method}")
        t0 = time.perf_counter()
        for w in range(args.warmup):
            state, m = run(state, jax.random.key(100 + w))
            jax.block_until_ready(m["loss"])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(args.iters):
            state, m = run(state, jax.random.key(i))
        jax.block_until_ready(state.syn["images"])
        per = (time.perf_counter() - t0) / args.iters
        rows.append({"method": method, "ms_per_iteration": per * 1e3,
                     "compile_plus_first_s": first, "note": extra,
                     "loss": float(m["loss"])})
        print(f"{method:6s} {per * 1e3:10.1f} ms/iteration  (compile+warmup {first:.1f} s) "
              f"{extra}", flush=True)
    return rows


def _peak(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def bench_memory(args):
    net = get_model("ConvNet", K, width=args.width)
    rows = []
    for n in [int(s) for s in args.syn_steps.split(",")]:
        row = {"syn_steps": n}
        for gradient in args.gradients.split(","):
            step, state, (start, target) = _mtt_setup(net, args.ipc, n, gradient)
            t0 = time.perf_counter()
            compiled = step.lower(state, jax.random.key(0), start, target).compile()
            mem = compiled.memory_analysis()
            row[gradient] = {"peak_bytes": _peak(compiled),
                             "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
                             "compile_s": time.perf_counter() - t0}
            print(f"syn_steps {n:3d} {gradient:9s} peak {row[gradient]['peak_bytes'] / 2**20:9.1f}"
                  f" MiB  temp {row[gradient]['temp_bytes'] / 2**20:9.1f} MiB", flush=True)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("time", "memory"))
    p.add_argument("--methods", default="dm,dsa,dc,mtt,tesla")
    p.add_argument("--gradients", default="unrolled,remat,tesla")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--outer", type=int, default=0)
    p.add_argument("--inner", type=int, default=0)
    p.add_argument("--syn-steps", default="20")
    p.add_argument("--class-loop", default="map", choices=("map", "vmap"))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.what == "memory" and args.syn_steps == "20":
        args.syn_steps = "10,20,40,80"
    info = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "machine": platform.machine(), "jax": jax.__version__, "args": vars(args)}
    print(json.dumps(info))
    rows = bench_time(args) if args.what == "time" else bench_memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
