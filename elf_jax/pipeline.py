"""The ELF pipeline as resumable stages over one workdir, driven by a config.

    teachers -> synthetic set -> feature banks -> cross-architecture evaluation -> report

Each stage reads what the earlier ones wrote and skips work already done, so re-running a
command after a kill continues where it stopped. A command loads each data split at most
once (`Run`). `features` and `evaluate` never start a long earlier stage: without a needed
teacher snapshot or a synthetic set they refuse, naming what to run first
(`check_prerequisites`); only an import or real_random set (seconds) is made on the way.
`all` runs every stage in order. Layout of `workdir`:

    teachers/<arch>/      trajectory (elf_jax.teacher format), one per teacher width
    distill/              distillation checkpoints; distill/synset_best is the set used
    synset/               an imported or real_random set (orbax, elf_jax.synset format)
    banks/<arch>/         feature bank of teacher <arch> on the synthetic set
    eval/<arch>/<mode>/   evaluation checkpoints (elf_jax.train.runner); repeats added
                          later in repeats_<first>-<end>/ (elf_jax.elf.evaluate.repeat_parts)
    results.json, results.md, results.png, results_synset.png (the set, one row per class)
    sweep/<arch>/         `elf-jax sweep`: checkpoints of the lambda grid and its baseline
    sweep.json, sweep.md, sweep.png

Teachers: an evaluation network whose front outputs C channels gets the teacher
`config.teacher.arch` with width C (docs/METHOD.md: ConvNet fronts are 4x4x128 and take a width-128
ConvNet teacher; ResNet18/VGG11 fronts are 4x4x512 and take ConvNetW512), unless
`config.teacher.override_arch` names one teacher for all. `config.teacher.reference_buffer`
(a reference `replay_buffer_<n>.pt`) replaces the trained teachers by one reference teacher
for the whole pool: nothing is trained and `banks/<arch>` is built from its snapshot.

Parallelism: the `config.parallel` section (`elf_jax.parallel.ParallelConfig`:
`parallel = "none" | "shard_map"`, mesh `runs` x `data`, ...) places the one training engine:
"none" (or no section) trains on one device; "shard_map" trains every step data parallel
on a `("runs", "data")` mesh (evaluation repeats side by side on `runs`; the teachers on
all devices, `runs` = 1), with the memory estimate of each evaluation printed and checked
first. Checkpoints, resume and results.json are the same either way (results.json adds a
`parallel` entry: mode, mesh, devices). Several processes: `config.distributed` (the CLI
calls `elf_jax.parallel.distributed.initialize` with it).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from elf_jax import report as report_lib
from elf_jax.checkpoint import write_json_atomic
from elf_jax.config import check_config
from elf_jax.data import resolve_info
from elf_jax.data.stream import STREAM_ABOVE_GB, float32_gb, images_of, is_streamed, open_split
from elf_jax.data.validation import HeldOut, hold_out, validation_settings
from elf_jax.models import front_shape, get_model, list_models
from elf_jax.parallel.mesh import ParallelConfig

_log: Callable[[str], None] = print


def set_logger(fn: Callable[[str], None]) -> None:
    global _log
    _log = fn


def _info(config, stats: str = "dc"):
    """The config's dataset facts (`elf_jax.data.resolve_info`; a `tfds:` dataset from the
    config's data_dir)."""
    return resolve_info(config.dataset, stats=stats, data_dir=config.get("data_dir") or None)


def _model_overrides(config, arch: str) -> dict:
    """A pool net's `get_model` overrides: `config.eval.width` (demo only) sets the width of
    ConvNet-family nets, `config.eval.model_kwargs[arch]` anything else, and bn_chunks."""
    ovr: dict[str, Any] = {}
    width = int(config.eval.get("width", 0) or 0)
    if width and arch.startswith("ConvNet") and "W" not in arch[len("ConvNet"):]:
        ovr["width"] = width
    ovr.update(_bn_chunks(config.eval))
    ovr.update(dict((config.eval.get("model_kwargs", {}) or {}).get(arch, {}) or {}))
    return ovr


def _bn_chunks(section) -> dict:
    """`{"bn_chunks": n}` when a config section asks for ghost BatchNorm, else `{}` (so that
    whole-batch teachers and requests read as they did before the option existed)."""
    n = int(section.get("bn_chunks", 1) or 1)
    return {"bn_chunks": n} if n > 1 else {}


def _with_width(base: str, channels: int) -> str:
    """`ConvNetW512` -> `ConvNetW<channels>`, `ConvNetD4W512` -> `ConvNetD4W<channels>`;
    width 128 is the registry's plain `ConvNet` / `ConvNetD4`."""
    family = "ConvNetD4" if base.startswith("ConvNetD4") else "ConvNet"
    return family if channels == 128 else f"{family}W{channels}"


def _reference_buffer(config) -> Optional[Path]:
    """`teacher.reference_buffer` as an absolute path, or None when the teacher is trained
    here."""
    path = config.teacher.get("reference_buffer", "") or ""
    return Path(path).absolute() if path else None


def _exact_teacher(config, arch: str, image_shape, num_classes: int) -> Optional[str]:
    """The teacher of `config.teacher.arch`'s family at the width of `arch`'s front output,
    if one is registered and its feature has exactly the front's shape; else None."""
    net = get_model(arch, num_classes, **_model_overrides(config, arch))
    if not getattr(net, "has_split", False):
        raise ValueError(
            f"{arch} declares no ELF front/rear split; remove it from config.eval.pool or "
            "evaluate it in mode 'task'.")
    front = front_shape(net, tuple(image_shape))[1:]
    teacher = _with_width(config.teacher.arch, int(front[-1]))
    if teacher not in list_models():
        return None
    kwargs = dict(config.teacher.get("model_kwargs", {}) or {})
    fits = front_shape(get_model(teacher, num_classes, **kwargs), tuple(image_shape))[1:] == front
    return teacher if fits else None


def teacher_for(config, arch: str, image_shape, num_classes: int) -> str:
    """The teacher whose features `arch` learns from: `teacher.override_arch` if set; else
    the teacher whose feature has exactly `arch`'s front shape (the width rule); else, with
    `eval.adapter = "auto"`, the distillation network's teacher, reached through a learned
    adapter (`elf_jax.models.adapter`). A reference teacher buffer
    (`teacher.reference_buffer`) is one teacher for the whole pool, as the reference."""
    if config.teacher.get("override_arch", ""):
        return config.teacher.override_arch
    if _reference_buffer(config):
        return config.teacher.arch
    exact = _exact_teacher(config, arch, image_shape, num_classes)
    if exact is not None:
        return exact
    if config.eval.adapter == "off":
        raise ValueError(
            f"no registered {config.teacher.arch}-family teacher has the feature shape of "
            f"{arch}'s front; set eval.adapter=auto (a learned adapter), set "
            "teacher.override_arch, or evaluate it in mode 'task'")
    shared = _exact_teacher(config, config.synset.arch, image_shape, num_classes)
    return shared or config.teacher.arch


#: What the validation split held out (elf_jax.data.validation.hold_out's record).
VALIDATION_RECORD = "validation.json"


class Run:
    """One command over `workdir`: the config and what its stages share, each made once and
    only when a stage asks for it (`elf-jax report` loads no data)."""

    def __init__(self, config, workdir):
        check_config(config)  # bad settings fail here, before any stage runs
        _protocol(config)
        self.config = config
        self.workdir = Path(workdir)

    def _load(self, split: str):
        """A real split, in memory or streamed from its files (`config.data_mode`)."""
        c = self.config
        limit = float(c.get("stream_above_gb", STREAM_ABOVE_GB))
        ds = open_split(c.dataset, split, mode=c.get("data_mode", "auto"), stream_above_gb=limit,
                        data_dir=c.data_dir or None, zca=bool(c.zca), stats=_stats(c))
        if is_streamed(ds):
            _log(f"[data] {ds.name} {split}: streamed from its files ({len(ds):,} images, "
                 f"{float32_gb(ds.info, len(ds)):.2f} GB as float32; data_mode="
                 f"{c.get('data_mode', 'auto')}, stream_above_gb={limit:g})")
        return ds

    @functools.cached_property
    def _held_out(self) -> HeldOut:
        """The training split cut into what trains and what chooses (`config.validation`)."""
        fraction, seed = validation_settings(self.config)
        held = hold_out(self._load("train"), fraction, seed)
        if held.validation is not None:
            r = held.record
            _log(f"[data] validation: {r['size']:,} training images held out to choose on "
                 f"({fraction:g} of each class, seed {seed}; {r['train_size']:,} train)")
        if self.workdir.is_dir():  # for the report's provenance (`elf-jax report` loads no data)
            write_json_atomic(self.workdir / VALIDATION_RECORD, held.record)
        return held

    train = functools.cached_property(lambda self: self._held_out.train)
    test = functools.cached_property(lambda self: self._load("test"))

    @property
    def chooser(self):
        """The split every choice reads: the validation split, or the test split when none
        is held out (`validation.fraction = 0`, the reference's way)."""
        held = self._held_out
        return held.validation if held.validation is not None else self.test

    @functools.cached_property
    def teachers(self) -> dict[str, str]:
        """{pool arch: teacher arch} for every pool net whose modes need teacher features
        (the image shape comes from the dataset registry: no data loaded)."""
        c, info = self.config, _info(self.config)
        if all(m == "task" for m in c.eval.modes):
            return {}
        return {a: teacher_for(c, a, info.image_shape, info.num_classes) for a in c.eval.pool}


# ------------------------------------------------------------------ prerequisites
def check_prerequisites(run: Run, command: str, removing=()) -> None:
    """Refuses (`FileNotFoundError`, one line naming what to run first) to start `command`
    when an expensive earlier stage has not run: a needed teacher lacks the `feature_epoch`
    snapshot (and its bank does not exist yet), or there is no synthetic set and the
    config's source is `distill` (import and real_random sets are made on the way); and
    (`ValueError`) when a teacher in the workdir was trained with other settings than the
    config's (`check_teacher_settings`), before any set or bank is made.
    `removing`: workdir entries (`banks`, `distill`, ...) to judge as already removed (what
    `--overwrite` is about to remove)."""
    wd, epoch = run.workdir, int(run.config.teacher.feature_epoch)
    args = f"--config ... --workdir {wd}"
    todo = []
    if "teachers" not in removing and _reference_buffer(run.config) is None:
        for t in sorted(set(run.teachers.values())):  # before any set or bank is made
            if (wd / "teachers" / t / "trajectory.json").is_file():  # elf_jax.teacher's manifest
                check_teacher_settings(run, t)

    def present(rel: str, is_dir: bool = False) -> bool:
        path = wd / rel
        return rel.split("/")[0] not in removing and (path.is_dir() if is_dir else path.exists())

    # elf_jax.teacher's layout; orbax renames a step directory into place once complete
    snapshot = f"expert_000/trajectory/{epoch}"
    untrained = sorted(t for t in set(run.teachers.values()) if not present(f"banks/{t}")
                       and not present(f"teachers/{t}/{snapshot}", is_dir=True))
    ref = _reference_buffer(run.config)
    if ref is not None:  # the teacher is the reference's buffer, not one trained here
        untrained = []
        if run.teachers and not ref.is_file():
            raise FileNotFoundError(f"config.teacher.reference_buffer: {ref} does not exist; "
                                    "give the reference's replay_buffer_<n>.pt of the feature "
                                    "model (ELF_buffer.sh), or '' to train the teacher here")
    if untrained:
        todo.append(f"no teacher {', '.join(untrained)} with the epoch-{epoch} snapshot in "
                    f"{wd / 'teachers'}: run `elf-jax train-teacher {args}` first")
    if run.config.synset.source == "distill" and not present("distill/synset_best"):
        todo.append(f"no synthetic set in {wd} (config.synset.source='distill'): run "
                    f"`elf-jax distill {args}` first")
    if todo:
        raise FileNotFoundError(f"{command} needs earlier stages: {'; '.join(todo)} "
                                "(or `elf-jax all`)")


# ------------------------------------------------------------------ --overwrite
# What each stage writes in the workdir, and the stages computed from it (removed with it:
# they would be stale).
STAGE_PATHS = {"teacher": ("teachers", "tb/teacher"), "synset": ("distill", "synset", "tb/distill"),
               "features": ("banks",),
               "evaluate": ("eval", "results.json", "results.md", "results.png",
                            "results_synset.png", "tb/evaluate", "reference",
                            "tb/evaluate_random", "tb/evaluate_full"),
               "sweep": ("sweep", "sweep.json", "sweep.md", "sweep.png")}
DOWNSTREAM = {"teacher": ("features", "evaluate", "sweep"),
              "synset": ("features", "evaluate", "sweep"),
              "features": ("evaluate", "sweep"), "evaluate": (), "sweep": ()}
# The stages each command computes (and so may be asked to recompute).
COMMAND_STAGES = {"train-teacher": ("teacher",), "distill": ("synset",),
                  "features": ("synset", "features"),
                  "evaluate": ("synset", "features", "evaluate"), "report": (),
                  "sweep": ("synset", "features", "sweep"),
                  "all": ("teacher", "synset", "features", "evaluate"),
                  "demo": ("teacher", "synset", "features", "evaluate")}


def _recomputable(run: Run, command: str) -> tuple:
    """The stages `command` computes with this config: `features`, `evaluate` and `sweep`
    make an imported or random-real set themselves, but never distill one (they stop and
    name `elf-jax distill`), so with `synset.source='distill'` the synset is not theirs."""
    stages = COMMAND_STAGES.get(command, tuple(STAGE_PATHS))
    if run.config.synset.source == "distill" and command in ("features", "evaluate", "sweep"):
        stages = tuple(s for s in stages if s != "synset")
    return stages


def overwrite(run: Run, stages, command: str) -> list[Path]:
    """Removes what `stages` (and the stages computed from them) wrote in the workdir, so
    `command` computes them again; logs every removed path. Every stage is checked before
    anything is removed: `ValueError` for a stage the command does not compute here (it
    would only delete it)."""
    import shutil

    allowed = _recomputable(run, command)
    for stage in stages:
        if stage not in STAGE_PATHS:
            raise ValueError(f"--overwrite={stage}: choose from {', '.join(STAGE_PATHS)}")
        if stage not in allowed:
            hint = "`elf-jax all`"
            if stage == "synset" and run.config.synset.source == "distill":
                hint = "`elf-jax distill` or `elf-jax all` (config.synset.source='distill')"
            raise ValueError(f"--overwrite={stage}: `elf-jax {command}` does not compute the "
                             f"{stage} stage (it computes: {', '.join(allowed) or 'nothing'}); "
                             f"nothing was removed; use {hint}")
    # (workdir entry, its stage, the --overwrite stage that removes it)
    targets = [(rel, name, stage) for stage in stages for name in (stage,) + DOWNSTREAM[stage]
               for rel in STAGE_PATHS[name]]
    if command in ("features", "evaluate", "sweep"):  # would it stop once they are gone?
        try:
            check_prerequisites(run, command, removing={rel for rel, _, _ in targets})
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; --overwrite={','.join(stages)}: nothing was "
                                    "removed") from None
    removed = []
    for rel, name, stage in targets:
        path = run.workdir / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
        _log(f"[overwrite] removed {path} ({name} stage; --overwrite={stage})")
    return removed


def curves_for(run: Run, stage: str):
    """The stage's curve writer (`elf_jax.metrics.Curves`): `<workdir>/tb/<stage>/`, or a
    no-op with `config.log.tensorboard = False`."""
    from elf_jax.metrics import Curves

    on = bool((run.config.get("log", None) or {}).get("tensorboard", True))
    return Curves(run.workdir / "tb" / stage if on else None)


# ------------------------------------------------------------------ stage 1: teachers
def stage_teachers(run: Run) -> dict[str, str]:
    """Trains every needed teacher on the real training set (resumable)."""
    config, t = run.config, run.config.teacher
    if _reference_buffer(config) is not None and run.teachers:
        _log(f"[teacher] none to train: the bank comes from the reference buffer "
             f"{_reference_buffer(config)} (teacher.reference_buffer)")
        return run.teachers
    curves = curves_for(run, "teacher")
    try:
        _train_teachers(run, curves)
    finally:
        curves.close()
    return run.teachers


def _train_teachers(run: Run, curves) -> None:
    from elf_jax.teacher import train_teacher

    config, t = run.config, run.config.teacher
    for teacher in sorted(set(run.teachers.values())):
        _log(f"[teacher] {teacher} on {config.dataset}: {t.epochs} epochs "
             f"(ELF uses the snapshot after epoch {t.feature_epoch})")
        start = time.perf_counter()
        traj = train_teacher(
            teacher, run.train, epochs=int(t.epochs), workdir=run.workdir / "teachers" / teacher,
            lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
            batch_size=int(t.batch_size), dsa_strategy=t.dsa_strategy,
            lr_decay_at_half=bool(t.lr_decay), seed=int(config.seed), dtype=config.dtype,
            model_kwargs={**dict(t.get("model_kwargs", {}) or {}), **_bn_chunks(t)},
            test_dataset=run.test, held_out=_held_out_settings(config),
            parallel=_teacher_placement(config),
            callback=_teacher_epochs(teacher, int(t.epochs), curves),
        )
        _log(f"[teacher] {teacher}: test accuracy {100 * traj.test_acc[-1]:.2f}% "
             f"({time.perf_counter() - start:.0f} s)")


def _teacher_epochs(name: str, epochs: int, curves):
    """The teacher's per-epoch hook: its curves, and a log line that stays every tenth of the
    training (epoch, loss, accuracy, lr, time left) where the progress bar vanishes."""
    start, every = time.perf_counter(), max(1, epochs // 10)
    first: dict = {}

    def callback(expert, done, m):
        curves.write(name, done - 1, {"train/loss": m["train_loss"], "train/acc": m["train_acc"],
                                      "train/lr": m["lr"], "test/acc": m.get("test_acc")})
        first.setdefault("epoch", done - 1)  # a resumed run starts later
        if done % every == 0 or done == epochs:
            rate = (time.perf_counter() - start) / max(done - first["epoch"], 1)
            _log(f"[teacher] {name} epoch {done}/{epochs}: loss {m['train_loss']:.4f}, train "
                 f"accuracy {100 * m['train_acc']:.2f}%, lr {m['lr']:g}, "
                 f"~{rate * (epochs - done) / 60:.1f} min left")

    return callback


def _teacher_placement(config):
    """The evaluation's placement with one run: a teacher trains on all devices."""
    pc = ParallelConfig.from_config(config.get("parallel", None))
    return pc if pc.parallel == "none" else pc.replace(runs=1, data=0)


# ------------------------------------------------------------------ stage 2: synthetic set
def _request(config, source: Optional[str] = None, ipc: Optional[int] = None) -> dict:
    """What the config asks of the synthetic-set stage (stored with a made or imported set);
    `source`/`ipc`: another set's (a reference set of `stage_reference`)."""
    s = config.synset
    source = source or s.source
    want = {"source": source, "dataset": config.dataset, "zca": bool(config.zca)}
    if _stats(config) != "dc":  # recorded only when set (requests made before read the same)
        want["stats"] = _stats(config)
    if source == "real_random":  # drawn from the training images the validation split left
        want.update(ipc=int(s.ipc if ipc is None else ipc), seed=int(config.seed),
                    validation=_held_out_settings(config))
    elif source == "import":
        want["path"] = str(Path(s.path).absolute()) if s.path else ""
    return want


def stage_synset(run: Run):
    """The synthetic set the config asks for. A distillation resumes (or reuses) its run in
    `distill/`, which refuses other settings; an import is read again and replaces the saved
    set when its content differs; a random real subset is reused when its settings match.
    Every replacement is logged."""
    from elf_jax.synset import load_synset

    config, saved = run.config, run.workdir / "synset"
    source, want = config.synset.source, _request(config)
    if source == "distill":
        if saved.exists():
            raise ValueError(
                f"{saved} holds a set made with {load_synset(saved).metadata.get('request')}, "
                "but the config asks to distill: delete it or use another workdir")
        from elf_jax.distill import distill_from_config

        _log(f"[synset] {config.synset.method.upper()} on {config.synset.arch}, IPC "
             f"{config.synset.ipc}, {config.synset.iterations} iterations (a run in "
             f"{run.workdir / 'distill'} with these settings is resumed or reused)")
        evaluates = int(config.synset.get("eval_every", 0) or 0) > 0
        curves, method = curves_for(run, "distill"), config.synset.method
        try:
            s = distill_from_config(
                config, run.workdir / "distill", train=run.train,
                choose_on=run.chooser if evaluates else None,
                callback=lambda it, m: curves.write(method, it, {"distill/loss": float(m["loss"])}))
            for h in s.metadata.get("history") or []:  # the evaluations of the set
                curves.write(method, int(h["iteration"]), {"distill/eval_acc": h.get("acc")})
        finally:
            curves.close()
        return s
    if source == "real_random":
        return _random_subset(run, saved, int(config.synset.ipc))
    old = load_synset(saved) if saved.exists() else None
    if source == "import":
        s = _import(config)
    else:
        raise ValueError(f"config.synset.source={source!r}: choose distill, import or real_random")
    s = s.replace(metadata={"request": want})
    if old is not None and _same_set(old, s):
        _log(f"[synset] reusing {saved}: the import is unchanged")
        return old
    return _save_set(saved, old, s)


def _save_set(saved: Path, old, s):
    """Saves the set `s` at `saved`, logging what it replaces (`old`, None for nothing)."""
    from elf_jax.synset import save_synset

    if old is not None:
        _log(f"[synset] replacing {saved} (made for {old.metadata.get('request')}) with the set "
             f"the config asks for ({s.metadata.get('request')})")
    save_synset(saved, s)
    _log(f"[synset] {s.metadata.get('method')} set with {len(s.images)} images -> {saved}")
    return s


def _random_subset(run: Run, saved: Path, ipc: int):
    """`ipc` random real training images per class, saved at `saved`; the saved one is
    reused when it was drawn for the same request (dataset, ipc, seed, validation split)."""
    from elf_jax.synset import load_synset, random_real_subset

    want = _request(run.config, "real_random", ipc)
    old = load_synset(saved) if saved.exists() else None
    if old is not None and old.metadata.get("request") == want:
        _log(f"[synset] reusing {saved} ({old.metadata.get('method')}, IPC {old.ipc})")
        return old
    s = random_real_subset(jax.random.PRNGKey(run.config.seed), run.train, ipc)
    return _save_set(saved, old, s.replace(metadata={"request": want}))


def _same_set(old, new) -> bool:
    """Whether the saved set `old` is `new` in all it carries: pixels and labels (the
    content hash, which banks and evaluations are keyed by), the learned lr, the request
    (source and path) and the normalization record (a .pt folder's learned lr and path are
    not lost because an .npz of the same pixels was imported before)."""
    keys = ("request", "normalization", "normalization_from", "method")
    return (old.content_hash() == new.content_hash() and old.lr == new.lr
            and all(old.metadata.get(k) == new.metadata.get(k) for k in keys))


def check_learned_lr(config, synset) -> None:
    """Refuses `eval.use_learned_lr` with a set that has no learned lr (before any training:
    it used to train with eval.lr and record `use_learned_lr True`)."""
    from elf_jax.train.protocol import NO_LEARNED_LR

    if config.eval.use_learned_lr and synset.lr is None:
        raise ValueError(NO_LEARNED_LR)


def _stats(config) -> str:
    return config.get("stats", "dc") or "dc"


# `synset.import_stats` values for raw pixels: images in [0, 1] or in [0, 255].
PIXEL_SPACES = {"pixels": 1.0, "pixels255": 1.0 / 255.0}


def run_normalization(config, stats: Optional[str] = None) -> dict:
    """The space this config's data live in (`elf_jax.synset` normalization record), from
    the dataset registry: mean/std of `stats` (default `config.stats`), or with `zca` the
    whitened [0, 1] pixels (mean 0, std 1), as `elf_jax.data.load` makes them. `stats`
    "pixels" / "pixels255" name raw pixels in [0, 1] / [0, 255] (mean 0, std 1 / 1/255)."""
    from elf_jax.synset import normalization_record

    if stats in PIXEL_SPACES:
        channels = _info(config).image_shape[-1]
        return normalization_record([0.0] * channels, [PIXEL_SPACES[stats]] * channels, False)
    info = _info(config, stats=stats or _stats(config))
    if config.zca:
        return normalization_record([0.0] * len(info.mean), [1.0] * len(info.std), True)
    return normalization_record(info.mean, info.std, False)


def _import(config):
    """The imported set, checked against the dataset and brought into the run's
    normalization (`conform_normalization`: converted, or refused naming both spaces)."""
    from elf_jax.synset import conform_normalization

    path = config.synset.path
    s = check_import(import_synset(path), _info(config, stats=_stats(config)), path)
    named = config.synset.get("import_stats", "") or ""
    if named:
        assumed, why = run_normalization(config, named), f"config.synset.import_stats={named!r}"
    elif _is_reference_folder(Path(path)):
        assumed = run_normalization(config, "mtt")
        why = ("a reference .pt set: the reference's ELF evaluation reads every set in its "
               "utils.py normalization (stats 'mtt'); set config.synset.import_stats if not")
    else:
        assumed, why = None, "this run's; set config.synset.import_stats to name another"
    target = run_normalization(config)
    s = conform_normalization(s, target, where=f"the imported set {path}", assumed=assumed,
                              assumed_why=why, log=_log)
    return check_pixel_range(s, target, f"the imported set {path}", config.dataset)


def check_pixel_range(s, space: dict, where: str, dataset: str):
    """`s` (in the normalized `space`) when its pixels are where normalized images of
    `dataset` can be; else a one-line `ValueError`: no pixel below zero (raw [0, 1] or
    [0, 255] pixels: every dataset's normalized black is negative), or values farther
    outside the normalized range [(0 - mean) / std, (1 - mean) / std] than its own width
    (raw 0..255 pixels, another scaling). Distilled sets leave that range (their pixels are
    optimized unclipped), but not by more than its width. ZCA-whitened spaces have no such
    range and are not checked."""
    if space.get("zca"):
        return s
    mean, std = np.asarray(space["mean"]), np.asarray(space["std"])
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    images = np.asarray(s.images)
    lo, hi = float(images.min()), float(images.max())
    declare = ("set config.synset.import_stats to the space it is in (pixels: [0, 1], "
               "pixels255: [0, 255], dc or mtt: a normalization) to have it converted")
    if lo >= 0 and np.all(low < 0):
        raise ValueError(f"{where} has no pixel below 0 (values in [{lo:.3g}, {hi:.3g}]) but "
                         f"{dataset}'s normalized images go down to {low.min():.3g} (black): it "
                         f"looks like raw pixels, not normalized ones; {declare}")
    width = high - low
    per_channel = images.reshape(-1, images.shape[-1])
    c_lo, c_hi = per_channel.min(0), per_channel.max(0)
    outside = (c_lo < low - width) | (c_hi > high + width)
    if np.any(outside):
        c = int(np.argmax(outside))
        raise ValueError(f"{where} has channel-{c} values in [{c_lo[c]:.3g}, {c_hi[c]:.3g}], far "
                         f"outside {dataset}'s normalized range [{low[c]:.3g}, {high[c]:.3g}] "
                         f"(more than its width beyond it): unnormalized or scaled pixels?; "
                         f"{declare}")
    return s


def _is_reference_folder(p: Path) -> bool:
    return p.is_dir() and any(p.glob("images_*.pt"))


def check_import(s, info, path):
    """The imported set `s` with the dataset's class count (never inferred from its labels),
    or a `ValueError` (one line, what to do) when it does not fit the dataset it will be
    evaluated on: image shape, labels out of range or leaving a class empty, soft labels
    that are not probabilities (pixels: `check_pixel_range`, once in the run's space)."""
    where = f"the imported set {path}"
    if tuple(s.image_shape) != tuple(info.image_shape):
        h, w, c = info.image_shape
        nchw = tuple(s.image_shape) == (c, h, w)
        raise ValueError(f"{where} has images {tuple(s.image_shape)} but {info.name} has "
                         f"{tuple(info.image_shape)} (NHWC); " + (
                             "it looks NCHW (PyTorch's layout): store images.transpose(0, 2, 3, 1)"
                             if nchw else "resize or pick the right dataset"))
    labels = np.asarray(s.labels)
    if labels.ndim == 1 and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(f"{where} has labels in [{labels.min()}, {labels.max()}] but {info.name} "
                         f"has {info.num_classes} classes (0..{info.num_classes - 1}); fix the labels")
    if labels.ndim == 2:
        if labels.shape[1] != info.num_classes:
            raise ValueError(f"{where} has soft labels over {labels.shape[1]} classes but "
                             f"{info.name} has {info.num_classes}")
        if labels.min() < 0 or not np.allclose(labels.sum(-1), 1.0, atol=1e-3):
            raise ValueError(f"{where} has soft labels that are not probabilities (negative, or "
                             "rows not summing to 1): logits? store softmax(logits) instead")
    if labels.ndim == 1:
        empty = np.flatnonzero(np.bincount(labels, minlength=info.num_classes) == 0)
        if empty.size:
            raise ValueError(f"{where} has no image of class{'es' if empty.size > 1 else ''} "
                             f"{', '.join(map(str, empty[:10]))}{' ...' if empty.size > 10 else ''} "
                             f"of {info.name}'s {info.num_classes}: a set must cover every "
                             "class (check the labels and their encoding)")
    return s.replace(num_classes=info.num_classes)


def import_synset(path: str):
    """A synthetic set from our orbax dir, an .npz, or a reference repository's .pt folder."""
    from elf_jax.checkpoint import is_tree_dir
    from elf_jax.synset import from_npz, load_synset

    if not path:
        raise ValueError("config.synset.source='import' needs config.synset.path")
    p = Path(path)  # a missing path: FileNotFoundError from the loader
    if p.suffix == ".npz":
        return from_npz(p)
    if _is_reference_folder(p):
        from elf_jax.interop.torch import load_reference_synset

        return load_reference_synset(p)
    if p.is_dir() and not is_tree_dir(p):  # not a damaged set of ours: not one at all
        raise ValueError(f"config.synset.path={path}: this directory holds no synthetic set to "
                         "import: give an elf_jax set directory (save_synset), a reference "
                         "folder with images_<suffix>.pt and labels_<suffix>.pt, or an .npz")
    return load_synset(p)


# ------------------------------------------------------------------ stage 3: banks
def stage_features(run: Run, synset=None, banks_dir: Optional[Path] = None) -> dict[str, Any]:
    """One feature bank per needed teacher, from its `feature_epoch` snapshot. A saved bank
    is reused only when it was built from this synthetic set and these teacher weights
    (content hashes); otherwise it is rebuilt, and the log says why. Without `synset` (the
    `features` command) the prerequisites are checked first. `banks_dir`: where the banks
    live (default `<workdir>/banks`; the random reference keeps its own)."""
    from elf_jax.elf.bank import build_bank, save_bank
    from elf_jax.teacher import load_teacher

    if synset is None:
        check_prerequisites(run, "features")
        synset = stage_synset(run)
    epoch = int(run.config.teacher.feature_epoch)
    layer = run.config.bank.layer or None
    banks = {}
    for teacher in sorted(set(run.teachers.values())):
        path = (banks_dir or run.workdir / "banks") / teacher
        if _reference_buffer(run.config) is not None:
            banks[teacher] = _reference_bank(run, path, synset, teacher, epoch, layer)
            continue
        tdir = run.workdir / "teachers" / teacher
        if tdir.exists():
            check_teacher_settings(run, teacher)
        net, variables = load_teacher(tdir, epoch) if tdir.exists() else (None, None)
        bank = _saved_bank(path, synset, teacher, epoch, layer, variables)
        bank = _with_logits(run, bank, path, net)
        if bank is not None:
            banks[teacher] = bank
            continue
        bank = build_bank(net, variables, synset, teacher_name=teacher, snapshot_epoch=epoch,
                          layer=layer, batch_size=int(run.config.bank.batch_size))
        save_bank(path, bank)
        _log(f"[features] {teacher} epoch {epoch}: bank {bank.features.shape} -> {path}")
        banks[teacher] = bank
    return {arch: banks[t] for arch, t in run.teachers.items()}


def _teacher_settings(config) -> dict:
    """{trajectory manifest key: (the config's value, its config field)} of what a teacher
    trained by `stage_teachers` with this config records (elf_jax.teacher's manifest)."""
    t = config.teacher
    kwargs = {**dict(t.get("model_kwargs", {}) or {}), **_bn_chunks(t)}
    return {"dataset": (_info(config).name, "dataset"),
            "zca": (bool(config.zca), "zca"),
            "dtype": (config.dtype, "dtype"), "seed": (int(config.seed), "seed"),
            "epochs": (int(t.epochs), "teacher.epochs"), "lr": (float(t.lr), "teacher.lr"),
            "momentum": (float(t.momentum), "teacher.momentum"),
            "weight_decay": (float(t.weight_decay), "teacher.weight_decay"),
            "batch_size": (int(t.batch_size), "teacher.batch_size"),
            "dsa_strategy": (t.dsa_strategy or "none", "teacher.dsa_strategy"),
            "lr_decay_at_half": (bool(t.lr_decay), "teacher.lr_decay"),
            "model_kwargs": (kwargs, "teacher.model_kwargs / teacher.bn_chunks")}


def _held_out_settings(config) -> dict:
    return dict(zip(("fraction", "seed"), validation_settings(config)))


def check_teacher_settings(run: Run, teacher: str) -> None:
    """Refuses (one-line `ValueError`) to use the teacher in the workdir when it was trained
    with other settings than the config's: its features would be reused for a config that
    asks for another teacher (a silent wrong number). Names each difference and what to run."""
    from elf_jax.teacher import read_manifest

    tdir = run.workdir / "teachers" / teacher
    have = read_manifest(tdir)
    differ = [f"{field} {have.get(key)!r} vs {want!r}"
              for key, (want, field) in _teacher_settings(run.config).items()
              if key in have and have[key] != want]
    # a teacher trained before the validation split existed saw every training image
    held = have.get("validation", {"fraction": 0.0, "seed": 0})
    want = _held_out_settings(run.config)
    if "num_train" in have and held != want and (held["fraction"] or want["fraction"]):
        differ.append(f"validation {held} vs {want} (the images it trained on)")
    if differ:
        raise ValueError(
            f"teacher {teacher} in {tdir} was trained with other settings than the config's "
            f"(trained vs config): {'; '.join(differ)}. Its features would not be this config's: "
            f"retrain it with `elf-jax train-teacher --overwrite=teacher --config ... --workdir "
            f"{run.workdir}` (banks and evaluations are then recomputed), or set the config back")


def _saved_bank(path: Path, synset, teacher: str, epoch: int, layer, variables,
                source: Optional[dict] = None):
    """The bank at `path` if it was built from `synset` and the teacher snapshot `variables`
    (None: the teacher is not in the workdir, so only its name and epoch are checked) or
    the reference buffer `source` (its path, trajectory and file hash); None when there is
    none or it is stale (the log says which)."""
    from elf_jax.elf.bank import load_bank, teacher_hash

    if not path.exists():
        return None
    expect = {"teacher": teacher, "snapshot_epoch": epoch, "layer": layer or "front",
              **(source or {})}
    if variables is not None:
        expect["teacher_hash"] = teacher_hash(variables)
    try:
        bank = load_bank(path, expect_synset=synset, expect_teacher=expect)
    except ValueError as e:
        _log(f"[features] rebuilding the bank in {path}: {e}")
        return None
    if variables is None and source is None:
        _log(f"[features] reusing {path}: teacher {teacher} is not in this workdir, so the bank "
             "was checked by the teacher's name and epoch only, not its weights")
    return bank


def _with_logits(run: Run, bank, path: Path, teacher_net):
    """`bank`, or None (rebuild it, logged) when mode kd is asked for and the bank was saved
    before banks stored the teacher's logits; without the teacher to rebuild it, a one-line
    `ValueError` says what to run."""
    if bank is None or bank.logits is not None or "kd" not in run.config.eval.modes:
        return bank
    if teacher_net is None:
        raise ValueError(
            f"the bank in {path} holds no teacher logits (saved before banks stored them), "
            f"which loss mode 'kd' needs, and its teacher is not in {run.workdir / 'teachers'} "
            "to rebuild it: run `elf-jax train-teacher` first, or remove 'kd' from eval.modes")
    _log(f"[features] rebuilding the bank in {path}: it holds no teacher logits (saved before "
         "banks stored them), which loss mode 'kd' needs")
    return None


def _reference_bank(run: Run, path: Path, synset, teacher: str, epoch: int, layer):
    """The bank of snapshot `epoch` of trajectory `teacher.reference_trajectory` of the
    reference buffer `teacher.reference_buffer` (the reference's `ELF_eval.py` feature
    model), reused while the buffer file (content hash), trajectory, epoch, layer and set
    are the same. Its metadata names the source: `reference_buffer` (absolute path),
    `reference_trajectory`, `reference_buffer_hash` (sha256 of the file)."""
    from elf_jax.checkpoint import file_hash
    from elf_jax.elf.bank import FeatureBank, build_bank, save_bank
    from elf_jax.interop.torch import load_reference_teacher

    t, ref = run.config.teacher, _reference_buffer(run.config)
    if not ref.is_file():
        raise FileNotFoundError(f"config.teacher.reference_buffer: {ref} does not exist")
    source = {"reference_buffer": str(ref), "reference_trajectory": int(t.reference_trajectory),
              "reference_buffer_hash": file_hash(ref)}
    bank = _saved_bank(path, synset, teacher, epoch, layer, None, source)
    if bank is not None:
        return bank
    info, kwargs = _info(run.config), dict(t.get("model_kwargs", {}) or {})
    variables = load_reference_teacher(ref, teacher, info.num_classes, synset.image_shape,
                                       epoch=epoch, trajectory=int(t.reference_trajectory),
                                       **kwargs)
    bank = build_bank(get_model(teacher, info.num_classes, **kwargs), variables, synset,
                      teacher_name=teacher, snapshot_epoch=epoch, layer=layer,
                      batch_size=int(run.config.bank.batch_size))
    bank = FeatureBank(bank.features, {**bank.metadata, **source})
    save_bank(path, bank)
    _log(f"[features] {teacher} epoch {epoch} of {ref} (trajectory {t.reference_trajectory}): "
         f"bank {bank.features.shape} -> {path}")
    return bank


# ------------------------------------------------------------------ stage 4: evaluation
def _protocol(config):
    from elf_jax.train.protocol import TrainProtocol

    e = config.eval
    return TrainProtocol(
        lr=e.lr, momentum=e.momentum, weight_decay=e.weight_decay, batch_size=int(e.batch_size),
        epochs=int(e.epochs), dsa_strategy=e.dsa_strategy, kind=e.kind,
        lambda_front=e.lambda_front, lambda_rear=e.lambda_rear,
        use_learned_lr=bool(e.use_learned_lr), dtype=config.dtype,
        kd_temperature=float(e.kd_temperature),
        reference_loss_quirks=bool(e.get("reference_loss_quirks", False)),
    )


def eval_request(config, synset_hash: Optional[str]) -> dict:
    """What the config asks of the evaluation, as stored in results.json (`request`) and
    compared by `stage_report`: dataset, pool and its widths, modes, repeats, seed, dtype,
    protocol, teacher settings, the synthetic set asked for and the content hash of the one
    used (None: unknown, left out)."""
    t, info = config.teacher, _info(config)
    synset = _request(config)
    if config.synset.source == "distill":
        synset.update({k: config.synset.get(k) for k in ("method", "arch", "ipc", "iterations")})
    if synset_hash is not None:
        synset["content_hash"] = synset_hash
    return {
        "dataset": config.dataset, "zca": bool(config.zca), "pool": list(config.eval.pool),
        "modes": list(config.eval.modes), "repeats": int(config.eval.repeats),
        "seed": int(config.seed), "dtype": config.dtype,
        "width_override": int(config.eval.get("width", 0) or 0),
        "adapter": config.eval.adapter,
        **({"model_kwargs": {a: dict(k) for a, k in config.eval.model_kwargs.items()}}
           if config.eval.get("model_kwargs") else {}),
        "widths": {a: getattr(get_model(a, info.num_classes, **_model_overrides(config, a)),
                              "width", None) for a in config.eval.pool},
        "protocol": _request_protocol(config), "synset": synset, **_bn_chunks(config.eval),
        "validation": _held_out_settings(config),
        **{f"{k}_reference": True for k in references_asked(config)},
        **({"lr_grid": {"lrs": list(config.eval.lr_grid), "on": choice_split(config),
                        "repeats": int(config.eval.get("lr_grid_repeats", 1))}}
           if config.eval.get("lr_grid", ()) else {}),
        "teacher": {"arch": t.arch, "override_arch": t.get("override_arch", ""),
                    "epochs": int(t.epochs), "lr": t.lr, "momentum": t.momentum,
                    "weight_decay": t.weight_decay, "batch_size": int(t.batch_size),
                    "dsa_strategy": t.dsa_strategy, "lr_decay": bool(t.lr_decay),
                    "feature_epoch": int(t.feature_epoch), "bank_layer": config.bank.layer or "front",
                    **_bn_chunks(t), **_reference_request(config)},
    }


def _request_protocol(config) -> dict:
    """The protocol as the request records it; the KD temperature only when mode kd is asked
    for (requests without it read as before the option existed)."""
    p = _protocol(config).to_dict()
    if "kd" in config.eval.modes:
        p["kd_temperature"] = float(config.eval.kd_temperature)
    return p


def _reference_request(config) -> dict:
    """The reference teacher buffer and trajectory when the config names one, else `{}`
    (requests made without one read as before the option existed)."""
    ref = _reference_buffer(config)
    return {} if ref is None else {"reference_buffer": str(ref), "reference_trajectory":
                                   int(config.teacher.reference_trajectory)}


def _teacher_provenance(run: Run, teacher: str, users: list, bank) -> dict:
    """A teacher's settings and test accuracy as its trajectory in the workdir records them
    (only the bank's record when the teacher is gone)."""
    from elf_jax.teacher import read_manifest, recorded_test_accuracy

    epoch = int(run.config.teacher.feature_epoch)
    out = {"for": users, "snapshot_epoch": epoch,
           "teacher_hash": bank.metadata.get("teacher_hash") if bank is not None else None}
    if bank is not None and bank.metadata.get("reference_buffer"):
        out.update({k: bank.metadata.get(k) for k in ("reference_buffer", "reference_trajectory",
                                                      "reference_buffer_hash")})
    tdir = run.workdir / "teachers" / teacher
    if not (tdir / "trajectory.json").exists():
        return out
    m = read_manifest(tdir)
    out.update({k: m.get(k) for k in ("epochs", "lr", "momentum", "weight_decay", "batch_size",
                                       "seed", "num_train", "data_hash")})
    try:  # the accuracy is measured after the last epoch (and others when asked)
        out["test_acc"] = recorded_test_accuracy(tdir)
        out["snapshot_test_acc"] = recorded_test_accuracy(tdir, epoch)
    except (ValueError, FileNotFoundError):  # a damaged record: no accuracy, not no results
        out["test_acc"] = None
    return out


def _provenance(run: Run, synset, banks) -> dict:
    """What produced the results beyond the request: the set and teachers as found, the
    code version and the date."""
    import datetime

    from elf_jax.version import __version__

    m = synset.metadata
    teachers: dict[str, list] = {}
    for arch, teacher in run.teachers.items():
        teachers.setdefault(teacher, []).append(arch)
    return {
        "elf_jax": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "synset": {"source": run.config.synset.source, "path": (m.get("request") or {}).get("path"),
                   "images": len(synset.images), "content_hash": synset.content_hash(),
                   **{k: m.get(k) for k in ("method", "arch", "ipc", "iteration")}},
        "teachers": {t: _teacher_provenance(run, t, users, (banks or {}).get(users[0]))
                     for t, users in teachers.items()},
        "cross_architecture": cross_architecture(run.config.eval.pool, m.get("arch")),
        "dataset": _dataset_record(run.config),
        "validation": _validation_record(run),
        # what each choice was made on: None = nothing was chosen (e.g. the final set)
        "chosen_on": {"synset": m.get("best_chosen_on")},
    }


def _validation_record(run: Run) -> dict:
    """What the validation split held out: the workdir's record when this config's (size and
    a hash of its rows), else the config's fraction and seed."""
    import json

    fraction, seed = validation_settings(run.config)
    path = run.workdir / VALIDATION_RECORD
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("fraction") == fraction and saved.get("seed") == seed:
        return saved
    return {"fraction": fraction, "seed": seed}


def _dataset_record(config) -> dict:
    """The dataset as this run saw it: its name, shape, classes and the mean/std its images
    were normalized with (computed from the train split for `folder:` and `tfds:` data; the
    teachers' `data_hash` is the train split's content fingerprint)."""
    info = _info(config, stats=_stats(config))
    return {"name": info.name, "source": info.source, "image_shape": list(info.image_shape),
            "num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std)}


def cross_architecture(pool, distill_arch) -> Optional[dict]:
    """``{arch: True}`` for the pool nets that are not the set's distillation network (the
    rows where ELF's cross-architecture claim is tested; norm and pooling variants count as
    other networks), False for the same one; None when the set does not say (an import)."""
    from elf_jax.models.registry import canonical_name

    if not distill_arch:
        return None
    return {a: canonical_name(a) != canonical_name(distill_arch) for a in pool}


class _Eta:
    """`[k/n, ~m min left]` after each of n evaluations: the mean time of the finished ones
    times those left (rough: architectures differ; resumed ones finish early)."""

    def __init__(self, n: int):
        self.n, self.done, self.t0 = n, 0, time.perf_counter()

    def tick(self) -> str:
        self.done += 1
        left = (time.perf_counter() - self.t0) / self.done * (self.n - self.done)
        return f"[{self.done}/{self.n}" + (f", ~{left / 60:.1f} min left]" if left else "]")


def stage_evaluate(run: Run, synset=None, banks=None) -> dict:
    """Cross-architecture evaluation with and without ELF; writes results.json as it goes.
    Without `synset` (the `evaluate` command) the prerequisites are checked first.

    results.json is replaced at the start by one with this request and no results, so an
    earlier run's file is never reported for this one (even when this one fails before its
    first result); finished (arch, mode) runs are read back from their checkpoints in
    seconds and written again one by one, and the file is marked `partial` until the end.
    With `eval.random_reference` / `eval.full_reference` the same evaluation of a random real
    subset / of the whole training split follows (`stage_reference`), under results.json's
    `reference.random` / `reference.full`."""
    config, results_path = run.config, run.workdir / "results.json"
    if synset is None:
        check_prerequisites(run, "evaluate")
        synset = stage_synset(run)
    check_learned_lr(config, synset)
    if banks is None and any(m != "task" for m in config.eval.modes):
        banks = stage_features(run, synset)
    meta = {
        "dataset": config.dataset,
        "synset": {k: synset.metadata.get(k) for k in ("method", "ipc", "arch", "iteration")},
        "teachers": {a: b.metadata.get("teacher") for a, b in (banks or {}).items()},
        "feature_epoch": int(config.teacher.feature_epoch),
        "request": eval_request(config, synset.content_hash()),
        "provenance": _provenance(run, synset, banks),
    }
    pc = ParallelConfig.from_config(config.get("parallel", None))  # absent: one device
    partial: dict = {}
    write_json_atomic(results_path, {**meta, "results": partial, "partial": True})
    kinds = references_asked(config)
    eta = _Eta(len(config.eval.pool) * len(config.eval.modes) * (1 + len(kinds)))

    def logger(into: dict, extra: Callable[[], dict], label: str = ""):
        def on_result(arch, mode, entry):
            into.setdefault(arch, {})[mode] = entry
            write_json_atomic(results_path, {**meta, "results": partial, **extra(),
                                             "partial": True})
            total = entry.get("total_seconds")
            earlier = (f", {total:.0f} s with earlier runs" if entry.get("resumed_from") and total
                       else "")
            acc = report_lib.format_accuracy(entry["mean"], entry["std"], len(entry["accs"]))
            _log(f"[evaluate{label}] {arch:<12} {mode:<16} {acc}  ({entry['seconds']:.0f} s"
                 f"{earlier}, {entry['strategy']}) {eta.tick()}")
        return on_result

    out = _evaluate_pool(run, synset, banks, run.workdir / "eval", "evaluate",
                         logger(partial, dict), pc)
    full = {**meta, **out, "partial": False}
    done: dict = {}
    for kind in kinds:  # each reference's results are written as they come
        ref: dict = {}
        extra = lambda: {"reference": {**done, kind: {"results": ref}}}  # noqa: E731
        done[kind] = stage_reference(run, synset, kind, pc, logger(ref, extra, f" {kind}"))
    if done:
        full["reference"] = done
    if pc.parallel != "none":
        from elf_jax.parallel import Placement

        pl = Placement.of(pc)
        full["parallel"] = {"mode": pc.parallel, "mesh": [pl.n_runs, pl.n_data],
                            "devices": jax.device_count(), "processes": jax.process_count()}
    full["budget"] = budget(synset, banks, full)
    write_json_atomic(results_path, full)
    m = synset.metadata
    report_lib.synset_grid(synset.images, synset.labels, str(run.workdir / "results_synset.png"),
                           m.get("normalization"), f"{m.get('method')} set, IPC {synset.ipc}, "
                           f"{config.dataset} (rows: classes)")
    return full


def _evaluate_pool(run: Run, synset, banks, workdir: Path, stage: str, on_result, pc) -> dict:
    """`cross_evaluate` of the config's pool, modes, protocol and repeats on `synset`, its
    checkpoints in `workdir`, its curves in `<workdir>/tb/<stage>`."""
    from elf_jax.elf.evaluate import LrGrid, cross_evaluate

    config, curves = run.config, curves_for(run, stage)
    grid = tuple(config.eval.get("lr_grid", ()) or ())
    lr_grid = None if not grid else LrGrid(
        grid, images_of(run.chooser), run.chooser.labels,
        int(config.eval.get("lr_grid_repeats", 1)), run.chooser.role)
    try:
        return cross_evaluate(
            list(config.eval.pool), synset.images, synset.labels, images_of(run.test),
            run.test.labels, features=banks, modes=tuple(config.eval.modes),
            protocol=_protocol(config), repeats=int(config.eval.repeats),
            key=jax.random.PRNGKey(config.seed), workdir=workdir,
            num_classes=synset.num_classes, learned_lr=synset.lr,
            model_overrides=lambda a: _model_overrides(config, a),
            strategy=config.eval.repeat_strategy,
            checkpoint_every=int(config.eval.checkpoint_every), parallel=pc,
            on_result=on_result, log=_log, adapter=config.eval.adapter, curves=curves,
            lr_grid=lr_grid)
    finally:
        curves.close()


#: The reference sets the evaluation can add (`eval.random_reference`, `eval.full_reference`).
REFERENCES = ("random", "full")


def references_asked(config) -> list[str]:
    return [k for k in REFERENCES if config.eval.get(f"{k}_reference", False)]


def stage_reference(run: Run, synset, kind: str, pc, on_result) -> dict:
    """The evaluation again on a reference set (issue 29): `random`, a random real subset of
    the set's IPC, or `full`, every image of the training split the validation split left
    (in memory). The same pool, modes, protocol (the set's learned lr too), repeats and key,
    so repeat r of every (arch, mode) starts from the weights of the set's repeat r and the
    differences are paired. The reference, its banks and its checkpoints live in
    `<workdir>/reference/<kind>/`."""
    where = run.workdir / "reference" / kind
    ref = (_random_subset(run, where / "synset", int(synset.ipc)) if kind == "random"
           else _full_set(run))
    if synset.lr is not None:
        ref = ref.replace(lr=synset.lr)
    banks = (stage_features(run, ref, banks_dir=where / "banks")
             if any(m != "task" for m in run.config.eval.modes) else None)
    out = _evaluate_pool(run, ref, banks, where / "eval", f"evaluate_{kind}", on_result, pc)
    return {**out, "synset": {"content_hash": ref.content_hash(), "ipc": ref.metadata.get("ipc"),
                              "images": len(ref.images), "lr": ref.lr}}


def _full_set(run: Run):
    """The training split (what the validation split left) as a set to evaluate on."""
    from elf_jax.synset import SyntheticSet, dataset_normalization

    train = run.train
    if is_streamed(train):
        raise ValueError("config.eval.full_reference=True trains on the whole training split, "
                         "which is streamed here (too big for memory): set it off, or "
                         "data_mode=memory if it fits")
    space = dataset_normalization(train)
    counts = np.bincount(train.labels, minlength=train.num_classes)
    meta = {**({"normalization": space} if space else {}), "method": "real_full",
            "dataset": train.name, "ipc": int(counts.min()), "arch": None,
            "zca": train.zca is not None, "iteration": 0}
    return SyntheticSet(train.images, train.labels, metadata=meta, num_classes=train.num_classes)


def budget(synset, banks, results: dict) -> dict:
    """What the results cost beside their scores (issue 29): the bytes of the synthetic set,
    its soft labels and each teacher's bank (features and logits, float32 as stored), the
    teacher's forward passes (one per set image for its bank; training: epochs x real
    images, as its trajectory records), and the evaluation's SGD steps, seconds and device."""
    entries = [e for by_mode in results.get("results", {}).values() for e in by_mode.values()]
    labels = np.asarray(synset.labels)
    teachers = (results.get("provenance") or {}).get("teachers") or {}
    by_teacher = {b.metadata.get("teacher"): b for b in (banks or {}).values()}
    return {
        "synset_bytes": int(np.asarray(synset.images, np.float32).nbytes),
        "soft_label_bytes": int(labels.astype(np.float32).nbytes) if labels.ndim == 2 else 0,
        "bank_bytes": {t: int(b.features.nbytes + (0 if b.logits is None else b.logits.nbytes))
                       for t, b in by_teacher.items()},
        "teacher_forward_passes": {t: {"bank": len(synset.images),
                                       "training": (int(p["epochs"]) * int(p["num_train"])
                                                    if p.get("epochs") and p.get("num_train")
                                                    else None)}
                                   for t, p in teachers.items()},
        "eval_steps": int(sum(e.get("steps", 0) for e in entries)),
        "eval_seconds": float(sum(e.get("seconds", 0.0) for e in entries)),
        # choosing the lr (eval.lr_grid): its runs on the validation split
        "lr_grid_steps": int(sum((e.get("lr_tuning") or {}).get("steps", 0) for e in entries)),
        "lr_grid_seconds": float(sum((e.get("lr_tuning") or {}).get("seconds", 0.0)
                                     for e in entries)),
        "devices": sorted({e["device"] for e in entries if e.get("device")}),
    }


# ------------------------------------------------------------------ stage 5: report
def _saved_synset_hash(run: Run) -> Optional[str]:
    """The content hash of the set the config's source would evaluate now (None: none yet,
    or unreadable; the report then compares the settings only)."""
    from elf_jax.synset import load_synset

    source = run.config.synset.source
    path = run.workdir / ("distill/synset_best" if source == "distill" else "synset")
    try:
        return load_synset(path).content_hash() if path.exists() else None
    except (ValueError, FileNotFoundError):
        return None


def stale_notes(run: Run, results: dict) -> list[str]:
    """The loud lines for results.json made for another request than the config's ([] when
    it matches)."""
    stored = results.get("request")
    if not stored:
        return ["WARNING: results.json does not record the settings it was made with (written "
                "by an older elf_jax), so it cannot be checked against this config"]
    current = eval_request(run.config, _saved_synset_hash(run))
    if "content_hash" not in current["synset"]:  # no set in the workdir to compare with
        stored = {**stored, "synset": {k: v for k, v in stored.get("synset", {}).items()
                                       if k != "content_hash"}}
    diffs = report_lib.differences(stored, current)
    notes = _teacher_mismatch(results)
    if not diffs:
        return notes
    return [f"STALE: these results were produced by the settings stored in results.json, "
            f"not by this config ({len(diffs)} difference(s)): " + "; ".join(diffs)
            + ". Run `elf-jax evaluate` with this config to replace them."] + notes


def _teacher_mismatch(results: dict) -> list[str]:
    """A loud line when results.json's teachers (provenance: as their trajectories record
    them) were trained with other settings than its request asked for (files written
    before `evaluate` checked the teacher's settings)."""
    asked = (results.get("request") or {}).get("teacher") or {}
    found = ((results.get("provenance") or {}).get("teachers")) or {}
    differ = [f"{name} {key} {rec[key]!r} vs {asked[key]!r}" for name, rec in found.items()
              for key in ("epochs", "lr", "momentum", "weight_decay", "batch_size")
              if rec.get(key) is not None and key in asked and rec[key] != asked[key]]
    if not differ:
        return []
    return ["MISMATCH: the teachers behind these results were trained with other settings than "
            "results.json's request names (trained vs requested): " + "; ".join(differ)
            + ". Retrain with `elf-jax train-teacher --overwrite=teacher`, then evaluate."]


def stage_report(run: Run, results: Optional[dict] = None) -> dict[str, str]:
    """Prints the table and writes results.{json,md,png}.

    Reading results.json (the `report` command), it is checked against the config: when it
    was made for another request (dataset, pool, widths, modes, repeats, seed, dtype,
    protocol, synthetic set or its content hash, teacher settings), the report still shows
    it (refusing would force rebuilding the old config just to look at finished numbers),
    but every format opens with a STALE line naming each difference and saying the numbers
    come from the stored settings. Partial results open with a PARTIAL line."""
    notes: list[str] = []
    if results is None:
        results = report_lib.load_report(str(run.workdir / "results.json"))
        notes = stale_notes(run, results) + report_lib.summary_disagreement(results)
    s = results.get("synset", {})
    title = f"ELF on {results.get('dataset')} ({s.get('method')}, IPC {s.get('ipc')})"
    paths = report_lib.write_report(results, str(run.workdir), title, notes)
    _log("\n" + report_lib.text_report(results, title, notes))
    _log(f"\nwritten: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return paths


# ------------------------------------------------------------------ lambda sweeps
def sweep_mode(config) -> str:
    """The ELF mode a sweep trains in: the first of `config.eval.modes` that is not the
    baseline, else front_rear_task."""
    return next((m for m in config.eval.modes if m != "task"), "front_rear_task")


def sweep_pool(config) -> list[str]:
    """`config.sweep.pool`, or all of `config.eval.pool` when it is empty."""
    return list(config.sweep.pool) or list(config.eval.pool)


def sweep_request(config, synset_hash: Optional[str]) -> dict:
    """What the config asks of `elf-jax sweep`, as stored in sweep.json: the evaluation's
    request (`eval_request`) for the swept pool and modes, its protocol with the grid's
    lambdas in place of the two numbers, and the sweep section."""
    from elf_jax.elf.sweep import check_axis

    pool, mode, baseline = sweep_pool(config), sweep_mode(config), bool(config.sweep.baseline)
    lf = list(check_axis("config.sweep.lambda_front", config.sweep.lambda_front))
    lr = list(check_axis("config.sweep.lambda_rear", config.sweep.lambda_rear))
    req = eval_request(config, synset_hash)
    req.update(pool=pool, modes=(["task"] if baseline else []) + [mode],
               widths={a: req["widths"][a] for a in pool},
               protocol={**req["protocol"], "mode": mode, "lambda_front": lf, "lambda_rear": lr},
               sweep={"lambda_front": lf, "lambda_rear": lr, "mode": mode, "baseline": baseline,
                      "evaluated_on": choice_split(config)})
    return req


def choice_split(config) -> str:
    """The split choices read: "validation", or "test" with `validation.fraction` 0."""
    return "validation" if validation_settings(config)[0] > 0 else "test"


def _sweep_entry(out: dict) -> dict:
    """What sweep.json keeps of a `lambda_sweep` result (JSON: no per-epoch losses)."""
    return {k: v for k, v in out.items() if k != "train_loss"}


def stage_sweep(run: Run, synset=None, banks=None) -> dict:
    """`elf-jax sweep`: the lambda grid of `config.sweep` on every architecture of the swept
    pool (`elf_jax.elf.sweep.lambda_sweep`, one compiled program per architecture), with
    the evaluation's protocol, repeats and seed (repeat r of every point and of the
    baseline from the same weights: `elf-jax evaluate`'s repeat r). Needs what `evaluate`
    needs (its prerequisites are checked, the set and banks made or reused). sweep.json is
    replaced at the start by one with this request and no results (a file made for other
    settings is named in the log with each difference), then written after each
    architecture; finished ones are read back from their checkpoints in `sweep/<arch>/`
    in seconds, and an interrupted one resumes from them. Writes sweep.{json,md,png}."""
    from elf_jax.elf.sweep import lambda_sweep

    config, path = run.config, run.workdir / "sweep.json"
    if config.get("sweep", None) is None:
        raise ValueError("the config has no `sweep` section: start it from "
                         "elf_jax.config.base_config() (configs/sweep_mnist5k.py is an example)")
    if all(m == "task" for m in config.eval.modes):
        raise ValueError(f"config.eval.modes={tuple(config.eval.modes)!r} has no ELF mode, so "
                         "no teacher or bank is made for the sweep: add one, e.g. "
                         "--config.eval.modes=\"('task','front_rear_task')\"")
    if synset is None:
        check_prerequisites(run, "sweep")
        synset = stage_synset(run)
    check_learned_lr(config, synset)
    if banks is None:
        banks = stage_features(run, synset)
    pool, mode = sweep_pool(config), sweep_mode(config)
    request = sweep_request(config, synset.content_hash())
    if path.exists():
        old = report_lib.load_report(str(path)).get("request") or {}
        diffs = report_lib.differences(old, request)
        if diffs:
            _log(f"[sweep] replacing {path}, made for other settings ({len(diffs)} "
                 f"difference(s)): " + "; ".join(diffs) + f". Checkpoints in "
                 f"{run.workdir / 'sweep'} of other settings are refused: --overwrite=sweep "
                 "starts over")
    prov = _provenance(run, synset, banks)
    used = {run.teachers[a] for a in pool}
    prov["teachers"] = {t: {**p, "for": [a for a in p["for"] if a in pool]}
                        for t, p in prov["teachers"].items() if t in used}
    prov["cross_architecture"] = cross_architecture(pool, synset.metadata.get("arch"))
    meta = {
        "dataset": config.dataset,
        "synset": {k: synset.metadata.get(k) for k in ("method", "ipc", "arch", "iteration")},
        "teachers": {a: banks[a].metadata.get("teacher") for a in pool},
        "feature_epoch": int(config.teacher.feature_epoch),
        "request": request, "provenance": prov,
    }
    results: dict = {}
    write_json_atomic(path, {**meta, "results": results, "partial": True})
    pc = ParallelConfig.from_config(config.get("parallel", None))
    eta = _Eta(len(pool))
    for arch in pool:
        out = lambda_sweep(
            arch, synset.images, synset.labels, images_of(run.chooser), run.chooser.labels,
            banks[arch],
            lambda_front=request["sweep"]["lambda_front"],
            lambda_rear=request["sweep"]["lambda_rear"],
            protocol=_protocol(config).replace(mode=mode), repeats=int(config.eval.repeats),
            key=jax.random.PRNGKey(config.seed), workdir=run.workdir / "sweep" / arch,
            baseline=bool(config.sweep.baseline), num_classes=synset.num_classes,
            learned_lr=synset.lr, strategy=config.eval.repeat_strategy,
            checkpoint_every=int(config.eval.checkpoint_every),
            model_overrides=_model_overrides(config, arch), parallel=pc, log=_log,
            adapter=config.eval.adapter)
        results[arch] = {**_sweep_entry(out), "evaluated_on": run.chooser.role}
        write_json_atomic(path, {**meta, "results": results, "partial": True})
        points = len(out["lambda_front"]) * len(out["lambda_rear"])
        start, epochs = out["resumed_from"], int(config.eval.epochs) + 1
        how = ("finished earlier: read back from its checkpoints" if start == epochs else
               f"{out['seconds']:.0f} s" + (f", resumed at epoch {start}" if start else ""))
        _log(f"[sweep] {arch:<12} {mode}: {points} points x {out['repeats']} repeats in one "
             f"program, {how} {eta.tick()}")
    full = {**meta, "results": results, "partial": False}
    title = f"Lambda sweep on {config.dataset} ({synset.metadata.get('method')}, IPC {synset.ipc})"
    paths = report_lib.write_sweep_report(full, str(run.workdir), title)
    _log("\n" + report_lib.sweep_text(full, title))
    _log(f"\nwritten: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return full


def run_all(run: Run) -> dict[str, str]:
    """The whole pipeline: teachers, synthetic set, banks, evaluation, report."""
    start = time.perf_counter()
    # an imported or random-real set takes seconds: made first, so that a bad import is
    # refused before the teacher trains (minutes to hours), not after
    early = run.config.synset.source != "distill"
    synset = stage_synset(run) if early else None
    if early:
        check_learned_lr(run.config, synset)
    stage_teachers(run)
    if not early:
        synset = stage_synset(run)
    banks = stage_features(run, synset)
    results = stage_evaluate(run, synset, banks)
    paths = stage_report(run, results)
    _log(f"done in {time.perf_counter() - start:.0f} s")
    return paths
