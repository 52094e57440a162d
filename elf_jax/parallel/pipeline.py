"""ELF end to end, data parallel: dataset -> synthetic set -> teacher -> bank -> evaluation.

``run_elf(cfg, *, data_dir=None, log=print) -> dict`` for configs with a ``parallel``
section (configs/imagenet64_shard_map.py): ``jax.distributed`` from the config/environment,
then

1. train and test splits of ``cfg.dataset`` (``elf_jax.data.load``);
2. the synthetic set: ``synset.source = "real_random"`` (``ipc`` real images per class) or
   ``"import"`` (``synset.path``, ``elf_jax.synset.load_synset``); distillation is not run
   here;
3. the teacher ``cfg.teacher.arch`` trained on the real training set with the evaluation
   protocol in ``task`` mode, data parallel, stopped after ``feature_epoch`` epochs of its
   ``epochs``-epoch schedule (the snapshot ELF uses);
4. the feature bank (``elf_jax.elf.bank.build_bank``);
5. for every architecture of ``eval.pool`` and every ``eval.modes`` entry: the memory
   estimate printed (ValueError if it will not fit), then
   ``elf_jax.parallel.loop.evaluate_parallel``.

Returns ``{"results": {arch: {mode: {accs, mean, std, steps_per_s, ...}}}, "bank": ...,
"teacher_acc": ...}``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.parallel.mesh import ParallelConfig, data_size, make_mesh, runs_size

__all__ = ["run_elf", "protocol_from"]


def protocol_from(sec, dtype: str, **over):
    from elf_jax.train.protocol import EvalProtocol

    kw = dict(lr=sec.lr, momentum=sec.momentum, weight_decay=sec.weight_decay,
              batch_size=int(sec.batch_size), epochs=int(sec.epochs),
              dsa_strategy=sec.dsa_strategy, dtype=dtype)
    if "lr_decay" in sec:
        kw["lr_decay"] = bool(sec.lr_decay)
    for k in ("kind", "lambda_front", "lambda_rear"):
        if k in sec:
            kw[k] = sec[k]
    kw.update(over)
    return EvalProtocol(**kw)


def _model(name, k, width=0, dtype="float32"):
    from elf_jax.models import get_model

    kw = {}
    if width:
        kw["width"] = int(width)
    if dtype != "float32":
        kw["dtype"] = dtype
    return get_model(name, k, **kw)


def run_elf(cfg, *, data_dir: Optional[str] = None, log: Optional[Callable] = print,
            device_bytes: Optional[int] = None) -> dict:
    from elf_jax.data import load
    from elf_jax.elf.bank import build_bank
    from elf_jax.elf.losses import mode_needs_features
    from elf_jax.parallel import distributed, memory
    from elf_jax.parallel.loop import evaluate_parallel, train_parallel
    from elf_jax.synset import load_synset, random_real_subset
    from elf_jax.teacher import test_accuracy as teacher_accuracy

    log = log or (lambda *_: None)
    if "distributed" in cfg:
        distributed.initialize(cfg.distributed)
    pc = ParallelConfig.from_config(cfg.parallel if "parallel" in cfg else None)
    mesh = make_mesh(pc.runs, pc.data) if pc.parallel == "shard_map" else None
    n_data = data_size(mesh) if mesh is not None else (jax.local_device_count() if pc.parallel == "pmap" else 1)
    n_runs = runs_size(mesh) if mesh is not None else 1
    dtype = cfg.get("dtype", "float32")
    ddir = data_dir or (cfg.data_dir or None)
    key = jax.random.PRNGKey(int(cfg.seed))
    k_syn, k_teacher, k_eval = jax.random.split(key, 3)

    train = load(cfg.dataset, "train", data_dir=ddir, zca=bool(cfg.zca))
    test = load(cfg.dataset, "test", data_dir=ddir, zca=bool(cfg.zca))
    K = train.num_classes
    log(f"[elf] {cfg.dataset}: {len(train)} train / {len(test)} test images, {K} classes; "
        f"parallel={pc.parallel}, mesh runs={n_runs} x data={n_data}, {jax.process_count()} process(es)")

    src = cfg.synset.source
    if src == "real_random":
        syn = random_real_subset(k_syn, train, int(cfg.synset.ipc))
    elif src == "import":
        syn = load_synset(cfg.synset.path)
    else:
        raise ValueError(f"synset.source={src!r}: this pipeline takes 'real_random' or 'import' "
                         "(distill the set first and import it)")
    syn_images = np.asarray(syn.images, np.float32)
    syn_labels = np.asarray(syn.labels)

    # teacher
    t_width = int(cfg.teacher.get("width", 0) or 0)
    t_net = _model(cfg.teacher.arch, K, t_width, dtype)
    t_proto = protocol_from(cfg.teacher, dtype, mode="task")
    stop = min(int(cfg.teacher.feature_epoch), t_proto.num_epochs)
    t_states, t_hist, t_info = train_parallel(
        t_net, t_proto, train.images, train.labels, repeats=n_runs if mesh is not None else 1,
        key=k_teacher, config=pc, mesh=mesh, max_epochs=stop)
    t_vars = {"params": jax.tree.map(lambda x: jnp.asarray(x[0]), t_states.params)}
    if t_states.batch_stats:
        t_vars["batch_stats"] = jax.tree.map(lambda x: jnp.asarray(x[0]), t_states.batch_stats)
    t_net1 = t_info["net"]
    t_acc = teacher_accuracy(t_net1, t_vars, test.images, test.labels)
    log(f"[elf] teacher {cfg.teacher.arch}: {stop} epochs, test acc {t_acc:.4f}, "
        f"{t_info['steps_per_s']:.2f} steps/s")

    bank = build_bank(t_net1, t_vars, syn, teacher_name=cfg.teacher.arch, snapshot_epoch=stop,
                      batch_size=int(cfg.bank.batch_size))
    feats = bank.features
    log(f"[elf] bank {feats.shape} stored as {pc.bank_dtype}")

    results = {}
    for arch in cfg.eval.pool:
        net = _model(arch, K, int(cfg.eval.get("width", 0) or 0), dtype)
        results[arch] = {}
        for mode in cfg.eval.modes:
            proto = protocol_from(cfg.eval, dtype, mode=mode)
            need_f = mode_needs_features(mode)
            if need_f:
                fshape = jax.eval_shape(
                    lambda: net.apply(net.init(jax.random.key(0), jnp.zeros((1,) + syn_images.shape[1:]),
                                               train=False),
                                      jnp.zeros((1,) + syn_images.shape[1:]), train=False,
                                      method=net.front)).shape[1:]
                if tuple(fshape) != tuple(feats.shape[1:]):
                    raise ValueError(
                        f"{arch}'s front gives {tuple(fshape)} but the teacher feature is "
                        f"{tuple(feats.shape[1:])}: pick a teacher whose front matches "
                        "(SPEC front/rear table) or an adapter")
            est = memory.estimate_for(
                net, proto, n_images=len(syn_images), image_shape=syn_images.shape[1:],
                num_classes=K, feature_shape=feats.shape[1:] if need_f else None, config=pc,
                repeats=int(cfg.eval.repeats), n_data=n_data, n_runs=n_runs,
                soft_labels=syn_labels.ndim == 2)
            log(f"[elf] {arch} {mode}\n{est}")
            memory.check_fits(est, device_bytes)
            out = evaluate_parallel(net, proto, syn_images, syn_labels, test.images, test.labels,
                                    feats if need_f else None, repeats=int(cfg.eval.repeats),
                                    key=k_eval, config=pc, mesh=mesh)
            out.pop("states", None)
            log(f"[elf] {arch} {mode}: acc {out['mean']:.4f} +- {out['std']:.4f} "
                f"({out['steps_per_s']:.2f} steps/s)")
            results[arch][mode] = out
    return {"results": results, "teacher_acc": t_acc, "bank_shape": tuple(feats.shape),
            "parallel": pc, "mesh": (n_runs, n_data)}


def main(argv=None):
    import argparse
    import runpy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data_dir", default=None)
    a = ap.parse_args(argv)
    cfg = runpy.run_path(a.config)["get_config"]()
    run_elf(cfg, data_dir=a.data_dir)


if __name__ == "__main__":
    main()
