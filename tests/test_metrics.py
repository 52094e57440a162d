"""Training curves as TensorBoard event files (elf_jax.metrics), read back here with the
event protos tensorboardX ships (the TFRecord framing: length, its CRC, the Event, its CRC)."""

import struct
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

from elf_jax.elf import cross_evaluate
from elf_jax.metrics import Curves
from elf_jax.train.protocol import TrainProtocol


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} of every event file in `run_dir`."""
    from tensorboardX.proto import event_pb2

    out = defaultdict(list)
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out[v.tag].append((event.step, v.simple_value))
    return dict(out)


def test_every_evaluation_run_writes_its_epochs_and_test_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 16, 16, 3)).astype(np.float32)
    y = (np.arange(9) % 3).astype(np.int32)
    p = TrainProtocol(epochs=3, batch_size=4, dsa_strategy="none")
    curves = Curves(tmp_path / "tb")
    out = cross_evaluate(["ConvNet"], x, y, x, y, modes=("task",), protocol=p, repeats=2,
                         key=jax.random.PRNGKey(0), model_overrides={"width": 8},
                         strategy="sequential", progress=False, checkpoint_every=2,
                         curves=curves)
    curves.close()
    entry = out["results"]["ConvNet"]["task"]
    for r in range(2):
        s = read_scalars(tmp_path / "tb" / f"ConvNet_task_r{r}")
        assert [step for step, _ in s["train/loss"]] == [0, 1, 2, 3]  # epochs 0..E
        np.testing.assert_allclose(s["train/loss"][-1][1], entry["final_train_loss"][r],
                                   rtol=1e-6)
        assert s["test/acc"] == [(3, np.float32(entry["accs"][r]))]
        lrs = [v for _, v in s["train/lr"]]  # lr x0.1 after epoch E//2 + 1 = 2
        np.testing.assert_allclose(lrs, [0.01, 0.01, 0.01, 0.001], rtol=1e-6)
        assert all(v > 0 for _, v in s["train/images_per_second"])


def test_curves_off_write_nothing(tmp_path):
    from elf_jax import pipeline
    from elf_jax.config import demo_config
    from elf_jax.synset import SyntheticSet

    c = demo_config()
    c.log.tensorboard = False
    c.eval.pool, c.eval.modes, c.eval.epochs, c.eval.repeats = ("MLP",), ("task",), 1, 1
    x = np.zeros((10, 28, 28, 1), np.float32) - 0.4
    pipeline.set_logger(lambda line: None)
    try:
        pipeline.stage_evaluate(pipeline.Run(c, tmp_path), SyntheticSet(x, np.arange(10)), banks={})
    finally:
        pipeline.set_logger(print)
    assert (tmp_path / "results.json").exists() and not (tmp_path / "tb").exists()


def test_the_curve_hook_adds_no_device_transfer(tmp_path):
    """The hook runs at the engine's existing once-per-chunk sync on host arrays: under
    JAX's transfer guard it must not move anything between host and device."""
    from elf_jax.metrics import epoch_logger
    from elf_jax.models import get_model
    from elf_jax.train.runner import run_evaluation

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    y = (np.arange(8) % 2).astype(np.int32)
    p = TrainProtocol(epochs=3, batch_size=4, dsa_strategy="none", mode="task")
    curves = Curves(tmp_path / "tb")
    hook = epoch_logger(curves, ["r0"], len(x), lambda e: p.lr_at(e))
    calls = []

    def guarded(done, states, metrics):
        calls.append(done)
        with jax.transfer_guard("disallow"):
            hook(done, states, metrics)

    run_evaluation(get_model("ConvNet", 2, width=8), p, x, y, x, y, repeats=1,
                   key=jax.random.PRNGKey(0), chunk_epochs=2, progress=False, on_chunk=guarded)
    curves.close()
    assert calls == [2, 4]  # one call per chunk of 2 epochs (epochs 0..3)
    assert [s for s, _ in read_scalars(tmp_path / "tb" / "r0")["train/loss"]] == [0, 1, 2, 3]
