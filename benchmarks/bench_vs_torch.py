"""Ours vs PyTorch, same run, same machine: the time of one training step and the ratio.

For each architecture (``--nets``; names present both in ``elf_jax.models`` and in the
reference re-implementation ``tests/torch_reference_nets.py``), two workloads on random
32x32x3 images, ``--batch`` rows (default 100: CIFAR-10 IPC 10, one step per epoch), 10
classes:

* ``plain``: cross-entropy of the logits and its gradient w.r.t. the parameters (BatchNorm
  in training mode). Ours: ``jax.jit(jax.value_and_grad(...))`` of ``net.apply``. Torch:
  ``F.cross_entropy(net(x), y).backward()``.
* ``elf``: the full ELF evaluation step, mode ``front_rear_task``, ``kind="ce"``, the full
  DSA strategy (mode S), teacher features of the front's shape, SGD momentum 0.9 and weight
  decay 5e-4. Ours: the jitted per-minibatch function the CPU ("host") engine dispatches
  (``elf_jax.train.runner._host_step``: the minibatch gather, then ``_batch_step`` around
  ``placed_step``: the DSA draw, front, rear on the image and on the teacher feature, the
  loss, SGD). Torch: the
  reference's step on its split network (``ConvNet_L3``, ``VGG11_L5``,
  ``ResNet18_Layered`` ...): a minibatch gathered by a random permutation,
  ``DiffAugment`` mode S (the formulas of ``bench_dsa.py``), ``ftr, out = front, rear``,
  ``rear(teacher feature)``, ``CE(out, y) + CE(ftr, teacher) + CE(rear(teacher), y)``,
  ``torch.optim.SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``. AlexNet has no ELF split
  (neither here nor in the reference): its ``elf`` line says so.
* ``elf_epoch`` (not by default, ``--workloads plain,elf,elf_epoch``): ours is one whole
  host-engine epoch (``_host_epochs``: ``epoch_plan``, the step, ``_close_epoch``), which
  at one step per epoch is what the engine really pays per step; torch as for ``elf``.
* ``dm`` (not by default; once, on ConvNet, the reference's DM network): one DM iteration at
  the reference's CIFAR-10 IPC-10 setting (10 classes x ``batch_real`` 256 real images of a
  random 500-per-class pool, 10 synthetic images per class, full DSA): ours is
  ``elf_jax.distill.dm.make_dm_step`` (a fresh network, the siamese DSA draw, all classes in
  one batch, SGD on the images) with the real batch sampled by ``ClassIndex``; torch the
  reference ``distill_DM.py`` iteration: a fresh ``get_network`` with frozen parameters, per
  class a random permutation's first 256 real images and the class's synthetic images
  through ``DiffAugment`` with one seed, ``sum ||mean embed(real) - mean embed(syn)||^2``,
  ``SGD(lr=1, momentum=0.5)`` on the images.

Both nets start from the same weights (the torch net's ``state_dict`` converted with
``elf_jax.interop.torch.from_torch_state_dict``); once per net, untimed, the plain loss
and gradient of both are compared: ``loss_ours``, ``loss_torch``, and ``grad_err_*``
(max |difference| over all parameters / the largest gradient entry) of ours vs torch and
of each vs the torch net run in float64, which says which side is off.

Timing: compile/warm-up first (ours: the compiling call, which also runs the step; torch:
one call), then ``--steps`` steps of ours and torch interleaved (one of each, alternately;
fewer, at least 3, where they would take more than ``--budget-s`` seconds: ``steps`` in
the output says how many); the median of each (``block_until_ready`` for ours). Torch runs with
``torch.set_num_threads(os.cpu_count())``, JAX with its defaults. One JSON line per
(net, workload) with ``ms_ours``, ``ms_torch``, ``ratio`` (ours / torch), the CPU model, the
versions and the date; ``--json FILE`` appends them. A markdown table goes to stderr at the
end. torch is optional: without it the script says so and exits with status 2.

    PYTHONPATH=$PWD python benchmarks/bench_vs_torch.py                    # all 7 nets
    PYTHONPATH=$PWD python benchmarks/bench_vs_torch.py --nets ConvNet --steps 3
    PYTHONPATH=$PWD python benchmarks/bench_vs_torch.py --workloads plain,elf,dm  # + DM
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_NETS = "ConvNet,ConvNetBN,VGG11,VGG11BN,ResNet18,ResNet18BN,AlexNet"
# our registry name -> the reference's split ("feature") class name
TORCH_SPLIT = {
    "ConvNet": "ConvNet_L3", "ConvNetBN": "ConvNetBN_L3", "VGG11": "VGG11_L5",
    "VGG11BN": "VGG11BN_L5", "ResNet18": "ResNet18_Layered", "ResNet18BN": "ResNet18BN_Layered",
}
NUM_CLASSES = 10
SHAPE = (32, 32, 3)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _emit(rec, path):
    line = json.dumps(rec)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------- torch side
def torch_front_rear(tnet):
    """``(front, rear)`` of a reference split network (tests/torch_reference_nets.py)."""
    import torch.nn.functional as F

    cls = type(tnet).__name__
    if cls in ("ConvNetFeature", "VGG11Feature"):
        def rear(f):
            out = tnet.layer2(f)
            return tnet.classifier(out.reshape(out.shape[0], -1))

        return tnet.layer1, rear
    if cls == "ResNet18" and tnet.layered == "resnet_layered":
        def front(x):
            out = F.relu(tnet.bn1(tnet.conv1(x)))
            for n in tnet._stage_names[:-1]:
                out = getattr(tnet, n)(out)
            return out

        def rear(f):
            out = F.avg_pool2d(getattr(tnet, tnet._stage_names[-1])(f), 4)
            return tnet.classifier(out.reshape(out.shape[0], -1))

        return front, rear
    raise ValueError(f"no front/rear for the torch net {cls}")


def grad_errors(torch, name, tnet, grads_sd, xt, yt) -> dict:
    """Plain-gradient agreement, each ``max |a - b|`` over all parameters divided by the
    largest float64 gradient entry (per-tensor ratios are meaningless for the conv biases
    before a norm, whose exact gradient is 0): ours vs torch float32, and each of them vs
    the torch net run in float64 (which side is off)."""
    import copy

    import torch.nn.functional as F

    t64 = copy.deepcopy(tnet).double()
    t64.zero_grad(set_to_none=True)
    F.cross_entropy(t64(xt.double()), yt).backward()
    g64 = {n: p.grad.numpy() for n, p in t64.named_parameters()}
    scale = max(float(np.abs(g).max()) for g in g64.values())
    g32 = {n: p.grad.detach().numpy().astype(np.float64) for n, p in tnet.named_parameters()}
    ours = {n: np.asarray(grads_sd[n], np.float64) for n in g64}

    def err(a, b):
        return float(f"{max(float(np.abs(a[n] - b[n]).max()) for n in g64) / scale:.2e}")

    return {"grad_err_ours_torch": err(ours, g32), "grad_err_ours_f64": err(ours, g64),
            "grad_err_torch_f64": err(g32, g64)}


# ------------------------------------------------------------------------------- the bench
def bench_net(name, args, torch, ctx):
    import jax
    import jax.numpy as jnp
    import torch.nn.functional as F

    from bench_dsa import torch_dsa, torch_dsa_groups
    from elf_jax.augment import DEFAULT_STRATEGY
    from elf_jax.losses import task_loss
    from elf_jax.interop.torch import from_torch_state_dict, to_torch_state_dict
    from elf_jax.models import get_model
    from elf_jax.parallel.placement import Placement
    from elf_jax.train.protocol import TrainProtocol
    from elf_jax.train.runner import (METRIC_KEYS, _host_epochs, _host_step, memory_batches,
                                      placed_step)
    from elf_jax.train.step import init_state, make_variables
    from torch_reference_nets import get_reference_network

    b = args.batch
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(b,) + SHAPE).astype(np.float32)
    y_np = (np.arange(b) % NUM_CLASSES).astype(np.int64)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np, jnp.int32)
    xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y_np)

    torch.manual_seed(0)
    tnet = get_reference_network(name, SHAPE[2], NUM_CLASSES, SHAPE[:2]).train()
    variables = from_torch_state_dict(name, tnet.state_dict(), NUM_CLASSES, SHAPE)
    net = get_model(name, NUM_CLASSES)
    params, bstats = variables["params"], variables.get("batch_stats", {})
    out = []

    # ---------------------------------------------------------------- (a) plain gradient
    # (always run: it holds the numerics check)
    def loss_fn(p, bs, x, y):
        v = make_variables(p, bs)
        if bs:
            logits, upd = net.apply(v, x, train=True, mutable=["batch_stats"])
            bs = upd["batch_stats"]
        else:
            logits = net.apply(v, x, train=True)
        return task_loss(logits, y), bs

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def ours_plain():
        (loss, _), g = grad_fn(params, bstats, x, y)
        jax.block_until_ready(g)
        return loss, g

    def torch_plain():
        tnet.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tnet(xt), yt)
        loss.backward()
        return loss

    t = time.perf_counter()
    loss_o, g = ours_plain()  # compiles; the numerics check, untimed
    compile_plain = time.perf_counter() - t
    loss_t = torch_plain()
    check = {"loss_ours": round(float(loss_o), 6), "loss_torch": round(float(loss_t.item()), 6),
             "loss_abs_diff": float(f"{abs(float(loss_o) - float(loss_t.item())):.2e}")}
    try:
        gsd = to_torch_state_dict(name, make_variables(g, bstats), NUM_CLASSES, SHAPE,
                                  as_numpy=True)
        check.update(grad_errors(torch, name, tnet, gsd, xt, yt))
    except Exception as err:  # say it rather than fake it
        check["grad_check"] = f"not compared: {type(err).__name__}: {err}"
    to, tt = _interleaved(ours_plain, torch_plain, args.steps, args.budget_s)
    out.append(_record(ctx, name, "plain", b, to, tt, compile_plain, check))
    del g

    # ---------------------------------------------------------------- (b) full ELF step
    split = TORCH_SPLIT.get(name)
    if not {"elf", "elf_epoch"} & set(args.workloads):
        return out
    if not getattr(net, "has_split", False) or split is None:
        out.append({**ctx, "net": name, "workload": "elf", "batch": b, "ms_ours": None,
                    "ms_torch": None, "ratio": None,
                    "skipped": f"{name} has no ELF split (front/rear), here or in the reference"})
        return out

    protocol = TrainProtocol(mode="front_rear_task", kind="ce", dsa_strategy=DEFAULT_STRATEGY,
                             batch_size=b, lr=0.01, momentum=0.9, weight_decay=5e-4)
    fshape = jax.eval_shape(lambda v, x: net.apply(v, x, method=net.front), variables, x).shape
    f_np = np.abs(rng.normal(size=fshape)).astype(np.float32)
    data = {"images": x, "labels": y, "features": jnp.asarray(f_np)}
    state = init_state(net, protocol, jax.random.PRNGKey(0), jax.random.PRNGKey(1), x[:1])
    state = state._replace(params=params, batch_stats=bstats,
                           opt_state=protocol.optimizer().init(params))
    step = placed_step(net, protocol, Placement())
    keys = jax.random.split(jax.random.PRNGKey(2), args.steps + 3)
    perms = [jax.random.permutation(k, b) for k in jax.random.split(jax.random.PRNGKey(3),
                                                                      args.steps + 3)]
    sums = [{k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS} for _ in perms]
    st = {"state": state, "i": 0}

    def ours_elf():
        i = st["i"]
        st["state"], m = _host_step(st["state"], sums[i], data, perms[i], 0, keys[i],
                                    step=step, size=b)
        jax.block_until_ready((st["state"], m))
        st["i"] = i + 1

    tsplit = get_reference_network(split, SHAPE[2], NUM_CLASSES, SHAPE[:2]).train()
    tsplit.load_state_dict(to_torch_state_dict(split, variables, NUM_CLASSES, SHAPE))
    front, rear = torch_front_rear(tsplit)
    opt = torch.optim.SGD(tsplit.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    ft = torch.from_numpy(f_np.transpose(0, 3, 1, 2).copy())
    groups = torch_dsa_groups(b, SHAPE[0], SHAPE[1])

    def torch_elf():
        idx = torch.randperm(b)
        xb, fb, yb = xt[idx], ft[idx], yt[idx]
        img_ftr = front(torch_dsa(xb, DEFAULT_STRATEGY, groups))
        img_out = rear(img_ftr)
        ftr_out = rear(fb)
        loss = (F.cross_entropy(img_out, yb) + F.cross_entropy(img_ftr, fb)
                + F.cross_entropy(ftr_out, yb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    compile_elf = _first_calls(ours_elf, torch_elf)
    extra = {"front_shape": list(fshape[1:]), "torch_net": split}
    if "elf" in args.workloads:
        to, tt = _interleaved(ours_elf, torch_elf, args.steps, args.budget_s)
        out.append(_record(ctx, name, "elf", b, to, tt, compile_elf, extra))
    if "elf_epoch" in args.workloads:
        def ours_epoch():  # one engine epoch: epoch_plan, the step, _close_epoch
            st["state"], ms = _host_epochs(st["state"], memory_batches(data, (1, b, 0)), 1,
                                           step=step, protocol=protocol, plan=(1, b, 0), n=b)
            jax.block_until_ready((st["state"], ms))

        t = time.perf_counter()
        ours_epoch()
        compile_ep = time.perf_counter() - t
        to, tt = _interleaved(ours_epoch, torch_elf, args.steps, args.budget_s)
        out.append(_record(ctx, name, "elf_epoch", b, to, tt, compile_ep, extra))
    return out


def bench_dm(name, args, torch, ctx, ipc=10, batch_real=256, per_class=500):
    """The ``dm`` workload of the module docstring: one record."""
    import jax

    from bench_dsa import torch_dsa, torch_dsa_groups
    from elf_jax.augment import DEFAULT_STRATEGY
    from elf_jax.data.sampler import ClassIndex
    from elf_jax.distill import common as C
    from elf_jax.distill.dm import make_dm_step
    from elf_jax.models import get_model
    from torch_reference_nets import get_reference_network

    rng = np.random.default_rng(0)
    real = rng.normal(size=(NUM_CLASSES, per_class) + SHAPE).astype(np.float32)
    syn = rng.normal(size=(NUM_CLASSES * ipc,) + SHAPE).astype(np.float32)

    class Pool:  # the dataset view ClassIndex reads
        images = real.reshape((-1,) + SHAPE)
        labels = np.repeat(np.arange(NUM_CLASSES), per_class)
        num_classes = NUM_CLASSES

    pool = ClassIndex(Pool)
    step = make_dm_step(get_model(name, NUM_CLASSES), lr_img=1.0)
    st = {"state": C.init_state({"images": jax.numpy.asarray(syn)}, step.optimizer,
                                jax.random.key(0)), "i": 0}

    def ours_dm():
        key = jax.random.key(100 + st["i"])
        st["state"], m = step(st["state"], key, pool.sample_all_classes(key, batch_real))
        jax.block_until_ready((st["state"], m))
        st["i"] += 1

    real_t = torch.from_numpy(real.transpose(0, 1, 4, 2, 3).copy())
    syn_t = torch.from_numpy(syn.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    opt = torch.optim.SGD([syn_t], lr=1.0, momentum=0.5)
    groups_real = torch_dsa_groups(batch_real, SHAPE[0], SHAPE[1])
    groups_syn = torch_dsa_groups(ipc, SHAPE[0], SHAPE[1])

    def torch_dm():
        tnet = get_reference_network(name, SHAPE[2], NUM_CLASSES, SHAPE[:2]).train()
        for q in tnet.parameters():
            q.requires_grad = False
        loss = 0.0
        for c in range(NUM_CLASSES):
            img_real = real_t[c][torch.randperm(per_class)[:batch_real]]
            img_syn = syn_t[c * ipc:(c + 1) * ipc]
            seed = int(torch.randint(0, 100000, (1,)).item())
            torch.manual_seed(seed)
            out_real = tnet.features(torch_dsa(img_real, DEFAULT_STRATEGY, groups_real))
            torch.manual_seed(seed)
            out_syn = tnet.features(torch_dsa(img_syn, DEFAULT_STRATEGY, groups_syn))
            loss = loss + torch.sum((out_real.flatten(1).detach().mean(0)
                                     - out_syn.flatten(1).mean(0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    compile_s = _first_calls(ours_dm, torch_dm)
    to, tt = _interleaved(ours_dm, torch_dm, args.steps, args.budget_s)
    return _record(ctx, name, "dm", batch_real, to, tt, compile_s,
                   {"ipc": ipc, "classes": NUM_CLASSES, "real_per_class": batch_real})


def _first_calls(ours, theirs) -> float:
    """Ours' first (compiling) call and torch's warm-up call; the seconds of ours'."""
    t = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t
    theirs()
    return compile_s


def _interleaved(ours, theirs, steps, budget_s=0.0):
    """``steps`` timed (ours, theirs) pairs, fewer (but at least 3) where more would take
    longer than ``budget_s`` seconds in all (0: no limit)."""
    to, tt = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        if i >= 3 and budget_s and (time.perf_counter() - t0) * (i + 1) / i > budget_s:
            break
        t = time.perf_counter()
        ours()
        to.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs()
        tt.append(time.perf_counter() - t)
    return to, tt


def _record(ctx, name, workload, b, to, tt, compile_s, extra):
    mo, mt = 1e3 * statistics.median(to), 1e3 * statistics.median(tt)
    return {**ctx, "net": name, "workload": workload, "batch": b, "ms_ours": round(mo, 1),
            "ms_torch": round(mt, 1), "ratio": round(mo / mt, 2),
            "ms_ours_min": round(1e3 * min(to), 1), "ms_torch_min": round(1e3 * min(tt), 1),
            "steps": len(to), "compile_s_ours": round(compile_s, 1), **extra}


def _table(recs) -> str:
    rows = ["| net | workload | ours ms | PyTorch ms | ours/PyTorch | loss ours / torch |",
            "|---|---|---:|---:|---:|---|"]
    for r in recs:
        if r.get("ms_ours") is None:
            rows.append(f"| {r['net']} | {r['workload']} | - | - | - | {r.get('skipped', '')} |")
            continue
        chk = (f"{r['loss_ours']:.5f} / {r['loss_torch']:.5f}" if "loss_ours" in r else "")
        rows.append(f"| {r['net']} | {r['workload']} | {r['ms_ours']:,.0f} | "
                    f"{r['ms_torch']:,.0f} | {r['ratio']:.2f} | {chk} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default=DEFAULT_NETS)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median) per side")
    ap.add_argument("--workloads", default="plain,elf",
                    help="comma list of plain, elf, elf_epoch, dm (plain always runs: it "
                         "holds the numerics check)")
    ap.add_argument("--budget-s", type=float, default=40.0,
                    help="at most this many seconds of timed steps per (net, workload): slow "
                         "nets get fewer (>= 3) steps; 0 = always --steps")
    ap.add_argument("--json", default="", help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - {"plain", "elf", "elf_epoch", "dm"}
    if unknown:
        ap.error(f"--workloads: unknown {sorted(unknown)}")

    try:
        import torch
    except ImportError:
        print("bench_vs_torch: PyTorch is not installed (pip install 'elf_jax[torch]'); "
              "there is nothing to compare against.", file=sys.stderr)
        return 2
    for p in (str(HERE), str(HERE.parent / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import jax

    from elf_jax.models import list_models
    from torch_reference_nets import REFERENCE_NAMES

    nets = [s for s in args.nets.split(",") if s]
    ours = set(list_models())
    bad = [n for n in nets if n not in ours or n not in REFERENCE_NAMES]
    if bad:
        ap.error(f"--nets: {', '.join(bad)} not in both elf_jax.models and "
                 f"tests/torch_reference_nets.py")
    torch.set_num_threads(os.cpu_count())
    ctx = {"cpu": cpu_model(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
           "jax": jax.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    recs = []
    for name in nets:
        for rec in bench_net(name, args, torch, ctx):
            _emit(rec, args.json)
            recs.append(rec)
    if "dm" in args.workloads:
        rec = bench_dm("ConvNet", args, torch, ctx)
        _emit(rec, args.json)
        recs.append(rec)
    print(_table(recs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
