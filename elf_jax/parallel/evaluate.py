"""Cross-architecture evaluation with data-parallel train steps: the ``parallel`` branch of the
pipeline's evaluation stage (``elf_jax.pipeline.stage_evaluate`` when ``config.parallel`` is
``"pmap"`` or ``"shard_map"``).

``cross_evaluate_parallel(pool, images, labels, test_images, test_labels, features, *, modes,
protocol, repeats, key, config, ...)`` takes the arguments of
``elf_jax.elf.evaluate.cross_evaluate`` (less ``strategy``/``chunk_epochs``/
``checkpoint_every``) plus the :class:`~elf_jax.parallel.mesh.ParallelConfig`, and returns the
same ``{"results": {arch: {mode: entry}}, ...}`` dict, ``entry`` holding ``accs``, ``mean``,
``std``, ``seconds``, ``strategy`` (the parallel mode and mesh), ``lr``, ``steps_per_s`` and
``final_train_loss`` (per repeat), and ``"parallel"``: the mode, mesh and device count.

Before any training, every (architecture, mode) is validated
(``elf_jax.elf.evaluate.validate_inputs``) and its memory estimate is printed and checked
(:mod:`elf_jax.parallel.memory`; ``ValueError`` if it will not fit). Each (architecture,
mode) is then trained by :func:`elf_jax.parallel.loop.evaluate_parallel` with the same key
for all (repeat ``r`` starts from ``fold_in(key, r)``, as on one device). Resume: a finished
(architecture, mode) is written to ``workdir/<arch>/<mode>/parallel_result.json`` with the
settings it ran with and reused when the same settings come again (no checkpoints inside a
run: an interrupted (architecture, mode) starts over).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from elf_jax.elf.evaluate import _host, resolve_pool, training_lr
from elf_jax.elf.losses import mode_needs_features
from elf_jax.parallel.mesh import ParallelConfig, data_size, make_mesh, runs_size

__all__ = ["cross_evaluate_parallel", "mesh_for"]

RESULT_FILE = "parallel_result.json"


def mesh_for(pc: ParallelConfig):
    """``(mesh or None, n_runs, n_data)`` of a parallel config on the devices JAX sees."""
    if pc.parallel == "shard_map":
        mesh = make_mesh(pc.runs, pc.data)
        return mesh, runs_size(mesh), data_size(mesh)
    if pc.parallel == "pmap":
        return None, 1, int(pc.data or jax.local_device_count())
    return None, 1, 1


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj, default=lambda x: np.asarray(x).tolist()))


def _reuse(path: Path, meta: dict) -> Optional[dict]:
    """The saved entry of a finished run with these settings (None if there is none)."""
    from elf_jax.checkpoint import check_expect

    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    check_expect(saved.get("meta", {}), meta,
                 where=f"{path} (use another workdir or delete it to start over)")
    return saved["entry"]


def _save(path: Path, meta: dict, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "entry": entry}, indent=2))
    os.replace(tmp, path)


def cross_evaluate_parallel(
    pool: Sequence[str],
    images,
    labels,
    test_images,
    test_labels,
    features=None,
    *,
    modes: Sequence[str],
    protocol,
    repeats: int = 5,
    key=None,
    config: Any = None,
    workdir=None,
    num_classes: Optional[int] = None,
    learned_lr: Optional[float] = None,
    model_overrides: Optional[Callable[[str], Mapping[str, Any]]] = None,
    on_result: Optional[Callable[[str, str, dict], None]] = None,
    log: Callable[[str], None] = print,
    device_bytes: Optional[int] = None,
) -> dict:
    """Every architecture of ``pool`` x every mode of ``modes``, data parallel (see the module
    docstring)."""
    from elf_jax.parallel import memory
    from elf_jax.parallel.loop import evaluate_parallel
    from elf_jax.train.runner import _fingerprint, _raw

    pc = config if isinstance(config, ParallelConfig) else ParallelConfig.from_config(config)
    mesh, n_runs, n_data = mesh_for(pc)
    key = jax.random.PRNGKey(0) if key is None else key
    images = np.asarray(_host(images, "synthetic images"), np.float32)
    labels = _host(labels, "synthetic labels")
    test_images, test_labels = _host(test_images, "test images"), _host(test_labels, "test labels")
    labels = labels.astype(np.int32 if labels.ndim == 1 else np.float32)
    k = int(num_classes) if num_classes else int(
        labels.shape[1] if labels.ndim == 2 else max(labels.max(), test_labels.max()) + 1)
    lr = training_lr(protocol, learned_lr)
    overrides = model_overrides or (lambda _arch: {})
    strategy = f"{pc.parallel} (runs={n_runs} x data={n_data})"

    # validate every run and check its memory BEFORE any training starts
    planned = []
    for arch, name, net, feats in resolve_pool(pool, modes, images, labels, test_images,
                                               test_labels, features, k, protocol, overrides):
        for mode in modes:
            f = feats if mode_needs_features(mode) else None
            est = memory.estimate_for(
                net, dataclasses.replace(protocol, mode=mode), n_images=len(images),
                image_shape=images.shape[1:], num_classes=k,
                feature_shape=None if f is None else f.shape[1:], config=pc, repeats=repeats,
                n_data=n_data, n_runs=n_runs, soft_labels=labels.ndim == 2)
            memory.check_fits(est, device_bytes)  # ValueError (with the estimate) if too big
            log(f"[evaluate] {name} {mode}, {strategy}: {est}")
            planned.append((arch, mode, net, f))

    results: dict = {}
    for arch, mode, net, f in planned:
        p = dataclasses.replace(protocol, mode=mode)
        meta = _json_roundtrip({
            "kind": "elf_jax.parallel_eval/1", "arch": arch, "mode": mode,
            "protocol": p.to_dict(), "repeats": int(repeats), "lr": lr,
            "key": np.asarray(_raw(key)).tolist(),
            "data": _fingerprint(images, labels, f), "parallel": dataclasses.asdict(pc),
            "mesh": [n_runs, n_data]})
        path = None if workdir is None else Path(workdir) / arch / mode / RESULT_FILE
        entry = None if path is None else _reuse(path, meta)
        if entry is not None:
            log(f"[evaluate] {arch} {mode}: reusing the finished run in {path}")
        else:
            out = evaluate_parallel(net, p, images, labels, test_images, test_labels, f,
                                    repeats=int(repeats), key=key, config=pc, mesh=mesh,
                                    hparams={"lr": lr})
            entry = {"accs": [float(a) for a in out["accs"]], "mean": out["mean"],
                     "std": out["std"], "seconds": out["seconds"], "strategy": strategy,
                     "lr": lr, "steps_per_s": out["steps_per_s"],
                     "final_train_loss": np.asarray(out["train_loss"])[:, -1].tolist()}
            if path is not None:
                _save(path, meta, entry)
        results.setdefault(arch, {})[mode] = entry
        if on_result is not None:
            on_result(arch, mode, entry)
    return {
        "results": results,
        "pool": list(pool),
        "modes": list(modes),
        "repeats": int(repeats),
        "num_classes": k,
        "protocol": protocol.to_dict(),
        "parallel": {"mode": pc.parallel, "mesh": [n_runs, n_data], "devices": jax.device_count(),
                     "processes": jax.process_count()},
    }
