"""Kill an evaluation with SIGKILL after its first checkpoint, start the same command again,
and check that it ends with exactly the accuracies and parameters of an uninterrupted run:
on one device, and data parallel on a (runs=2, data=4) mesh of 8 simulated CPU devices.

The evaluation runs in subprocesses (this file is also the script they run).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _sigkill import kill_when_written  # noqa: E402

EPOCHS = 29  # 30 epochs in chunks of 2, a checkpoint after each chunk


def _main(workdir: str, out: str, placement: str, ref_out: str = "") -> None:
    """Runs the evaluation in ``workdir`` (resuming what is there) and saves it to ``out``;
    with ``ref_out``, then an uninterrupted run without checkpoints in this process too."""
    import jax

    from elf_jax.elf import evaluate_synset
    from elf_jax.parallel import ParallelConfig
    from elf_jax.train import TrainProtocol

    mesh = placement == "mesh"
    n, batch = (16, 8) if mesh else (13, 5)  # on the mesh, batches split over 4 devices
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
    y = (np.arange(n) % 4).astype(np.int32)
    f = np.abs(rng.normal(size=(n, 2, 2, 8))).astype(np.float32)
    p = TrainProtocol(epochs=EPOCHS, batch_size=batch, dsa_strategy="flip_crop")
    for wd, path in ((workdir, out), (None, ref_out)):
        if not path:
            continue
        r = evaluate_synset(
            "ConvNetBN", x, y, x, y, f, p, repeats=2, key=jax.random.PRNGKey(7), workdir=wd,
            chunk_epochs=2, checkpoint_every=2, model_overrides={"width": 8}, progress=False,
            return_states=True,
            parallel=ParallelConfig(parallel="shard_map", runs=2, data=4) if mesh else None,
        )
        st = r["states"]
        leaves = jax.tree.leaves((st.params, st.batch_stats, st.opt_state, st.key, st.epoch))
        np.savez(path, accs=np.asarray(r["accs"]), resumed=-1 if r["resumed_from"] is None
                 else r["resumed_from"], loss=r["train_loss"],
                 **{f"leaf{i}": np.asarray(v) for i, v in enumerate(leaves)})


def _cmd(workdir, out, placement, ref_out=""):
    return [sys.executable, __file__, str(workdir), str(out), placement, str(ref_out)]


def _env(placement):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if placement == "mesh":
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# one device behind the slow marker: the same engine's SIGKILL resume is checked bit for bit by
# tests/test_stream_engine.py (a teacher past its lr decay and momentum reset) and
# tests/test_teacher.py, ELF-mode resume by tests/test_adapter.py and test_evaluate.py
@pytest.mark.parametrize("placement", [pytest.param("one_device", marks=pytest.mark.slow), "mesh"])
def test_sigkill_and_resume_is_exact(tmp_path, placement):
    wd = tmp_path / "run"
    # the interrupted run: SIGKILL as soon as the first checkpoint is committed
    proc = subprocess.Popen(_cmd(wd, tmp_path / "killed.npz", placement), env=_env(placement),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kill_when_written(proc, wd / "checkpoints" / "2")  # else raise EPOCHS
    assert not (tmp_path / "killed.npz").exists()
    # the same command again resumes; then, in that new process, an uninterrupted run
    # without checkpoints is the reference
    res = subprocess.run(_cmd(wd, tmp_path / "resumed.npz", placement, tmp_path / "ref.npz"),
                         env=_env(placement), capture_output=True)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-3000:]
    a, b = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "ref.npz")
    assert 2 <= int(a["resumed"]) < EPOCHS + 1 and int(b["resumed"]) == -1
    np.testing.assert_array_equal(a["accs"], b["accs"])
    leaves = [k for k in b.files if k.startswith("leaf")]
    assert len(leaves) > 5
    for k in leaves:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(a["loss"], b["loss"])  # the history survives the restart too


if __name__ == "__main__":
    _main(*sys.argv[1:])
