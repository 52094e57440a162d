"""The ELF pipeline as resumable stages over one workdir, driven by a config.

    teachers -> synthetic set -> feature banks -> cross-architecture evaluation -> report

Each stage reads what the earlier ones wrote and skips work already done, so re-running a
command after a kill continues where it stopped. Layout of `workdir`:

    teachers/<arch>/      trajectory (elf_jax.teacher format), one per teacher width
    synset/               the synthetic set (orbax, elf_jax.synset format)
    banks/<arch>/         feature bank of teacher <arch> on the synthetic set
    eval/<arch>/<mode>/   evaluation checkpoints (elf_jax.train.runner)
    results.json, results.md, results.png

Teachers: an evaluation network whose front outputs C channels gets the teacher
`config.teacher.arch` with width C (SPEC: ConvNet fronts are 4x4x128 and take a width-128
ConvNet teacher; ResNet18/VGG11 fronts are 4x4x512 and take ConvNetW512), unless
`config.teacher.override_arch` names one teacher for all.

Parallelism: an optional `config.parallel` section (`elf_jax.parallel.ParallelConfig`:
`parallel = "none" | "shard_map"`, mesh `runs` x `data`, ...) places the one training engine:
"none" (or no section) trains on one device; "shard_map" trains every step data parallel
on a `("runs", "data")` mesh (evaluation repeats side by side on `runs`; the teachers on
all devices, `runs` = 1), with the memory estimate of each evaluation printed and checked
first. Checkpoints, resume and results.json are the same either way (results.json adds a
`parallel` entry: mode, mesh, devices). Several processes: `config.distributed` (the CLI
calls `elf_jax.parallel.distributed.initialize` with it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from elf_jax import report as report_lib
from elf_jax.data import load
from elf_jax.models import front_shape, get_model

_log: Callable[[str], None] = print


def set_logger(fn: Callable[[str], None]) -> None:
    global _log
    _log = fn


def _model_overrides(config, arch: str) -> dict:
    """`config.eval.width` (demo only) shrinks ConvNet-family pool nets; dtype for all."""
    ovr: dict[str, Any] = {}
    width = int(config.eval.get("width", 0) or 0)
    if width and arch.startswith("ConvNet") and "W" not in arch[len("ConvNet"):]:
        ovr["width"] = width
    return ovr


def _teacher_model_kwargs(config) -> dict:
    return dict(config.teacher.get("model_kwargs", {}) or {})


def _with_width(base: str, channels: int) -> str:
    """`ConvNetW512` -> `ConvNetW<channels>`, `ConvNetD4W512` -> `ConvNetD4W<channels>`;
    width 128 is the registry's plain `ConvNet` / `ConvNetD4`."""
    family = "ConvNetD4" if base.startswith("ConvNetD4") else "ConvNet"
    return family if channels == 128 else f"{family}W{channels}"


def teacher_for(config, arch: str, image_shape, num_classes: int) -> str:
    """The teacher architecture whose feature fits `arch`'s front output."""
    if config.teacher.get("override_arch", ""):
        return config.teacher.override_arch
    net = get_model(arch, num_classes, **_model_overrides(config, arch))
    if not getattr(net, "has_split", False):
        raise ValueError(
            f"{arch} declares no ELF front/rear split (AlexNet, MLP and LeNet have none in "
            "the reference); remove it from config.eval.pool or evaluate it in mode 'task'.")
    channels = int(front_shape(net, tuple(image_shape))[-1])
    return _with_width(config.teacher.arch, channels)


def needed_teachers(config, image_shape, num_classes: int) -> dict[str, str]:
    """{pool arch: teacher arch} for every pool net whose modes need teacher features."""
    if all(m == "task" for m in config.eval.modes):
        return {}
    return {a: teacher_for(config, a, image_shape, num_classes) for a in config.eval.pool}


def _datasets(config):
    kw = dict(data_dir=config.data_dir or None, zca=bool(config.zca))
    return load(config.dataset, "train", **kw), load(config.dataset, "test", **kw)


# ------------------------------------------------------------------ stage 1: teachers
def stage_teachers(config, workdir) -> dict[str, str]:
    """Trains every needed teacher on the real training set (resumable)."""
    from elf_jax.teacher import train_teacher

    train, test = _datasets(config)
    mapping = needed_teachers(config, train.image_shape, train.num_classes)
    for teacher in sorted(set(mapping.values())):
        t = config.teacher
        _log(f"[teacher] {teacher} on {config.dataset}: {t.epochs} epochs "
             f"(ELF uses the snapshot after epoch {t.feature_epoch})")
        start = time.perf_counter()
        traj = train_teacher(
            teacher, train, epochs=int(t.epochs), workdir=Path(workdir) / "teachers" / teacher,
            lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
            batch_size=int(t.batch_size), dsa_strategy=t.dsa_strategy,
            lr_decay_at_half=bool(t.lr_decay), seed=int(config.seed), dtype=config.dtype,
            model_kwargs=_teacher_model_kwargs(config), test_dataset=test,
            parallel=_teacher_placement(config),
        )
        acc = _final_test_acc(traj)
        _log(f"[teacher] {teacher}: test accuracy {acc} ({time.perf_counter() - start:.0f} s)")
    return mapping


def _teacher_placement(config):
    """The evaluation's placement with one run: a teacher trains on all devices."""
    pc = parallel_config(config)
    return pc if pc.parallel == "none" else pc.replace(runs=1, data=0)


def _final_test_acc(traj) -> str:
    accs = getattr(traj, "test_accs", None)
    if accs:
        return f"{100 * float(accs[-1]):.2f}%"
    return "n/a"


# ------------------------------------------------------------------ stage 2: synthetic set
def _synset_dir(workdir) -> Path:
    return Path(workdir) / "synset"


def stage_synset(config, workdir):
    """Makes (or imports) the synthetic set once; later runs reuse the saved one."""
    from elf_jax.synset import load_synset, random_real_subset, save_synset

    path = _synset_dir(workdir)
    if path.exists():
        s = load_synset(path)
        _log(f"[synset] reusing {path} ({s.metadata.get('method')}, IPC {s.ipc})")
        return s
    source = config.synset.source
    train, _ = _datasets(config)
    if source == "real_random":
        s = random_real_subset(jax.random.PRNGKey(config.seed), train, int(config.synset.ipc))
    elif source == "import":
        s = import_synset(config.synset.path)
    elif source == "distill":
        from elf_jax.distill import distill_from_config

        _log(f"[synset] distilling with {config.synset.method.upper()} on {config.synset.arch}, "
             f"IPC {config.synset.ipc}, {config.synset.iterations} iterations")
        s = distill_from_config(config, Path(workdir) / "distill")
    else:
        raise ValueError(f"config.synset.source={source!r}: choose distill, import or real_random")
    save_synset(path, s)
    _log(f"[synset] {s.metadata.get('method')} set with {len(s.images)} images -> {path}")
    return s


def import_synset(path: str):
    """A synthetic set from our orbax dir, an .npz, or a reference repository's .pt folder."""
    from elf_jax.synset import from_npz, load_synset

    if not path:
        raise ValueError("config.synset.source='import' needs config.synset.path")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no synthetic set at {path}")
    if p.suffix == ".npz":
        return from_npz(p)
    if p.is_dir() and any(p.glob("images_*.pt")):
        from elf_jax.interop.torch import load_reference_synset

        return load_reference_synset(p)
    return load_synset(p)


# ------------------------------------------------------------------ stage 3: banks
def stage_features(config, workdir, synset=None) -> dict[str, Any]:
    """One feature bank per needed teacher, from its `feature_epoch` snapshot."""
    from elf_jax.elf.bank import build_bank, load_bank, save_bank
    from elf_jax.teacher import load_teacher

    synset = synset if synset is not None else stage_synset(config, workdir)
    mapping = needed_teachers(config, synset.image_shape, synset.num_classes)
    epoch = int(config.teacher.feature_epoch)
    layer = config.bank.layer or None
    banks = {}
    for teacher in sorted(set(mapping.values())):
        path = Path(workdir) / "banks" / teacher
        expect = {"teacher": teacher, "snapshot_epoch": epoch, "layer": layer or "front"}
        if path.exists():
            banks[teacher] = load_bank(path, expect_synset=synset, expect_teacher=expect)
            continue
        tdir = Path(workdir) / "teachers" / teacher
        if not tdir.exists():
            raise FileNotFoundError(
                f"teacher {teacher} has not been trained in {tdir}: run `elf-jax train-teacher` "
                "with the same config and workdir first")
        net, variables = load_teacher(tdir, epoch)
        bank = build_bank(net, variables, synset, teacher_name=teacher, snapshot_epoch=epoch,
                          layer=layer, batch_size=int(config.bank.batch_size))
        save_bank(path, bank)
        _log(f"[features] {teacher} epoch {epoch}: bank {bank.features.shape} -> {path}")
        banks[teacher] = bank
    return {arch: banks[t] for arch, t in mapping.items()}


# ------------------------------------------------------------------ stage 4: evaluation
def parallel_config(config):
    """The optional `config.parallel` section (a section or a mode string) as a
    `ParallelConfig`; absent: one device (`parallel="none"`)."""
    from elf_jax.parallel.mesh import ParallelConfig

    return ParallelConfig.from_config(config.get("parallel", None))


def _protocol(config):
    from elf_jax.train.protocol import EvalProtocol

    e = config.eval
    return EvalProtocol(
        lr=e.lr, momentum=e.momentum, weight_decay=e.weight_decay, batch_size=int(e.batch_size),
        epochs=int(e.epochs), dsa_strategy=e.dsa_strategy, kind=e.kind,
        lambda_front=e.lambda_front, lambda_rear=e.lambda_rear,
        use_learned_lr=bool(e.use_learned_lr), dtype=config.dtype,
    )


def stage_evaluate(config, workdir, synset=None, banks=None) -> dict:
    """Cross-architecture evaluation with and without ELF; writes results.json as it goes."""
    from elf_jax.elf.evaluate import cross_evaluate

    synset = synset if synset is not None else stage_synset(config, workdir)
    if banks is None and any(m != "task" for m in config.eval.modes):
        banks = stage_features(config, workdir, synset)
    _, test = _datasets(config)
    meta = {
        "dataset": config.dataset,
        "synset": {k: synset.metadata.get(k) for k in ("method", "ipc", "arch", "iteration")},
        "teachers": {a: b.metadata.get("teacher") for a, b in (banks or {}).items()},
        "feature_epoch": int(config.teacher.feature_epoch),
    }
    pc = parallel_config(config)
    partial: dict = {}

    def on_result(arch, mode, entry):
        partial.setdefault(arch, {})[mode] = entry
        _write_json(Path(workdir) / "results.json", {**meta, "results": partial, "partial": True})
        _log(f"[evaluate] {arch:<12} {mode:<16} {100 * entry['mean']:.2f} ± "
             f"{100 * entry['std']:.2f}  ({entry['seconds']:.0f} s, {entry['strategy']})")

    out = cross_evaluate(
        list(config.eval.pool), synset.images, synset.labels, test.images, test.labels,
        features=banks, modes=tuple(config.eval.modes), protocol=_protocol(config),
        repeats=int(config.eval.repeats), key=jax.random.PRNGKey(config.seed),
        workdir=Path(workdir) / "eval", num_classes=synset.num_classes,
        learned_lr=synset.lr, model_overrides=lambda a: _model_overrides(config, a),
        strategy=config.eval.repeat_strategy, checkpoint_every=int(config.eval.checkpoint_every),
        parallel=pc, on_result=on_result, log=_log)
    if pc.parallel != "none":
        from elf_jax.parallel import Placement

        pl = Placement.of(pc)
        meta["parallel"] = {"mode": pc.parallel, "mesh": [pl.n_runs, pl.n_data],
                            "devices": jax.device_count(), "processes": jax.process_count()}
    full = {**meta, **out}
    full.pop("summary", None)
    _write_json(Path(workdir) / "results.json", full)
    return full


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return str(x)


# ------------------------------------------------------------------ stage 5: report
def stage_report(config, workdir, results: Optional[dict] = None) -> dict[str, str]:
    """Prints the table and writes results.{json,md,png}."""
    results = results or report_lib.load_report(str(Path(workdir) / "results.json"))
    ipc = results.get("synset", {}).get("ipc")
    method = results.get("synset", {}).get("method")
    title = f"ELF on {results.get('dataset')} ({method}, IPC {ipc})"
    paths = report_lib.write_report(results, str(workdir), title)
    _log("\n" + title + "\n" + report_lib.text_table(report_lib.summarize(results["results"])))
    _log(f"\nwritten: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return paths


def run_all(config, workdir) -> dict[str, str]:
    """The whole pipeline: teachers, synthetic set, banks, evaluation, report."""
    start = time.perf_counter()
    stage_teachers(config, workdir)
    synset = stage_synset(config, workdir)
    banks = stage_features(config, workdir, synset)
    results = stage_evaluate(config, workdir, synset, banks)
    paths = stage_report(config, workdir, results)
    _log(f"done in {time.perf_counter() - start:.0f} s")
    return paths
