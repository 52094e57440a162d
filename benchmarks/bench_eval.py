"""Benchmark of the evaluation training (ELF vs baseline loss; repeat strategies).

Workloads (SPEC.md "Reference cost"), random data:
  ConvNet  : CIFAR-10  IPC 10 -> 100 images, batch 100 (1 step/epoch), 10 classes
  VGG11    : CIFAR-100 IPC 10 -> 1000 images, batch 256 (4 steps/epoch, last 232), 100 classes
  ResNet18 : CIFAR-100 IPC 10 -> 1000 images, batch 256, 100 classes
Teacher features are random ``[N, *front_shape]``; DSA is the full strategy (mode S).

What is measured (all after compilation, ``block_until_ready``):
  * ``step``: one jitted ``train_step`` (ms/step, median of ``--steps``), baseline ``task`` vs
    ELF ``front_rear_task``; the ELF overhead in percent.
  * ``run``: the compiled chunk (``lax.scan`` over epochs, as ``run_evaluation`` runs it) for
    ``--chunk`` epochs and 1 repeat; ms per step and the projected time of the full protocol
    (``--epochs``+1 epochs). ``--full`` also times a real full ``run_evaluation`` call.
  * ``repeats``: ``--repeats`` repeats in one chunk with each strategy (``sequential``,
    ``vmap``): ms per step of all repeats and the projected full-protocol time.

Examples:
  # CPU-sized (2-core machine): ConvNet only, few steps
  python benchmarks/bench_eval.py --nets ConvNet --steps 5 --chunk 2 --repeats 5
  # GPU, everything, bf16
  python benchmarks/bench_eval.py --dtype bfloat16 --json out.jsonl

Each result is printed as one JSON line (and appended to ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

WORKLOADS = {
    "ConvNet": dict(n=100, classes=10, dataset="CIFAR-10 IPC 10"),
    "VGG11": dict(n=1000, classes=100, dataset="CIFAR-100 IPC 10"),
    "ResNet18": dict(n=1000, classes=100, dataset="CIFAR-100 IPC 10"),
}


def _emit(rec, path):
    rec = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **rec}
    line = json.dumps(rec)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="ConvNet,VGG11,ResNet18")
    ap.add_argument("--modes", default="task,front_rear_task")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps for the step benchmark")
    ap.add_argument("--chunk", type=int, default=10, help="epochs in the timed chunk")
    ap.add_argument("--epochs", type=int, default=1000, help="protocol epochs E for projections")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strategies", default="sequential,vmap")
    ap.add_argument("--strategy-nets", default="ConvNet,ResNet18", help="nets for the repeat benchmark")
    ap.add_argument("--skip", default="", help="comma list of: step,run,repeats")
    ap.add_argument("--width", type=int, default=0, help="ConvNet width override (0 = 128)")
    ap.add_argument("--n", type=int, default=0, help="override the number of synthetic images")
    ap.add_argument("--full", action="store_true", help="also time one real full run_evaluation")
    ap.add_argument("--engine", default="auto", choices=("auto", "scan", "host"),
                    help="runner engine (auto: host on CPU, scan elsewhere)")
    ap.add_argument("--json", default="", help="append JSON lines here")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from elf_jax.models import get_model
    from elf_jax.train.protocol import TrainProtocol
    from elf_jax.train.runner import (default_engine, init_states, make_chunk_fn,
                                      make_host_chunk_fn, run_evaluation)
    from elf_jax.train.step import jit_train_step

    skip = set(filter(None, args.skip.split(",")))
    engine = default_engine() if args.engine == "auto" else args.engine

    def chunk_fn(net, p, strat, n):
        if engine == "host" and strat == "sequential":
            return make_host_chunk_fn(net, p, args.chunk, strat, n=n), "host"
        return make_chunk_fn(net, p, args.chunk, strat, n=n), "scan"

    dev = jax.devices()[0]
    machine = {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpus": os.cpu_count(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "dtype": args.dtype,
    }
    _emit({"kind": "machine", **machine, "argv": sys.argv[1:]}, args.json)
    rng = np.random.default_rng(0)

    def setup(name, mode):
        w = WORKLOADS[name]
        n = args.n or w["n"]
        ovr = {"dtype": jnp.dtype(args.dtype)}
        if name == "ConvNet" and args.width:
            ovr["width"] = args.width
        net = get_model(name, w["classes"], **ovr)
        p = TrainProtocol(mode=mode, dtype=args.dtype, epochs=args.epochs)
        x = jnp.asarray(rng.normal(size=(n, 32, 32, 3)).astype(np.float32))
        y = jnp.asarray(np.arange(n) % w["classes"], jnp.int32)
        fshape = jax.eval_shape(
            lambda k, x: net.apply(net.init(k, x), x, method=net.front), jax.random.PRNGKey(0), x[:1]
        ).shape[1:]
        f = jnp.asarray(np.abs(rng.normal(size=(n,) + tuple(fshape))).astype(np.float32))
        return net, p, x, y, f, w, n

    nets = [s for s in args.nets.split(",") if s]
    modes = [s for s in args.modes.split(",") if s]
    step_ms = {}
    for name in nets:
        for mode in modes:
            net, p, x, y, f, w, n = setup(name, mode)
            nfull, b, last = p.batch_plan(n)
            steps_per_epoch = nfull + (1 if last else 0)
            data = {"images": x, "labels": y}
            if mode != "task":
                data["features"] = f
            base = {"net": name, "mode": mode, "workload": w["dataset"], "n": n, "batch": b}
            if "step" not in skip:
                st = jax.tree.map(lambda a: a[0], init_states(net, p, jax.random.PRNGKey(0), 1, x[:1]))
                batch = {k: v[:b] for k, v in data.items()}
                t = time.perf_counter()
                st, m = jit_train_step(st, batch, jax.random.PRNGKey(1), net=net, protocol=p)
                jax.block_until_ready(st)
                compile_s = time.perf_counter() - t
                times, cpu = [], []
                for i in range(args.steps):
                    t, c = time.perf_counter(), time.process_time()
                    st, m = jit_train_step(st, batch, jax.random.PRNGKey(i), net=net, protocol=p)
                    jax.block_until_ready(st)
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
                ms = 1e3 * statistics.median(times)
                step_ms[(name, mode)] = ms
                _emit({"kind": "step", **base, "ms_per_step": round(ms, 3),
                       "ms_min": round(1e3 * min(times), 3),
                       "cpu_ms_per_step": round(1e3 * statistics.median(cpu), 1),
                       "compile_s": round(compile_s, 1)}, args.json)
                del st
            if "run" not in skip:
                states = init_states(net, p, jax.random.PRNGKey(0), 1, x[:1])
                fn, eng = chunk_fn(net, p, "sequential", n)
                t = time.perf_counter()
                states, ms_ = fn(states, data, jnp.asarray(args.chunk, jnp.int32))
                jax.block_until_ready(states)
                compile_s = time.perf_counter() - t
                t = time.perf_counter()
                states, ms_ = fn(states, data, jnp.asarray(args.chunk, jnp.int32))
                jax.block_until_ready(states)
                dt = time.perf_counter() - t
                per_epoch = dt / args.chunk
                _emit({"kind": "run", **base, "engine": eng, "steps_per_epoch": steps_per_epoch,
                       "ms_per_step": round(1e3 * per_epoch / steps_per_epoch, 3),
                       "projected_run_s": round(per_epoch * (args.epochs + 1), 2),
                       "compile_s": round(compile_s, 1)}, args.json)
                del states
            if args.full:
                t = time.perf_counter()
                out = run_evaluation(net, p, x, y, x[:500], y[:500], f if mode != "task" else None,
                                     repeats=1, chunk_epochs=max(args.chunk, 100), progress=False,
                                     engine=args.engine)
                _emit({"kind": "full_run", **base, "epochs": args.epochs + 1, "repeats": 1,
                       "wall_s_incl_compile": round(time.perf_counter() - t, 2),
                       "train_s": round(out["seconds"], 2)}, args.json)
        for_overhead = [(nm, md) for (nm, md) in step_ms if nm == name]
        if ("task" in modes and "front_rear_task" in modes and (name, "task") in step_ms
                and (name, "front_rear_task") in step_ms):
            a, b_ = step_ms[(name, "task")], step_ms[(name, "front_rear_task")]
            _emit({"kind": "elf_overhead", "net": name, "task_ms": round(a, 3), "elf_ms": round(b_, 3),
                   "overhead_pct": round(100 * (b_ / a - 1), 1)}, args.json)
        del for_overhead

    if "repeats" not in skip:
        for name in [s for s in args.strategy_nets.split(",") if s]:
            if name not in WORKLOADS:
                continue
            mode = "front_rear_task"
            net, p, x, y, f, w, n = setup(name, mode)
            nfull, b, last = p.batch_plan(n)
            steps_per_epoch = nfull + (1 if last else 0)
            data = {"images": x, "labels": y, "features": f}
            for strat in [s for s in args.strategies.split(",") if s]:
                states = init_states(net, p, jax.random.PRNGKey(0), args.repeats, x[:1])
                fn, eng = chunk_fn(net, p, strat, n)
                t = time.perf_counter()
                states, _ = fn(states, data, jnp.asarray(args.chunk, jnp.int32))
                jax.block_until_ready(states)
                compile_s = time.perf_counter() - t
                t = time.perf_counter()
                states, _ = fn(states, data, jnp.asarray(args.chunk, jnp.int32))
                jax.block_until_ready(states)
                per_epoch = (time.perf_counter() - t) / args.chunk
                _emit({"kind": "repeats", "net": name, "mode": mode, "strategy": strat, "engine": eng,
                       "repeats": args.repeats, "workload": w["dataset"], "n": n,
                       "ms_per_step_all_repeats": round(1e3 * per_epoch / steps_per_epoch, 3),
                       "projected_run_s": round(per_epoch * (args.epochs + 1), 2),
                       "compile_s": round(compile_s, 1)}, args.json)
                del states


if __name__ == "__main__":
    main()
