"""The CLI and the staged pipeline end to end on tiny real data (mnist5k, width 32)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # test_metrics' event reader
TINY = [
    "--config", str(ROOT / "configs" / "demo_mnist5k.py"),
    "--config.synset.source=real_random",
    "--config.synset.ipc=2",
    "--config.teacher.epochs=1",
    "--config.teacher.feature_epoch=1",
    "--config.teacher.batch_size=512",
    "--config.eval.pool=('ConvNet','ConvNetBN')",
    "--config.eval.width=32",
    "--config.eval.epochs=2",
    "--config.eval.repeats=1",
    "--config.eval.checkpoint_every=1",
]


def _cli(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "elf_jax.cli", *args], capture_output=True,
                          text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"elf-jax {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_all_stages_then_report_again(tmp_path):
    wd = str(tmp_path / "run")
    out = _cli("all", "--workdir", wd, *TINY).stdout
    assert "ConvNetBN" in out and "ELF gain" in out
    # the curves of every stage (tests/test_metrics.py reads them back)
    assert f"curves: tensorboard --logdir {tmp_path / 'run' / 'tb'}" in out
    assert "[teacher] ConvNetW32 epoch 1/1: loss" in out  # a progress line that stays
    from test_metrics import read_scalars

    teacher_curve = read_scalars(tmp_path / "run" / "tb" / "teacher" / "ConvNetW32")
    assert [step for step, _ in teacher_curve["train/loss"]] == [0]  # its one epoch
    for run in ("evaluate/ConvNet_task_r0", "evaluate/ConvNetBN_front_rear_task_r0"):
        curve = read_scalars(tmp_path / "run" / "tb" / run)
        assert [step for step, _ in curve["train/loss"]] == [0, 1, 2], run  # epochs 0..2
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["results"]) == {"ConvNet", "ConvNetBN"}
    for by_mode in results["results"].values():
        assert set(by_mode) == {"task", "front_rear_task"}
        assert all(0.0 <= a <= 1.0 for m in by_mode.values() for a in m["accs"])
    assert results["teachers"] == {"ConvNet": "ConvNetW32", "ConvNetBN": "ConvNetW32"}
    assert results["partial"] is False and results["request"]["seed"] == 0
    teacher = results["provenance"]["teachers"]["ConvNetW32"]
    assert 0 < teacher["test_acc"] <= 1 and teacher["epochs"] == 1 and teacher["lr"] == 0.01
    assert results["request"]["widths"] == {"ConvNet": 32, "ConvNetBN": 32}
    md = (tmp_path / "run" / "results.md").read_text()
    assert "## Settings" in md and "config.eval.width=32" in md and "PARTIAL" not in md
    # the budget beside the scores (issue 29): storage, teacher passes, steps, device
    b = results["budget"]
    assert b["synset_bytes"] == 20 * 28 * 28 * 4 and b["soft_label_bytes"] == 0
    assert b["bank_bytes"]["ConvNetW32"] > 0 and b["eval_seconds"] > 0 and b["devices"]
    # one epoch over the 3,600 training images the validation split (10%) left
    assert b["teacher_forward_passes"]["ConvNetW32"] == {"bank": 20, "training": 3600}
    v = results["provenance"]["validation"]
    assert (v["fraction"], v["seed"], v["size"], v["train_size"]) == (0.1, 0, 400, 3600)
    assert results["provenance"]["chosen_on"] == {"synset": None}  # a random subset: no choice
    assert "choices: nothing chosen" in md and "validation: 400 training images held out" in md
    # 2 archs x 2 modes, epochs 0..2 of one 20-image batch, 1 repeat
    assert b["eval_steps"] == 4 * 3 and "budget: synthetic set 0.06 MB" in md
    assert "(n=1)" in out and "± 0.00" not in out  # one repeat: no spread printed
    for name in ("results.md", "results.png", "results_synset.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    # the stages reuse what the workdir holds: evaluate again resumes finished runs
    again = _cli("evaluate", "--workdir", wd, *TINY).stdout
    assert "reusing" in again and "ELF gain" in again  # evaluate prints the table too
    rerun = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert {a: {m: e["accs"] for m, e in r.items()} for a, r in rerun.items()} == \
        {a: {m: e["accs"] for m, e in r.items()} for a, r in results["results"].items()}
    for arch, by_mode in rerun.items():  # resumed: the first process's seconds count too
        for mode, e in by_mode.items():
            assert e["resumed_from"] and e["total_seconds"] >= \
                e["seconds"] + results["results"][arch][mode]["seconds"] * 0.5
    assert "STALE" not in _cli("report", "--workdir", wd, *TINY).stdout
    out = _cli("report", "--workdir", wd, *TINY, "--config.eval.repeats=2").stdout
    assert "STALE" in out and "repeats: results 1, config 2" in out, out
    # a retrained teacher (another lr): the old bank is rebuilt from the new weights, loudly
    import shutil

    from elf_jax.synset import load_synset, to_npz

    shutil.rmtree(tmp_path / "run" / "teachers")
    other_teacher = [*TINY, "--config.teacher.lr=0.02"]
    _cli("train-teacher", "--workdir", wd, *other_teacher)
    out = _cli("features", "--workdir", wd, *other_teacher).stdout
    assert "rebuilding the bank" in out and "teacher_hash" in out, out
    # the config's teacher (lr 0.01) is not the workdir's (0.02): refused, never reused
    for command in ("features", "evaluate"):
        proc = _cli(command, "--workdir", wd, *TINY, check=False)
        assert proc.returncode == 2 and "teacher.lr 0.02 vs 0.01" in proc.stderr, proc.stderr
        assert "--overwrite=teacher" in proc.stderr.strip().splitlines()[-1]
    # an import replaces the saved set (the old set is never evaluated in its place)
    old = load_synset(tmp_path / "run" / "synset")
    to_npz(tmp_path / "set.npz", old.replace(images=old.images[::-1].copy()))
    imported = [*other_teacher, "--config.synset.source=import",
                f"--config.synset.path={tmp_path / 'set.npz'}"]
    out = _cli("features", "--workdir", wd, *imported).stdout
    assert "replacing" in out and "rebuilding the bank" in out, out
    new = load_synset(tmp_path / "run" / "synset")
    assert new.content_hash() != old.content_hash()
    assert "reusing" in _cli("features", "--workdir", wd, *imported).stdout  # unchanged now


def test_imports_are_checked_against_the_dataset(tmp_path):
    """Each bad import is a one-line refusal (exit 2) before anything is trained."""
    import numpy as np

    from elf_jax.synset import SyntheticSet, to_npz

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 28, 28, 1)).astype(np.float32)
    soft = np.eye(10, dtype=np.float32)[np.arange(20) % 10]
    cases = {
        "classes (0..9)": SyntheticSet(x, np.arange(20) % 11, num_classes=11),
        "not probabilities": SyntheticSet(x, 5.0 * soft - 2.0),
        "no pixel below 0": SyntheticSet(rng.integers(0, 256, x.shape).astype(np.float32),
                                         np.arange(20) % 10),
        "has images (28, 28, 3)": SyntheticSet(np.repeat(x, 3, -1), np.arange(20) % 10),
    }
    task_only = [*TINY, "--config.synset.source=import", "--config.eval.modes=('task',)"]
    for i, (message, s) in enumerate(cases.items()):
        path = tmp_path / f"{len(message)}.npz"
        to_npz(path, s)
        command = "all" if i == 0 else "evaluate"  # `all`: refused before the teacher trains
        proc = _cli(command, "--workdir", str(tmp_path / "wd"), *task_only,
                    f"--config.synset.path={path}", "--config.eval.modes=('task','front_rear_task')"
                    if command == "all" else "--config.seed=0", check=False)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], \
            (message, proc.stderr[-1500:])
        assert not (tmp_path / "wd" / "synset").exists()
        assert not (tmp_path / "wd" / "teachers").exists()


def test_bad_invocations_say_what_to_do(tmp_path):
    """(More one-line errors in tests/test_cli.py.)"""
    (tmp_path / "empty").mkdir()
    proc = _cli("report", "--workdir", str(tmp_path / "empty"), *TINY, check=False)
    assert proc.returncode == 2 and "elf-jax evaluate" in proc.stderr
    proc = _cli("all", "--workdir", str(tmp_path / "x"), *TINY, "--config.eval.adapter=off",
                "--config.eval.pool=('ConvNet','MLP')", check=False)
    assert proc.returncode == 2 and "no registered ConvNetW512-family teacher" in proc.stderr
    assert "eval.adapter=auto" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x" / "teachers").exists()  # refused before any stage


def test_stages_refuse_without_prerequisites(tmp_path):
    # evaluate on a fresh workdir whose config distills: no silent hours-long distillation
    wd = tmp_path / "fresh"
    start = time.perf_counter()
    proc = _cli("evaluate", "--workdir", str(wd), *TINY, "--config.synset.source=distill",
                check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.perf_counter() - start < 120
    err = proc.stderr.strip().splitlines()[-1]
    assert "`elf-jax distill --config ... --workdir" in err
    assert "no teacher ConvNetW32" in err and "`elf-jax train-teacher" in err
    assert not (wd / "synset").exists() and not (wd / "distill").exists()
    # features without a teacher refuses before making even the cheap real_random set
    proc = _cli("features", "--workdir", str(wd), *TINY, check=False)
    assert proc.returncode == 2 and "`elf-jax train-teacher" in proc.stderr
    assert "elf-jax distill" not in proc.stderr and not (wd / "synset").exists()
    # a distilled set counts: then only the teacher is missing
    distill = [*TINY, "--config.synset.source=distill", "--config.synset.iterations=2",
               "--config.synset.batch_real=8"]
    _cli("distill", "--workdir", str(wd), *distill)
    from test_metrics import read_scalars

    curve = read_scalars(wd / "tb" / "distill" / "dm")  # the loss of each of its 2 iterations
    assert [step for step, _ in curve["distill/loss"]] == [1, 2]
    # another IPC on a workdir holding an IPC-2 distillation: refused, never reused
    proc = _cli("distill", "--workdir", str(wd), *distill, "--config.synset.ipc=3", check=False)
    assert proc.returncode != 0 and "another run's (saved vs asked): ipc 2 vs 3" in proc.stderr, proc.stderr[-2000:]
    proc = _cli("evaluate", "--workdir", str(wd), *distill, check=False)
    assert proc.returncode == 2 and "`elf-jax train-teacher" in proc.stderr
    assert "elf-jax distill" not in proc.stderr


def test_interrupted_evaluation_is_reported_as_partial_and_old_results_go(tmp_path, monkeypatch):
    """In process, no training: cross_evaluate is replaced by one that stops after a result."""
    import numpy as np
    import pytest

    from elf_jax import pipeline
    from elf_jax.config import demo_config
    from elf_jax.elf import evaluate
    from elf_jax.synset import SyntheticSet

    config = demo_config()
    config.eval.pool = ("ConvNet", "ConvNetBN", "MLP", "ViT")  # 4 x 2 modes, 2 repeats
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "results.json").write_text(json.dumps(  # an earlier run's complete results
        {"dataset": "mnist5k", "results": {"OldNet": {"task": {"accs": [0.5]}}}}))
    synset = SyntheticSet(np.zeros((10, 28, 28, 1), np.float32), np.arange(10),
                          metadata={"method": "real_random", "ipc": 1, "dataset": "mnist5k"})
    entry = {"accs": [0.8, 0.82], "mean": 0.81, "std": 0.01, "seconds": 1.0,
             "total_seconds": 5.0, "resumed_from": 3, "strategy": "sequential"}

    def stops(first_results):
        def cross_evaluate(pool, *args, on_result, **kw):
            for arch, mode in first_results:
                on_result(arch, mode, entry)
            raise KeyboardInterrupt
        return cross_evaluate

    logged: list = []
    pipeline.set_logger(logged.append)
    try:
        run = pipeline.Run(config, wd)
        monkeypatch.setattr(evaluate, "cross_evaluate", stops([]))
        with pytest.raises(KeyboardInterrupt):
            pipeline.stage_evaluate(run, synset, banks={})
        with pytest.raises(ValueError, match="PARTIAL: 0 of 8"):  # never the old results
            pipeline.stage_report(run)
        monkeypatch.setattr(evaluate, "cross_evaluate", stops([("ConvNet", "task")]))
        with pytest.raises(KeyboardInterrupt):
            pipeline.stage_evaluate(run, synset, banks={})
        stored = json.loads((wd / "results.json").read_text())
        assert stored["partial"] and set(stored["results"]) == {"ConvNet"}
        assert stored["request"]["repeats"] == 2 and stored["request"]["widths"]["ConvNet"] == 32
        assert stored["request"]["synset"]["content_hash"] == synset.content_hash()
        assert stored["provenance"]["synset"]["content_hash"] == synset.content_hash()
        assert stored["provenance"]["teachers"]["ConvNetW32"]["snapshot_epoch"] == 8
        assert "5 s with earlier runs" in logged[-1]
        paths = pipeline.stage_report(run)
        assert "PARTIAL: 1 of 8" in logged[-2] and "STALE" not in logged[-2], logged[-2]
        assert (wd / "results.md").read_text().startswith("**PARTIAL: 1 of 8")
        assert b"PARTIAL: 1 of 8" in Path(paths["plot"]).read_bytes()
        # the same results read with another config: shown, but loudly as another request's
        config.eval.repeats = 3
        pipeline.stage_report(pipeline.Run(config, wd))
        assert "STALE" in logged[-2] and "repeats: results 2, config 3" in logged[-2]
        assert "repeats: results 2, config 3" in (wd / "results.md").read_text()
    finally:
        pipeline.set_logger(print)


def test_an_imported_sets_learned_lr_survives_an_earlier_import_of_its_pixels(tmp_path):
    """Issue 27 item 1 through the CLI: an .npz, then a reference .pt folder with the same
    pixels and lr_best.pt 0.05, into one workdir; with eval.use_learned_lr the evaluation
    trains with 0.05 and results.json names the .pt folder (it reused the .npz: lr 0.01)."""
    import numpy as np
    import pytest

    torch = pytest.importorskip("torch")
    from elf_jax.data import load
    from elf_jax.synset import SyntheticSet, to_npz

    ds = load("mnist5k", "train")
    labels = np.asarray(ds.labels)
    rows = np.concatenate([np.flatnonzero(labels == k)[:2] for k in range(10)])
    x, y = np.asarray(ds.images)[rows], labels[rows]
    to_npz(tmp_path / "set.npz", SyntheticSet(x, y))
    ref = tmp_path / "ref"
    ref.mkdir()
    torch.save(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), ref / "images_best.pt")
    torch.save(torch.from_numpy(y.astype(np.int64)), ref / "labels_best.pt")
    torch.save(torch.tensor(0.05), ref / "lr_best.pt")
    wd = str(tmp_path / "wd")
    common = [*TINY, "--config.synset.source=import", "--config.eval.modes=('task',)",
              "--config.eval.pool=('ConvNet',)"]
    _cli("evaluate", "--workdir", wd, *common, f"--config.synset.path={tmp_path / 'set.npz'}")
    out = _cli("evaluate", "--workdir", wd, *common, f"--config.synset.path={ref}",
               "--config.synset.import_stats=dc", "--config.eval.use_learned_lr=True",
               "--overwrite=evaluate").stdout  # another lr: the finished run is not this one
    assert "replacing" in out, out
    results = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert results["results"]["ConvNet"]["task"]["lr"] == pytest.approx(0.05)  # float32 file
    assert results["provenance"]["synset"]["path"] == str(ref)


def test_the_references_share_the_sets_seeds_and_never_see_validation(tmp_path):
    """`eval.random_reference`: the pool evaluated again on a random real subset of the set's
    IPC, with the set's seeds. Here the set IS that subset (source real_random, same seed and
    IPC), so each reference run is the set's run again: one program on the same inputs, equal
    bit for bit, set minus random exactly 0. The subset is drawn from the training images the
    validation split left."""
    import numpy as np

    from elf_jax.data import load
    from elf_jax.data.validation import hold_out
    from elf_jax.report import RANDOM_TITLE, VS_RANDOM_TITLE
    from elf_jax.synset import load_synset

    wd = tmp_path / "run"
    args = [*TINY, "--config.eval.pool=('ConvNet',)", "--config.eval.repeats=2",
            "--config.eval.random_reference=True"]
    out = _cli("all", "--workdir", str(wd), *args).stdout
    assert RANDOM_TITLE in out and VS_RANDOM_TITLE in out and "[evaluate random]" in out, out
    results = json.loads((wd / "results.json").read_text())
    ref = results["reference"]["random"]
    assert results["request"]["random_reference"] is True
    for mode in ("task", "front_rear_task"):
        mine, theirs = results["results"]["ConvNet"][mode], ref["results"]["ConvNet"][mode]
        assert len(mine["accs"]) == 2 and mine["accs"] == theirs["accs"], (mode, mine, theirs)
    assert ref["synset"]["content_hash"] == results["provenance"]["synset"]["content_hash"]
    vs = out.split(VS_RANDOM_TITLE)[1]
    row = next(ln for ln in vs.splitlines() if ln.startswith("ConvNet "))
    assert row.split()[1:3] == ["+0.00", "[+0.00,"], row  # set - random, task mode
    md = (wd / "results.md").read_text()
    assert f"## {RANDOM_TITLE}" in md and f"## {VS_RANDOM_TITLE}" in md
    # the subset's images are training images, none of them held out for validation
    held = hold_out(load("mnist5k", "train"), 0.1, 0)
    subset = load_synset(wd / "reference" / "random" / "synset")
    validation = {x.tobytes() for x in held.validation.images}
    train = {x.tobytes() for x in held.train.images}
    assert all(x.tobytes() in train and x.tobytes() not in validation for x in subset.images)
    assert subset.images.shape[0] == 20 and np.isfinite(subset.images).all()


def test_the_full_data_reference_trains_on_every_training_image_left(tmp_path):
    """`eval.full_reference`: the pool trained on the whole training split the validation
    split left (digits: its 1,438 training images less the held-out ones), in its own table."""
    from elf_jax.report import FULL_TITLE

    wd = tmp_path / "run"
    out = _cli("all", "--workdir", str(wd), "--config", str(ROOT / "configs" / "demo_mnist5k.py"),
               "--config.dataset=digits", "--config.synset.source=real_random",
               "--config.synset.ipc=2", "--config.eval.pool=('MLP',)",
               "--config.eval.modes=('task',)", "--config.eval.epochs=2",
               "--config.eval.repeats=2", "--config.eval.full_reference=True").stdout
    assert FULL_TITLE in out and "[evaluate full]" in out, out
    results = json.loads((wd / "results.json").read_text())
    full = results["reference"]["full"]
    assert results["request"]["full_reference"] is True and "random" not in results["reference"]
    held = results["provenance"]["validation"]
    assert full["synset"]["images"] == held["train_size"] > 20
    assert len(full["results"]["MLP"]["task"]["accs"]) == 2
