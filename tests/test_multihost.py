"""Two processes (jax.distributed on localhost, 2 CPU devices each) == one process with 4.

Each process reads ITS shard of the data with ``make_loader`` (grain sharding by
``jax.process_index()``, local batch = global / 2), and ``DataParallel.put_batch`` assembles
the global batch (process p holds rows [p*b, (p+1)*b)). The reference run is one process
with 4 devices fed the concatenation of both shards. Model: ConvNetBN (width 8, sync BN) on
the embedded 8x8 ``digits`` set, full DSA drawn for the global batch, 3 steps.
Tolerance (two programs: collectives over two processes or over one process's devices):
parameters to 2e-5 absolute, losses to 1e-5 relative, test accuracies to one image. The
training engine (``run_evaluation`` on a ``(runs=2, data=2)`` mesh over the two processes)
is compared the same way, and so is a teacher (``train_teacher``, a ``(runs=1, data=4)``
mesh) trained on a STREAMED split of the tiny local TFDS dataset (``_tfds_fixtures``,
prepared once by the test): each process reads only the rows of its own devices, half of
every epoch, never the other's.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import _tfds_fixtures as fx  # noqa: E402

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it

STEPS, GLOBAL_B = 3, 16
ENGINE_ROWS = 48  # the engine's training (and test) images
TEACHER_B, TEACHER_EPOCHS = 20, 2  # 48 rows: 2 minibatches of 20 and one of 8, over 4 devices


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("ELF_JAX_COORDINATOR", "ELF_JAX_NUM_PROCESSES", "ELF_JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(out):
    return json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])


def test_two_processes_equal_one(tmp_path, monkeypatch):
    from elf_jax.data.stream import open_split

    data_dir = tmp_path / "tfds"  # prepared here once; the processes only read it
    fx.register(monkeypatch)
    open_split(fx.TEST_INFO.name, "train", mode="stream", data_dir=data_dir, download=True)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE), "worker", str(data_dir),
                               str(tmp_path / "teacher_2p"), str(i), str(port)], env=_env(2),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, str(HERE), "single", str(data_dir),
                             str(tmp_path / "teacher_1p")], env=_env(4), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=600)
        finally:
            p.kill()
        assert p.returncode == 0, f"worker failed:\n{o[-2000:]}\n{e[-5000:]}"
        outs.append(_result(o))
    assert single.returncode == 0, single.stderr[-5000:]
    ref = _result(single.stdout)
    assert [o["process_count"] for o in outs] == [2, 2] and ref["process_count"] == 1
    assert [o["devices"] for o in outs] == [4, 4] and ref["devices"] == 4
    for o in outs:
        np.testing.assert_allclose(o["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(o["params"], ref["params"], atol=2e-5)
    assert outs[0]["params"] == outs[1]["params"]  # replicated state
    # the training engine on a (runs=2, data=2) mesh over both processes == one process
    for o in outs:
        np.testing.assert_allclose(o["engine"]["losses"], ref["engine"]["losses"], rtol=1e-5)
        np.testing.assert_allclose(o["engine"]["params"], ref["engine"]["params"], atol=2e-5)
        # parameters equal to rounding (other programs: collectives over two processes)
        # classify the test images alike but for a near-tie: at most one image apart
        gap = np.max(np.abs(np.subtract(o["engine"]["accs"], ref["engine"]["accs"])))
        assert gap <= 1 / ENGINE_ROWS + 1e-9, (o["engine"]["accs"], ref["engine"]["accs"])
    _check_streamed_teacher([o["teacher"] for o in outs], ref["teacher"])


def _check_streamed_teacher(outs, ref):
    """Both processes' teacher == the one-process teacher; each process read its half of
    every epoch's rows, the two halves disjoint, the one process all rows once."""
    n = fx.SPLIT_SIZES["train"]
    for o in outs:
        np.testing.assert_allclose(o["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(o["params"], ref["params"], atol=2e-5)
        # (another program than one process's, as above): at most one test image apart
        assert abs(o["test_acc"] - ref["test_acc"]) <= 1 / fx.SPLIT_SIZES["test"] + 1e-9
    assert len(ref["params"]) > 100 and outs[0]["params"] == outs[1]["params"]
    assert len(ref["reads"]) == TEACHER_EPOCHS
    for e in range(TEACHER_EPOCHS):
        assert ref["reads"][e] == list(range(n))  # every row once
        assert [len(o["reads"][e]) for o in outs] == [n // 2, n // 2]
        first, second = (set(o["reads"][e]) for o in outs)
        assert not first & second and first | second == set(range(n))


def _train(batches_fn):
    import jax

    from elf_jax.models import get_model
    from _data_parallel import DataParallel

    from elf_jax.parallel import ParallelConfig
    from elf_jax.train.protocol import TrainProtocol
    from elf_jax.train.step import init_state

    net = get_model("ConvNetBN", 10, width=8)
    proto = TrainProtocol(batch_size=GLOBAL_B, mode="task")
    st0 = init_state(net, proto, jax.random.key(0), jax.random.key_data(jax.random.key(1)),
                     np.zeros((1, 8, 8, 1), np.float32))
    dp = DataParallel(net, proto, ParallelConfig(parallel="shard_map"))
    st = dp.put_state(st0)
    losses = []
    for i, b in enumerate(batches_fn()):
        st, m = dp.step(st, dp.put_batch({"images": b["image"], "labels": b["label"]}),
                        jax.random.key_data(jax.random.key(100 + i)))
        losses.append(float(np.asarray(m["loss"].addressable_data(0))))
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(dp.get_state(st).params)])
    return {"losses": losses, "params": flat[:: max(1, flat.size // 2000)].tolist(),
            "process_count": jax.process_count(), "devices": jax.device_count()}


def _engine():
    """Two repeats of 2 epochs through ``run_evaluation`` on a (runs=2, data=2) mesh; every
    process passes the same (small, in-memory) set."""
    import jax

    from elf_jax.data import load
    from elf_jax.models import get_model
    from elf_jax.parallel import ParallelConfig
    from elf_jax.train import TrainProtocol, run_evaluation

    d = load("digits", "train")
    x, y = d.images[:ENGINE_ROWS], d.labels[:ENGINE_ROWS]
    net = get_model("ConvNetBN", 10, width=8)
    r = run_evaluation(net, TrainProtocol(batch_size=GLOBAL_B, epochs=1, mode="task"), x, y, x, y,
                       repeats=2, key=jax.random.PRNGKey(3), progress=False, return_states=True,
                       placement=ParallelConfig(parallel="shard_map", runs=2, data=2))
    flat = np.concatenate([np.ravel(v) for v in jax.tree.leaves(r["states"].params)])
    return {"losses": r["train_loss"].ravel().tolist(), "accs": [float(a) for a in r["accs"]],
            # a sample: the workers' RESULT lines must fit a pipe buffer (64 KiB) together
            "params": flat[:: max(1, flat.size // 300)].tolist()}


def _streamed_teacher(data_dir, workdir):
    """A teacher trained on the streamed tiny TFDS split on a ``(runs=1, data=4)`` mesh over
    all devices (both processes' when there are two), its streamed test split evaluated;
    ``reads``: per epoch, the sorted training rows THIS process read."""
    import dataclasses

    import jax

    from elf_jax.data import registry
    from elf_jax.data.stream import StreamedSplit, open_split
    from elf_jax.parallel import ParallelConfig
    from elf_jax.teacher import load_teacher, train_teacher

    registry.REGISTRY[fx.TEST_INFO.name] = fx.TEST_INFO  # the test's dataset
    rows = []  # row indices the engine asked this process for (reads run on its threads)

    class CountingSplit(StreamedSplit):
        """The real split; records the rows each read asks for."""

        def read(self, indices):
            rows.append(np.asarray(indices).ravel().copy())
            return super().read(indices)

    def split(name):
        return open_split(fx.TEST_INFO.name, name, mode="stream", data_dir=data_dir, download=False)

    s = split("train")
    train = CountingSplit(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})
    test = split("test")
    reads = []

    def epoch_done(expert, epoch, meta):  # the next epoch's reads start after this hook
        reads.append(sorted(int(i) for i in np.concatenate(rows)))
        rows.clear()

    r = train_teacher("ConvNet", train, epochs=TEACHER_EPOCHS, workdir=workdir,
                      batch_size=TEACHER_B, dsa_strategy="flip_crop", test_dataset=test,
                      model_kwargs={"width": 8, "depth": 1}, progress=False, callback=epoch_done,
                      parallel=ParallelConfig(parallel="shard_map", runs=1, data=4))
    _, v = load_teacher(workdir)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)])
    return {"losses": [h["train_loss"] for h in r.history[0]], "test_acc": r.test_acc[0],
            "params": flat[:: max(1, flat.size // 300)].tolist(), "reads": reads}


def _loader(shard, count, b):
    from elf_jax.data import make_loader

    it = iter(make_loader("digits", "train", b, seed=7, shard_index=shard, shard_count=count))
    return [next(it) for _ in range(STEPS)]


def worker(data_dir, workdir, pid, port):
    from elf_jax.parallel import distributed

    info = distributed.initialize({"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                                   "process_id": int(pid)})
    assert info["process_count"] == 2
    from elf_jax.data import make_loader

    b = distributed.local_batch_size(GLOBAL_B)

    def batches():  # this process's shard (default shard_index = jax.process_index())
        it = iter(make_loader("digits", "train", b, seed=7))
        return [next(it) for _ in range(STEPS)]

    return {**_train(batches), "engine": _engine(), "teacher": _streamed_teacher(data_dir, workdir)}


def single(data_dir, workdir):
    shards = [_loader(s, 2, GLOBAL_B // 2) for s in range(2)]

    def batches():
        return [{k: np.concatenate([shards[0][i][k], shards[1][i][k]]) for k in ("image", "label")}
                for i in range(STEPS)]

    return {**_train(batches), "engine": _engine(), "teacher": _streamed_teacher(data_dir, workdir)}


if __name__ == "__main__":
    role = sys.argv[1]
    res = worker(*sys.argv[2:]) if role == "worker" else single(*sys.argv[2:])
    print("RESULT " + json.dumps(res), flush=True)
