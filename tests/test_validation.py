"""The validation split (issue 29): held out of the real training split, class-balanced and
seeded, never trained on, and the split every choice reads; the test split only reports.
The reference preset chooses on the test split, and the report says which split chose."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tfds_fixtures as fx  # noqa: E402

from elf_jax.data import load  # noqa: E402
from elf_jax.data.validation import hold_out, validation_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_rows_are_class_balanced_seeded_and_leave_every_class_some():
    labels = np.repeat(np.arange(5), [10, 20, 3, 2, 1]).astype(np.int32)
    rows = validation_rows(labels, 5, 0.1, seed=0)
    assert np.bincount(labels[rows], minlength=5).tolist() == [1, 2, 1, 1, 0]
    assert np.array_equal(rows, validation_rows(labels, 5, 0.1, seed=0))  # the seed alone
    assert not np.array_equal(rows, validation_rows(labels, 5, 0.1, seed=1))
    assert validation_rows(labels, 5, 0.0, seed=0).size == 0
    half = validation_rows(labels, 5, 0.5, seed=0)
    assert np.bincount(labels[half], minlength=5).tolist() == [5, 10, 2, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        validation_rows(labels, 5, 0.6, seed=0)


def test_in_memory_parts_partition_the_training_split():
    train = load("mnist5k", "train")
    held = hold_out(train, 0.1, seed=0)
    rows = validation_rows(train.labels, 10, 0.1, 0)
    assert len(held.validation) == 400 and len(held.train) == 3600 and held.record["size"] == 400
    assert np.array_equal(held.validation.images, train.images[rows])
    rest = np.setdiff1d(np.arange(len(train)), rows)
    assert np.array_equal(held.train.images, train.images[rest])  # nothing of it trains
    assert held.validation.split == "validation" and held.train.split == "train"
    assert np.bincount(held.validation.labels).tolist() == [
        round(0.1 * n) for n in np.bincount(train.labels)]
    whole = hold_out(train, 0.0, seed=0)
    assert whole.train is train and whole.validation is None


def test_streamed_parts_read_the_rows_of_the_in_memory_parts(tmp_path, monkeypatch):
    """A streamed split stays streamed: each part reads exactly its file rows."""
    from elf_jax.data.stream import is_streamed, open_split, split_hash

    fx.register(monkeypatch)
    streamed = open_split("elf_test_tiny", "train", mode="stream", data_dir=tmp_path,
                          download=True)
    memory = open_split("elf_test_tiny", "train", mode="memory", data_dir=tmp_path)
    s, m = hold_out(streamed, 0.25, seed=3), hold_out(memory, 0.25, seed=3)
    assert s.record == m.record and s.record["size"] == 12
    assert (s.train.role, s.validation.role, m.validation.role) == ("train", "validation",
                                                                    "validation")
    for a, b in ((s.train, m.train), (s.validation, m.validation)):
        assert is_streamed(a) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.to_space(a.read(np.arange(len(a)))), b.images)
    assert len({split_hash(streamed), split_hash(s.train), split_hash(s.validation)}) == 3


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "elf_jax.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_the_best_set_is_chosen_on_validation_and_the_preset_chooses_on_test(tmp_path):
    """`elf-jax distill` with evaluations: the best set is chosen on the held-out split (its
    accuracies are of those 400 images), and with `validation.fraction=0` on the test split;
    the set records which."""
    from elf_jax.synset import load_synset

    tiny = ["--config", str(ROOT / "configs" / "distill_mnist5k_dm.py"),
            "--config.synset.iterations=2", "--config.synset.eval_every=1",
            "--config.synset.eval_epochs=1", "--config.synset.eval_repeats=1",
            "--config.synset.ipc=1", "--config.synset.batch_real=8",
            "--config.synset.model_kwargs={'width': 8}"]
    out = _cli("distill", "--workdir", str(tmp_path / "v"), *tiny)
    assert "validation: 400 training images held out" in out and "validation acc" in out, out
    best = load_synset(tmp_path / "v" / "distill" / "synset_best")
    assert best.metadata["best_chosen_on"] == "validation"
    accs = [h["acc"] for h in best.metadata["history"]]
    assert all(round(a * 400) == pytest.approx(a * 400, abs=1e-3) for a in accs)  # of 400
    assert json.loads((tmp_path / "v" / "validation.json").read_text())["size"] == 400

    # the library's hook, without the pipeline: validation.fraction 0 chooses on the test split
    import importlib.util

    from elf_jax.distill import distill_from_config

    spec = importlib.util.spec_from_file_location("cfg", tiny[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.synset.iterations, c.synset.eval_every, c.synset.eval_epochs = 2, 1, 1
    c.synset.eval_repeats, c.synset.ipc, c.synset.batch_real = 1, 1, 8
    c.synset.model_kwargs = {"width": 8}
    c.validation.fraction = 0.0
    best = distill_from_config(c, tmp_path / "t")
    assert best.metadata["best_chosen_on"] == "test"
    accs = [h["acc"] for h in best.metadata["history"]]
    assert all(abs(a * 1000 - round(a * 1000)) < 1e-3 for a in accs)  # of the 1,000 test images


def test_each_architecture_and_mode_chooses_its_lr_on_validation(tmp_path):
    """`eval.lr_grid`: every lr of the grid trains (one program) and is tested on the 400
    held-out images; the best mean is chosen per (arch, mode), then the repeats train at it
    and are tested on the test split; results, report and budget say so."""
    wd = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "demo_mnist5k.py"),
            "--config.synset.source=real_random", "--config.synset.ipc=2",
            "--config.teacher.epochs=1", "--config.teacher.feature_epoch=1",
            "--config.eval.pool=('ConvNet',)", "--config.eval.width=32",
            "--config.eval.epochs=2", "--config.eval.repeats=1",
            "--config.eval.lr_grid=(0.0001, 0.05)", "--config.eval.lr_grid_repeats=2"]
    out = _cli("all", "--workdir", str(wd), *args)
    assert "evaluation lr chosen on the validation split from (0.0001, 0.05)" in out, out
    results = json.loads((wd / "results.json").read_text())
    assert results["request"]["lr_grid"] == {"lrs": [0.0001, 0.05], "on": "validation",
                                             "repeats": 2}
    for mode, e in results["results"]["ConvNet"].items():
        t = e["lr_tuning"]
        assert t["on"] == "validation" and t["grid"] == [0.0001, 0.05]
        assert len(t["accs"]) == 2 and all(len(a) == 2 for a in t["accs"])
        assert t["chosen"] == t["grid"][int(np.argmax(t["mean"]))] == e["lr"], (mode, t, e)
        for a in (x for row in t["accs"] for x in row):  # of the 400 validation images
            assert abs(a * 400 - round(a * 400)) < 1e-3
        assert abs(e["accs"][0] * 1000 - round(e["accs"][0] * 1000)) < 1e-3  # of the test split
    # 2 lrs x 2 runs x 3 epochs (0..2) of one batch, per mode
    assert results["budget"]["lr_grid_steps"] == 2 * 2 * 3 * 2
    assert "choosing the lr 24 steps" in (wd / "results.md").read_text()


def test_a_bad_lr_grid_is_refused_before_anything_runs():
    from elf_jax.config import check_config, demo_config

    c = demo_config()
    for grid, words in (((0.01, 0.01), "repeated"), ((0.01, -1.0), "> 0"), (("a",), "> 0")):
        c.eval.lr_grid = grid
        with pytest.raises(ValueError, match=words):
            check_config(c)
    c.eval.lr_grid, c.eval.use_learned_lr = (0.01, 0.03), True
    with pytest.raises(ValueError, match="use_learned_lr"):
        check_config(c)


def test_a_teacher_that_saw_the_validation_images_is_refused(tmp_path):
    """A teacher trained on the whole split (validation.fraction 0, or before the split
    existed) is not reused by `features` for a config that holds images out: one line naming
    the validation settings and the --overwrite that retrains it."""
    wd = str(tmp_path / "run")
    args = ["--config", str(ROOT / "configs" / "demo_mnist5k.py"), "--workdir", wd,
            "--config.synset.source=real_random", "--config.synset.ipc=1",
            "--config.teacher.epochs=1", "--config.teacher.feature_epoch=1",
            "--config.eval.pool=('ConvNet',)"]
    _cli("train-teacher", *args, "--config.validation.fraction=0")
    proc = subprocess.run([sys.executable, "-m", "elf_jax.cli", "features", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "validation {'fraction': 0.0, 'seed': 0} vs " \
        "{'fraction': 0.1, 'seed': 0}" in line and "--overwrite=teacher" in line, proc.stderr
    assert not (tmp_path / "run" / "synset").exists()  # refused before making anything
    assert "[features] ConvNetW32 epoch 1: bank" in _cli("features", *args,
                                                         "--config.validation.fraction=0")
