"""Data-parallel evaluation training on simulated CPU devices: ms per step and device-to-host
array fetches per epoch, measured over whole epochs of the engine (not single steps).

    python benchmarks/bench_parallel_epoch.py --sim 8 --runs 2 --epochs 4

It runs the engine (``elf_jax.train.runner.fit`` on a ``(runs, data)`` placement) or, on a
checkout from before the one-engine refactor, the old ``elf_jax.parallel.loop.train_parallel``
with the same settings, so that both can be measured on one machine. Per-step time is the
marginal time of ``--epochs`` epochs over a 1-epoch run, after a first 1-epoch run (the
engine runs all of them as one chunk of ``1 + --epochs`` epochs, one executable). Fetches are
counted where JAX copies an array's value to the host (``ArrayImpl._value``); every fetch is
a host sync. The simulated devices share the same cores: the figures show overhead, not
scaling.
"""

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="ConvNet")
ap.add_argument("--width", type=int, default=16)
ap.add_argument("--hw", type=int, default=16)
ap.add_argument("--n", type=int, default=256, help="training images")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--runs", type=int, default=2)
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--epochs", type=int, default=4)
ap.add_argument("--engine", default="auto")
ap.add_argument("--sim", type=int, default=8)
args = ap.parse_args()
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.sim}")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import array as jax_array  # noqa: E402

from elf_jax.models import get_model  # noqa: E402
from elf_jax.parallel import ParallelConfig  # noqa: E402
try:
    from elf_jax.train.protocol import TrainProtocol  # noqa: E402
except ImportError:  # a checkout from before the rename
    from elf_jax.train.protocol import EvalProtocol as TrainProtocol  # noqa: E402

FETCHES = [0]
_value = jax_array.ArrayImpl._value


def _counting(self):
    FETCHES[0] += 1
    return _value.fget(self)


jax_array.ArrayImpl._value = property(_counting)


def train(net, proto, data, pc, epochs):
    """Trains ``epochs`` epochs; returns (seconds, fetches, which code ran)."""
    FETCHES[0] = 0
    t = time.perf_counter()
    try:
        from elf_jax.train.runner import fit, init_states

        states = init_states(net, proto, jax.random.key(0), args.repeats, data["images"][:1])
        out = fit(net, proto, data, states, num_epochs=epochs, placement=pc, engine=args.engine,
                  chunk_epochs=1 + args.epochs, checkpoint_every=0, progress=False)
        jax.block_until_ready(out[0])
        which = f"engine ({out[2]['engine']})"
    except ImportError:
        from elf_jax.parallel.loop import train_parallel

        out = train_parallel(net, proto, data["images"], data["labels"], data["features"],
                             repeats=args.repeats, key=jax.random.PRNGKey(0), config=pc,
                             max_epochs=epochs)
        which = "parallel.loop (before)"
    return time.perf_counter() - t, FETCHES[0], which


def main():
    net = get_model(args.arch, 10, width=args.width)
    proto = TrainProtocol(batch_size=args.batch, mode="front_rear_task", epochs=args.epochs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.hw, args.hw, 3)).astype(np.float32)
    fshape = jax.eval_shape(lambda: net.apply(net.init(jax.random.key(0), x[:1]), x[:1],
                                              method=net.front)).shape[1:]
    data = {"images": x, "labels": (np.arange(args.n) % 10).astype(np.int32),
            "features": rng.uniform(size=(args.n,) + fshape).astype(np.float32) / fshape[-1]}
    pc = ParallelConfig(parallel="shard_map", runs=args.runs)
    steps = -(-args.n // args.batch)
    t0, f0, which = train(net, proto, data, pc, 1)  # compiles (where the code caches it)
    t1, f1, _ = train(net, proto, data, pc, 1)
    te, fe, _ = train(net, proto, data, pc, 1 + args.epochs)
    per_step = 1e3 * (te - t1) / (args.epochs * steps)
    print(f"# {which}; {jax.device_count()} simulated CPU devices, mesh runs={args.runs}; "
          f"{args.arch} width {args.width} {args.hw}x{args.hw}, {args.n} images, batch "
          f"{args.batch} ({steps} steps/epoch), {args.repeats} repeats")
    print(f"ms per step (all repeats): {per_step:.1f}; array fetches per epoch: "
          f"{(fe - f1) / args.epochs:.1f} (first, compiling 1-epoch run: {t0:.1f} s)")


if __name__ == "__main__":
    main()
