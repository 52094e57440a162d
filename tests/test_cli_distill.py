"""`elf-jax distill` runs every method from its mnist5k config (tiny settings) and the set
it writes feeds the later stages; `--config.synset.<field>` overrides reach the driver."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elf_jax.checkpoint import StepCheckpoints
from elf_jax.synset import load_synset

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "common": ["--config.synset.ipc=1", "--config.synset.iterations=2",
               "--config.synset.eval_every=0", "--config.synset.checkpoint_every=1",
               "--config.synset.model_kwargs={'width': 8}"],
    "dm": ["--config.synset.batch_real=8", "--config.synset.lr_img=0.5"],
    "dc": ["--config.synset.batch_real=8", "--config.synset.outer_loop=1",
           "--config.synset.inner_loop=1"],
    "dsa": ["--config.synset.batch_real=8", "--config.synset.outer_loop=1",
            "--config.synset.inner_loop=1"],
    "mtt": ["--config.synset.num_experts=1", "--config.synset.expert_train_epochs=2",
            "--config.synset.syn_steps=2", "--config.synset.expert_epochs=1",
            "--config.synset.max_start_epoch=1", "--config.synset.batch_syn=5",
            "--config.synset.lr_lr=2e-05"],
}
TINY["tesla"] = TINY["mtt"]


# dm in CI; dc, dsa, mtt and tesla behind the slow marker to keep `make test` short: their
# drivers are in tests/test_distill.py (MTT's experts in test_teacher.py, a reference buffer
# directory in test_reference_buffers.py), their shipped configs checked in tests/test_cli.py
@pytest.mark.parametrize("method", ["dm", pytest.param("dc", marks=pytest.mark.slow),
                                    pytest.param("dsa", marks=pytest.mark.slow),
                                    pytest.param("mtt", marks=pytest.mark.slow),
                                    pytest.param("tesla", marks=pytest.mark.slow)])
def test_distill_cli(method, tmp_path):
    config = ROOT / "configs" / f"distill_mnist5k_{method}.py"
    cmd = [sys.executable, "-m", "elf_jax.cli", "distill", "--config", str(config),
           "--workdir", str(tmp_path), *TINY["common"], *TINY[method]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    synset = load_synset(tmp_path / "distill" / "synset_best")  # the set the pipeline uses
    assert synset.metadata["method"] == method
    assert synset.images.shape == (10, 28, 28, 1)
    assert synset.ipc == 1
    if method in ("mtt", "tesla"):
        assert synset.lr is not None and synset.lr > 0
    # the settings the driver ran with (its resume metadata) hold the overrides
    ck = StepCheckpoints(tmp_path / "distill" / "checkpoints")
    meta = ck.read_meta(ck.latest_step())
    ck.close()
    overrides = dict(a[len("--config.synset."):].split("=", 1)
                     for a in TINY["common"] + TINY[method])
    reached = {k: meta[k] for k in overrides if k in meta}
    assert reached == {k: ast.literal_eval(overrides[k]) for k in reached}
    assert {"ipc", "model_kwargs"} <= set(reached)
    assert len(reached) >= {"dm": 4, "dc": 5, "dsa": 5}.get(method, 7), reached


def test_unknown_method_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "elf_jax.cli", "distill", "--config",
           str(ROOT / "configs" / "distill_mnist5k_dm.py"), "--workdir", str(tmp_path),
           "--config.synset.method=kip"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "kip" in proc.stderr and "dm" in proc.stderr
