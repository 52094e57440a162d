"""Steps/s of the data-parallel ELF train step against the number of devices.

    python benchmarks/bench_scaling.py --arch ConvNet --batch 256 --devices 1 2 4 8
    python benchmarks/bench_scaling.py --arch ResNet18 --dtype bfloat16 --devices 1   # a GPU

On the CPU, ``--sim N`` (default 8 when only one CPU device exists) simulates N devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N; they share the same cores, so those
numbers prove that the program runs, not that it scales. Each row: one jitted step (full ELF
loss ``front_rear_task``, full DSA drawn for the global batch, sync BN) at a fixed GLOBAL
batch (strong scaling), timed over ``--steps`` steps after a warm-up step that compiles.
"""

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="ConvNet")
ap.add_argument("--width", type=int, default=0)
ap.add_argument("--hw", type=int, default=32)
ap.add_argument("--classes", type=int, default=10)
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
ap.add_argument("--parallel", nargs="+", default=["none", "shard_map", "pmap"])
ap.add_argument("--dtype", default="float32")
ap.add_argument("--mode", default="front_rear_task")
ap.add_argument("--sim", type=int, default=8)
args = ap.parse_args()
if "XLA_FLAGS" not in os.environ and args.sim:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.sim}"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from elf_jax.models import get_model  # noqa: E402
from elf_jax.parallel import ParallelConfig, make_mesh  # noqa: E402
from _data_parallel import DataParallel  # noqa: E402  (tests/: the single-step wrappers)
from elf_jax.train.protocol import TrainProtocol  # noqa: E402
from elf_jax.train.step import init_state  # noqa: E402


def main():
    kw = {"width": args.width} if args.width else {}
    if args.dtype != "float32":
        kw["dtype"] = args.dtype
    net = get_model(args.arch, args.classes, **kw)
    proto = TrainProtocol(batch_size=args.batch, mode=args.mode, dtype=args.dtype)
    B = args.batch
    x = np.asarray(jax.random.normal(jax.random.key(1), (B, args.hw, args.hw, 3)))
    y = np.arange(B) % args.classes
    st0 = jax.tree.map(np.asarray, init_state(net, proto, jax.random.key(0),
                                              jax.random.key_data(jax.random.key(2)), x[:1]))
    v = {"params": st0.params, **({"batch_stats": st0.batch_stats} if st0.batch_stats else {})}
    fshape = jax.eval_shape(lambda: net.apply(v, jnp.asarray(x[:1]), method=net.front)).shape[1:]
    f = np.asarray(jax.random.uniform(jax.random.key(5), (B,) + fshape))
    batch = {"images": x, "labels": y, "features": f}
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"{args.arch} {args.dtype}, global batch {B}, {args.hw}x{args.hw}, mode {args.mode}")
    print("| parallel | devices | ms/step | steps/s | images/s |\n|---|---|---|---|---|")
    for par in args.parallel:
        for d in (args.devices if par != "none" else [1]):
            if d > jax.device_count() or B % d:
                continue
            mesh = make_mesh(1, d, jax.devices()[:d]) if par == "shard_map" else None
            pc = ParallelConfig(parallel=par, data=d if par == "pmap" else 0)
            dp = DataParallel(net, proto, pc, mesh=mesh, donate=True)
            st = dp.put_state(jax.tree.map(jnp.asarray, st0) if par == "none" else st0)
            pb = dp.put_batch(batch)
            k = jax.random.key_data(jax.random.key(3))
            st, m = dp.step(st, pb, k)
            jax.block_until_ready(m)
            t = time.perf_counter()
            for _ in range(args.steps):
                st, m = dp.step(st, pb, k)
            jax.block_until_ready((st, m))
            dt = (time.perf_counter() - t) / args.steps
            print(f"| {par} | {d} | {dt * 1e3:.2f} | {1 / dt:.2f} | {B / dt:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
