"""Item 6: does each distillation method beat a random real subset of the same size?

    python experiments/distill_vs_random.py --methods dm,dsa            # ~20 min on a shared 2-core CPU
    python experiments/distill_vs_random.py --methods dm,dsa,dc,mtt,tesla --workdir runs/dvr

On the embedded real MNIST-5k (4,000 train / 1,000 test), IPC 10: distills one set per
method with a CPU-sized setting (ConvNet width ``--width``; fewer iterations and, for DC/DSA,
shorter loops than the reference: see ``SETTINGS``), draws a random real subset of the same
size, and trains ``--repeats`` ConvNets (same width) on each with the train runner (the
reference protocol shortened to ``--eval-epochs`` epochs: SGD 0.01, momentum 0.9, wd 5e-4,
DSA on, lr x0.1 after E//2+1), then prints both test accuracies (mean +- std). The same
evaluation keys are used for both sets. Distillation runs checkpoint under ``--workdir`` and
resume if killed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

# CPU-sized settings per method (the reference's in the comments)
SETTINGS = {
    "dm": dict(iterations=200, batch_real=64),  # ref: 20000 iterations, batch_real 256
    "dsa": dict(iterations=10, outer_loop=5, inner_loop=5, batch_real=64),  # ref: 1000, (10, 50), 256
    "dc": dict(iterations=10, outer_loop=5, inner_loop=5, batch_real=64),
    "mtt": dict(iterations=100, syn_steps=10, expert_epochs=2, max_start_epoch=6, lr_img=100.0,
                lr_lr=1e-5, lr_teacher=1e-2, num_experts=2, expert_train_epochs=8),
    "tesla": dict(iterations=100, syn_steps=10, expert_epochs=2, max_start_epoch=6,
                  lr_img=100.0, lr_lr=1e-5, lr_teacher=1e-2, num_experts=2,
                  expert_train_epochs=8),
}


def evaluate(images, labels, test, *, width, epochs, repeats, key):
    from elf_jax.models import get_model
    from elf_jax.train import TrainProtocol, run_evaluation

    net = get_model("ConvNet", 10, width=width)
    protocol = TrainProtocol(epochs=epochs, mode="task")
    out = run_evaluation(net, protocol, images, labels, test.images, test.labels,
                         repeats=repeats, key=key, strategy="sequential", progress=False)
    return out["mean"], out["std"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="dm,dsa")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/distill_vs_random")
    p.add_argument("--json", default="")
    args = p.parse_args()

    from elf_jax.data import load
    from elf_jax.distill import distill
    from elf_jax.synset import random_real_subset

    train, test = load("mnist5k", "train"), load("mnist5k", "test")
    key = jax.random.key(args.seed)
    k_rand, k_dist, k_eval = jax.random.split(key, 3)
    rand = random_real_subset(k_rand, train, args.ipc)
    t0 = time.perf_counter()
    r_mean, r_std = evaluate(rand.images, rand.labels, test, width=args.width,
                             epochs=args.eval_epochs, repeats=args.repeats, key=k_eval)
    print(f"random real subset IPC {args.ipc}: {100 * r_mean:.2f} +- {100 * r_std:.2f} % "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for method in args.methods.split(","):
        kw = dict(SETTINGS[method])
        t0 = time.perf_counter()
        s = distill(method, train, arch="ConvNet", ipc=args.ipc,
                    model_kwargs={"width": args.width}, key=k_dist,
                    workdir=Path(args.workdir) / method, checkpoint_every=10, **kw)
        t_dist = time.perf_counter() - t0
        t0 = time.perf_counter()
        mean, std = evaluate(s.images, s.labels, test, width=args.width,
                             epochs=args.eval_epochs, repeats=args.repeats, key=k_eval)
        row = {"method": method, "acc": mean, "std": std, "random_acc": r_mean,
               "random_std": r_std, "distill_s": t_dist, "eval_s": time.perf_counter() - t0,
               "settings": kw}
        rows.append(row)
        verdict = "beats" if mean > r_mean else "does NOT beat"
        print(f"{method.upper():6s} IPC {args.ipc}: {100 * mean:.2f} +- {100 * std:.2f} %  vs "
              f"random real {100 * r_mean:.2f} +- {100 * r_std:.2f} %  -> {verdict} random "
              f"(distill {t_dist:.0f} s)", flush=True)
    info = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
            "cpu_count": __import__("os").cpu_count(), "backend": jax.default_backend(),
            "args": vars(args)}
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
