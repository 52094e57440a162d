"""Lambda sweeps (`elf_jax.elf.sweep`, `elf-jax sweep`): a grid of ELF trainings is the runs
of one compiled program, each grid point's result equals a separate `evaluate_synset` run
with its lambdas, and the command writes its table and heatmap and resumes."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from elf_jax.elf import evaluate_synset, lambda_sweep
from elf_jax.elf.summary import paired_gain
from elf_jax.train import TrainProtocol

ROOT = Path(__file__).resolve().parents[1]
K = 5
LF, LR = (0.0, 1.0), (0.5, 2.0)
P = TrainProtocol(epochs=2, batch_size=5, dsa_strategy="crop_flip")  # 3 epochs of 2 steps
KW = dict(repeats=2, key=jax.random.PRNGKey(3), model_overrides={"width": 8}, progress=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 16, 16, 1)).astype(np.float32)
    y = (np.arange(10) % K).astype(np.int32)
    tx = rng.normal(size=(30, 16, 16, 1)).astype(np.float32)
    ty = (np.arange(30) % K).astype(np.int32)
    f = np.abs(rng.normal(size=(10, 2, 2, 8))).astype(np.float32)
    return x, y, tx, ty, f


def test_every_point_equals_a_separate_run_and_resumes(data, tmp_path, monkeypatch):
    """Repeat r of every point starts as evaluate_synset's repeat r (same weights, data
    order, DSA draws), so each point reproduces the separate run with its lambdas; the
    baseline is evaluate_synset in mode task and the gains are paired over repeats. The
    sweep is stopped after its first checkpoint and started again: it resumes."""
    from elf_jax.train import runner

    x, y, tx, ty, f = data
    save = runner._save

    def save_then_die(mngr, workdir, epoch, *args):
        save(mngr, workdir, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt  # as if killed after the first checkpoint

    kw = dict(lambda_front=LF, lambda_rear=LR, protocol=P, workdir=tmp_path, chunk_epochs=1,
              checkpoint_every=1, **KW)
    monkeypatch.setattr(runner, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        lambda_sweep("ConvNet", *data, **kw)
    monkeypatch.setattr(runner, "_save", save)
    sweep = lambda_sweep("ConvNet", *data, baseline=True, **kw)
    assert sweep["resumed_from"] == 1
    assert sweep["lambda_front"] == list(LF) and sweep["lambda_rear"] == list(LR)
    assert np.shape(sweep["accs"]) == (2, 2, 2) and sweep["train_loss"].shape == (2, 2, 2, 3)
    for i, a in enumerate(LF):
        for j, b in enumerate(LR):
            one = evaluate_synset("ConvNet", x, y, tx, ty, f,
                                  P.replace(lambda_front=a, lambda_rear=b), **KW)
            # the CPU's host engine runs the sweep's runs and the separate run with one step
            # executable each minibatch (lambdas are state, not program): equal by construction
            assert sweep["accs"][i][j] == one["accs"], (a, b)
            np.testing.assert_allclose(sweep["train_loss"][i, j], one["train_loss"],
                                       rtol=1e-5, atol=1e-5)
            assert sweep["mean"][i][j] == pytest.approx(one["mean"])
    # the points differ from each other (the lambdas are used) yet share their start
    assert not np.allclose(sweep["train_loss"][0, 0], sweep["train_loss"][1, 1])
    base = evaluate_synset("ConvNet", x, y, tx, ty, None, P.replace(mode="task"), **KW)
    assert sweep["baseline"]["accs"] == base["accs"]
    assert sweep["gain"][1][0] == paired_gain(base["accs"], sweep["accs"][1][0])
    json.dumps({k: v for k, v in sweep.items() if k != "train_loss"})  # the JSON part
    with pytest.raises(ValueError, match="lambda_rear"):  # another grid: refused, not reused
        lambda_sweep("ConvNet", *data, **{**kw, "lambda_rear": (0.5, 3.0)})


def test_bad_grids_and_modes_are_refused(data):
    for lf, msg in (((), "non-empty"), ((1.0, -0.5), "-0.5"), ((1.0, 1.0), "repeated"),
                    ((float("nan"),), "nan"), ("1", "non-empty")):
        with pytest.raises(ValueError, match=msg):
            lambda_sweep("ConvNet", *data, lambda_front=lf, lambda_rear=(1.0,), protocol=P, **KW)
    with pytest.raises(ValueError, match="ignores the lambdas"):
        lambda_sweep("ConvNet", *data, protocol=P.replace(mode="task"), **KW)

    from elf_jax.config import check_config, demo_config

    for field, value, msg in (("lambda_rear", (0.0, -1.0), "config.sweep.lambda_rear"),
                              ("pool", ("VGG11",), "not in config.eval.pool")):
        c = demo_config()
        c.sweep[field] = value
        with pytest.raises(ValueError, match=msg):
            check_config(c)


# ------------------------------------------------------------------ the pipeline and the CLI
TINY = {"synset.source": "real_random", "synset.ipc": 1, "teacher.epochs": 1,
        "teacher.feature_epoch": 1, "eval.pool": ("ConvNet", "ConvNetBN"), "eval.width": 32,
        "eval.epochs": 1, "eval.repeats": 2, "eval.dsa_strategy": "flip",
        "eval.checkpoint_every": 1, "sweep.lambda_front": (0.0, 1.0), "sweep.lambda_rear": (1.0,),
        "sweep.pool": ("ConvNet",)}


def test_the_sweep_command_writes_its_report_and_resumes(tmp_path):
    from elf_jax import pipeline
    from elf_jax.config import demo_config
    from elf_jax.elf.bank import build_bank, save_bank
    from elf_jax.models import get_model

    config = demo_config()
    for name, value in TINY.items():
        section, field = name.split(".")
        config[section][field] = value
    wd = tmp_path / "wd"
    logged: list = []
    pipeline.set_logger(logged.append)
    try:
        with pytest.raises(FileNotFoundError, match="train-teacher"):  # as `evaluate` does
            pipeline.stage_sweep(pipeline.Run(config, wd))
        run = pipeline.Run(config, wd)
        # the bank of an untrained teacher stands in for the teacher stage (tested elsewhere);
        # the sweep reuses it as `evaluate` would
        synset = pipeline.stage_synset(run)
        teacher = get_model("ConvNetW32", 10)
        variables = teacher.init(jax.random.PRNGKey(0), synset.images[:1])
        save_bank(wd / "banks" / "ConvNetW32", build_bank(
            teacher, variables, synset, teacher_name="ConvNetW32", snapshot_epoch=1))
        first = pipeline.stage_sweep(run)
        # another grid on the same workdir: the old file is named as replaced, and the
        # checkpoints of the other grid are refused (--overwrite=sweep starts over)
        config.sweep.lambda_front = (0.0, 2.0)
        with pytest.raises(ValueError, match="overwrite"):
            pipeline.stage_sweep(pipeline.Run(config, wd))
        assert any("replacing" in m and "sweep.lambda_front" in m for m in logged), logged
    finally:
        pipeline.set_logger(print)
    out = first["results"]["ConvNet"]
    assert set(first["results"]) == {"ConvNet"} and not first["partial"]
    assert np.shape(out["accs"]) == (2, 1, 2) and out["mode"] == "front_rear_task"
    assert first["request"]["sweep"]["lambda_front"] == [0.0, 1.0]
    assert len(out["gain"]) == 2 and len(out["baseline"]["accs"]) == 2
    md = (wd / "sweep.md").read_text()
    assert "lambda_front \\ lambda_rear" in md and "gain over the baseline" in md, md
    assert "## Settings" in md and (wd / "sweep.png").stat().st_size > 0
    assert (wd / "sweep" / "ConvNet" / "grid" / "checkpoints").is_dir()

    # the same sweep from the command line: read back from its checkpoints, not retrained
    flags = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
             for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "elf_jax.cli", "sweep", "--config",
         str(ROOT / "configs" / "demo_mnist5k.py"), "--workdir", str(wd), *flags],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read back from its checkpoints" in proc.stdout, proc.stdout[-3000:]
    assert "lambda_front \\ lambda_rear" in proc.stdout
    again = json.loads((wd / "sweep.json").read_text())["results"]["ConvNet"]
    assert again["accs"] == out["accs"] and again["baseline"]["accs"] == out["baseline"]["accs"]
    assert again["resumed_from"] == 2  # epochs 0..1 done before
    help_ = subprocess.run([sys.executable, "-m", "elf_jax.cli", "--help"], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "  sweep " in help_.stdout


# last in the file: it empties JAX's caches (a test after it would compile again)
def test_the_grid_is_one_compiled_program(data):
    """From empty caches, a 2x2 sweep compiles exactly what a 1x1 sweep compiles (the grid
    adds no program), and under the scan engine the train program, every run of every
    point inside it, is compiled once."""
    compiled = collections.Counter()

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled[kw.get("fun_name", "?")] += 1

    counts = []
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for lf, lr in (((1.0,), (1.0,)), (LF, LR)):
            jax.clear_caches()
            compiled.clear()
            out = lambda_sweep("ConvNet", *data, lambda_front=lf, lambda_rear=lr,
                               protocol=P.replace(dsa_strategy="flip"), engine="scan", **KW)
            assert out["engine"] == "scan" and np.shape(out["accs"]) == (len(lf), len(lr), 2)
            counts.append(dict(compiled))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert counts[1] == counts[0]
    # the scan engine's train program: make_chunk_fn's jitted `mapped` (all runs, all epochs)
    train = {name: n for name, n in counts[1].items() if "mapped" in name}
    assert list(train.values()) == [1], counts[1]
