"""Tests for elf_jax.teacher: training on real mnist5k (tiny), snapshots, resume, experts."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from elf_jax.teacher import (load_teacher, load_trajectory, read_manifest, test_accuracy,
                             train_experts, train_teacher)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = Path(__file__).resolve().parents[1]
N_TRAIN = 768
EPOCHS = 3
# the same settings in-process and in the killed subprocess
SETTINGS = dict(epochs=EPOCHS, model_kwargs={"width": 16}, dsa_strategy="none",
                batch_size=128, seed=0, progress=False)


def _data():
    from elf_jax.data import load

    tr, te = load("mnist5k", "train"), load("mnist5k", "test")
    idx = np.random.default_rng(0).permutation(len(tr))[:N_TRAIN]
    return tr.subset(np.sort(idx)), te.subset(np.arange(500))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train, test = _data()
    wd = tmp_path_factory.mktemp("teacher")
    seen = []
    traj = train_teacher("ConvNet", train, workdir=wd, test_dataset=test, eval_every=1,
                         callback=lambda e, ep, m: seen.append((e, ep)), **SETTINGS)
    return traj, wd, train, test, seen


def test_snapshots_and_accuracy(trained):
    traj, wd, train, test, seen = trained
    assert seen == [(0, 1), (0, 2), (0, 3)]
    steps = sorted(int(p.name) for p in (wd / "expert_000" / "trajectory").iterdir()
                   if p.name.isdigit())
    assert steps == [0, 1, 2, 3]
    assert not (wd / "expert_000" / "resume").exists()  # removed once complete
    m = read_manifest(wd)
    assert m["format"] == "elf_jax.trajectory/2" and m["stage"] == "teacher" and m["net_name"] == "ConvNet"
    assert m["num_classes"] == 10 and m["model_kwargs"] == {"width": 16}
    assert m["momentum"] == 0.9 and m["weight_decay"] == 5e-4 and m["epochs"] == EPOCHS
    accs = [h["test_acc"] for h in traj.history[0]]
    net0, v0 = load_teacher(wd, 0)
    acc0 = test_accuracy(net0, v0, test.images, test.labels)
    assert acc0 < 0.3  # init: about chance
    assert accs[-1] > 0.5 and accs[-1] > acc0 + 0.3, accs  # well above chance (0.1)
    assert traj.test_acc == [accs[-1]] and traj.test_accs == traj.test_acc
    # load_teacher reproduces the recorded accuracy; soft labels work too
    net, v = load_teacher(wd, EPOCHS)
    assert set(v) == {"params"}
    assert test_accuracy(net, v, test.images, test.labels) == pytest.approx(accs[-1])
    soft = np.eye(10, dtype=np.float32)[test.labels]
    assert test_accuracy(net, v, test.images, soft, batch_size=64) == pytest.approx(accs[-1])
    # trajectories: one variables dict per epoch, all different
    tr = load_trajectory(wd)
    assert len(tr) == EPOCHS + 1
    w = [np.asarray(t["params"]["classifier"]["kernel"]) for t in tr]
    assert all(not np.array_equal(w[i], w[i + 1]) for i in range(EPOCHS))
    np.testing.assert_array_equal(w[-1], np.asarray(v["params"]["classifier"]["kernel"]))


def test_rerun_complete_is_noop_and_mismatch(trained):
    traj, wd, train, test, _ = trained
    seen = []
    again = train_teacher("ConvNet", train, workdir=wd, test_dataset=test,
                          callback=lambda *a: seen.append(a), **SETTINGS)
    assert seen == [] and again.test_acc == traj.test_acc
    assert not (wd / "expert_000" / "resume").exists()
    with pytest.raises(ValueError, match=r"lr=0\.01.*lr=0\.05.*another workdir"):
        train_teacher("ConvNet", train, workdir=wd, **{**SETTINGS, "lr": 0.05})
    # the same shapes and name but other images: never resumed or reused
    other = train.subset(np.arange(len(train))[::-1])
    with pytest.raises(ValueError, match=r"data_hash="):
        train_teacher("ConvNet", other, workdir=wd, **SETTINGS)


def test_load_errors(trained, tmp_path):
    _, wd, *_ = trained
    with pytest.raises(FileNotFoundError, match="train_teacher"):
        load_teacher(tmp_path / "nothing", 1)
    with pytest.raises(ValueError, match="no snapshot for epoch 7"):
        load_teacher(wd, 7)
    with pytest.raises(ValueError, match="experts 0..0"):
        load_teacher(wd, 1, expert=3)


def test_resume_after_sigkill(trained, tmp_path):
    """A real SIGKILL after epoch 2; the re-run continues at epoch 3 and ends bit-identical."""
    traj, ref_wd, *_ = trained
    wd = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_teacher import SETTINGS, _data
        from elf_jax.teacher import train_teacher

        def cb(expert, epoch, meta):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        train, test = _data()
        train_teacher("ConvNet", train, workdir={str(wd)!r}, callback=cb, **SETTINGS)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    steps = sorted(int(p.name) for p in (wd / "expert_000" / "trajectory").iterdir()
                   if p.name.isdigit())
    assert steps == [0, 1, 2]
    train, _ = _data()
    seen = []
    train_teacher("ConvNet", train, workdir=wd, callback=lambda e, ep, m: seen.append(ep),
                  **SETTINGS)
    assert seen == [3]
    for epoch in (2, 3):
        _, a = load_teacher(wd, epoch)
        _, b = load_teacher(ref_wd, epoch)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mtt_experts(tmp_path):
    train, _ = _data()
    train = train.subset(np.arange(256))
    try:
        import elf_jax.augment  # noqa: F401
        dsa = "color_crop_cutout_flip_scale_rotate"
    except ImportError:
        dsa = "none"
    out = train_experts("ConvNet", train, epochs=1, num_experts=2, workdir=tmp_path / "mtt",
                        model_kwargs={"width": 8, "norm": "batchnorm"}, batch_size=128,
                        dsa_strategy=dsa, progress=False)
    m = json.loads((tmp_path / "mtt" / "trajectory.json").read_text())
    assert m["momentum"] == 0.0 and m["weight_decay"] == 0.0 and not m["lr_decay_at_half"]
    assert m["num_experts"] == 2 and out.num_experts == 2 and m["dsa_strategy"] == dsa
    t0, t1 = load_trajectory(tmp_path / "mtt", 0), load_trajectory(tmp_path / "mtt", 1)
    assert len(t0) == len(t1) == 2
    assert "batch_stats" in t0[1]  # BatchNorm statistics are part of the snapshot
    k0 = np.asarray(t0[0]["params"]["classifier"]["kernel"])
    k1 = np.asarray(t1[0]["params"]["classifier"]["kernel"])
    assert not np.array_equal(k0, k1)  # experts start from different initializations
    assert all(np.isfinite(h["train_loss"]) for h in out.history[0] + out.history[1])


@pytest.mark.numerics
def test_scan_and_host_engines_agree():
    """A teacher's epochs in the engine: scan (GPU default) and host (CPU default) agree."""
    import jax.numpy as jnp

    from elf_jax.models import get_model
    from elf_jax.train.protocol import TrainProtocol
    from elf_jax.train.runner import fit, init_states

    train, _ = _data()
    data = {"images": np.asarray(train.images[:256]), "labels": np.asarray(train.labels[:256])}
    net = get_model("ConvNet", 10, width=8)
    protocol = TrainProtocol(batch_size=128, epochs=2, dsa_strategy="none", mode="task")
    out = {}
    for engine in ("host", "scan"):
        states = init_states(net, protocol, jax.random.key(0), 1, jnp.asarray(data["images"][:1]))
        out[engine] = fit(net, protocol, data, states, num_epochs=1, engine=engine, progress=False)
    np.testing.assert_allclose(out["host"][1]["loss"], out["scan"][1]["loss"], rtol=1e-5)
    leaves = [jax.tree.leaves(out[k][0].params) for k in ("host", "scan")]
    for a, b in zip(*leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert int(out["scan"][0].step[0]) == 2 and int(out["scan"][0].epoch[0]) == 1


def test_old_trajectory_is_refused_for_training_but_loads(trained, tmp_path):
    import shutil

    _, wd, train, *_ = trained
    old = tmp_path / "old"
    shutil.copytree(wd, old)
    m = read_manifest(old)
    m["format"] = "elf_jax.trajectory/1"
    (old / "trajectory.json").write_text(json.dumps(m))
    load_teacher(old, EPOCHS)  # its weights are still weights
    with pytest.raises(ValueError, match="cannot be continued|not continued"):
        train_teacher("ConvNet", train, workdir=old, **SETTINGS)
