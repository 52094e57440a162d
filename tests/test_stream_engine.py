"""The training engine on a streamed split (``elf_jax.train.streaming``) against the engine
on the same split in memory: the host engine (the CPU default) runs one step executable on
the same rows from either source, so ``fit`` and ``train_teacher`` (parameters, losses, test
accuracy on a streamed and an in-memory test split) are equal bit for bit; the scan engine's
streamed program (groups of 3 and 1 minibatches and the last partial batch) is another
program than its in-memory scan, equal to float32 rounding (``_float32.py``). A streamed
teacher killed with SIGKILL after its first epoch and resumed ends as an uninterrupted one.
Streamed sets that cannot be trained as asked are refused with one line.

Data: the tiny local TFDS dataset of ``_tfds_fixtures`` (48 train / 16 test 8x8x3 images, 4
classes), prepared once in a module-scoped data_dir. This file is also the script of the
subprocesses (the killed teacher; a 2-device mesh), which share one persistent compilation
cache: the second one does not compile again.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import _tfds_fixtures as fx  # noqa: E402
from _float32 import U, assert_rounding_close, float_scale, scaled_error  # noqa: E402
from _sigkill import kill_when_written  # noqa: E402

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it

NAME = fx.TEST_INFO.name
BATCH = 10  # 48 rows: 4 full batches and a last one of 8
DSA = "flip_crop"  # random per step (so the step keys matter), and quick to compile
EPOCHS = 2
ENGINES = ("host", "scan")
# the teacher's protocol equals _protocol(): fit's host engine compiles once for both
TEACHER = dict(epochs=EPOCHS, batch_size=BATCH, dsa_strategy=DSA,
               model_kwargs={"width": 8, "depth": 2}, progress=False)
KILL_EPOCHS = 6  # lr decay and momentum reset after epoch 4: after the resume


def _protocol():
    from elf_jax.train import TrainProtocol

    return TrainProtocol(mode="task", batch_size=BATCH, epochs=EPOCHS, dsa_strategy=DSA)


def _net():
    from elf_jax.models import get_model

    return get_model("ConvNet", fx.NUM_CLASSES, width=8, depth=2)


def _splits(data_dir, split):
    """``(streamed, in memory)`` of ``split``."""
    from elf_jax.data.stream import open_split

    return (open_split(NAME, split, mode="stream", data_dir=data_dir, download=False),
            open_split(NAME, split, mode="memory", data_dir=data_dir, download=False,
                       cache=False))


def _states(repeats, seed=5):
    import jax

    from elf_jax.train.runner import init_states

    return init_states(_net(), _protocol(), jax.random.key(seed), repeats,
                       np.zeros((1,) + fx.SHAPE, np.float32))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The prepared tiny dataset, registered while this module's tests run."""
    d = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:
        fx.register(mp)
        from elf_jax.data.stream import open_split

        open_split(NAME, "train", mode="stream", data_dir=d, download=True)  # prepares it
        yield d


@pytest.fixture(scope="module")
def train(data_dir):
    return _splits(data_dir, "train")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _leaves(tree):
    import jax

    return [np.asarray(v) for v in jax.tree.leaves(jax.device_get(tree))]


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) > 4
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _fit(images, labels, engine):
    """``fit`` with ``engine`` for 2 repeats: the host engine one epoch per call (as the
    teacher), the scan engine both in one; on a stream, groups of 3 and 1 full minibatches
    and the last one of 8 rows (stream_steps=3)."""
    from elf_jax.train.runner import fit

    st, hist, info = fit(_net(), _protocol(), {"images": images, "labels": labels}, _states(2),
                         num_epochs=EPOCHS, engine=engine, stream_steps=3,
                         chunk_epochs=1 if engine == "host" else EPOCHS, progress=False)
    assert info["engine"] == engine
    return _leaves(st), {k: np.asarray(v) for k, v in hist.items()}


def test_host_engine_trains_a_stream_with_the_in_memory_program(train):
    """One step executable fed the same rows from memory or from the files: bit for bit."""
    from elf_jax.train import runner

    streamed, memory = train
    np.testing.assert_array_equal(streamed.labels, memory.labels)
    mem_leaves, mem_hist = _fit(memory.images, memory.labels, "host")
    steps_compiled = runner._batch_step._cache_size()
    leaves, hist = _fit(streamed, memory.labels, "host")
    assert runner._batch_step._cache_size() == steps_compiled  # no step program of its own
    assert len(leaves) == len(mem_leaves) > 4
    for i, (x, y) in enumerate(zip(leaves, mem_leaves)):
        np.testing.assert_array_equal(x, y, err_msg=f"leaf {i}")
    assert mem_hist["loss"].shape == (2, EPOCHS)
    for k in mem_hist:
        np.testing.assert_array_equal(hist[k], mem_hist[k], err_msg=k)
    assert not np.array_equal(mem_leaves[0][0], mem_leaves[0][1])  # each repeat its own run


#: The scan engine's streamed run (groups of minibatches) against its in-memory run (one scan
#: over the chunk), in units of float32 rounding of the state's scale: 10 SGD steps, each a
#: gradient of sums over up to ~5,000 products that the two programs may add in other
#: orders. Measured on an AMD EPYC (AVX2), 2026-12-07: at most 2.7 units at the tests'
#: fast-compile settings (1 ulp in 4 of 16 biases at XLA's defaults); one training label
#: changed moves the state by ~30,000 units or more (the test checks > 100x this bound).
SCAN_STREAM_UNITS = 64


def test_scan_engine_streamed_equals_in_memory_to_float32_rounding(train):
    """Two programs (groups of 3 minibatches vs one scan over the chunk), the same math."""
    streamed, memory = train
    mem_leaves, mem_hist = _fit(memory.images, memory.labels, "scan")
    leaves, hist = _fit(streamed, memory.labels, "scan")
    assert len(leaves) == len(mem_leaves) > 4
    scale = float_scale(mem_leaves)  # errors against the state's scale (see _float32.py)
    for i, (x, y) in enumerate(zip(leaves, mem_leaves)):
        assert_rounding_close(x, y, units=SCAN_STREAM_UNITS, scale=scale, err_msg=f"leaf {i}")
    for k in ("loss", "task", "acc"):
        assert_rounding_close(hist[k], mem_hist[k], units=SCAN_STREAM_UNITS, err_msg=k)
    # the bound is far below what one wrong row does: one label changed, the same program
    labels = np.array(memory.labels)
    labels[0] = (labels[0] + 1) % fx.NUM_CLASSES
    wrong, _ = _fit(memory.images, labels, "scan")
    worst = max(scaled_error(x, y, scale) for x, y in zip(wrong, mem_leaves)) / U
    assert worst > 100 * SCAN_STREAM_UNITS, worst


def test_teacher_streamed_equals_in_memory(train, data_dir, tmp_path):
    """The host engine (the CPU default) and one test-accuracy executable: bit for bit."""
    from elf_jax.teacher import load_teacher, train_teacher
    from elf_jax.train.runner import test_accuracy

    streamed, memory = train
    test_s, test_m = _splits(data_dir, "test")
    rs = train_teacher("ConvNet", streamed, workdir=tmp_path / "s", test_dataset=test_s, **TEACHER)
    rm = train_teacher("ConvNet", memory, workdir=tmp_path / "m", test_dataset=test_m, **TEACHER)
    _, vs = load_teacher(tmp_path / "s")
    net, vm = load_teacher(tmp_path / "m")
    _assert_same(vs, vm)
    assert rs.history == rm.history  # per epoch: loss, accuracy, lr, test accuracy
    assert rs.test_acc[0] is not None and rs.test_acc == rm.test_acc
    # a trained network's accuracy read from the files == from memory (3 batches, the last
    # padded), and == the teacher's own at its batch size (one executable each)
    acc = test_accuracy(net, vs, test_s, test_s.labels, batch_size=6)
    assert acc == test_accuracy(net, vs, test_m.images, test_m.labels, batch_size=6)
    assert test_accuracy(net, vs, test_s, test_s.labels) == rs.test_acc[0]


# ------------------------------------------------------------------------- subprocesses
def _teacher_main(data_dir, workdir, out, ref_workdir=""):
    """The streamed teacher in ``workdir`` (resuming what is there), its final parameters and
    per-epoch losses saved to ``out``; with ``ref_workdir``, then an uninterrupted run there
    (same process) saved to ``out`` + ``.ref.npz``."""
    import jax

    from elf_jax.teacher import load_teacher, train_teacher

    streamed, _ = _splits(data_dir, "train")
    for wd, path in ((workdir, out), (ref_workdir, f"{out}.ref.npz")):
        if not wd:
            continue
        trained = []  # the epochs this process trains (a resumed run skips the saved ones)
        r = train_teacher("ConvNet", streamed, workdir=wd, **{**TEACHER, "epochs": KILL_EPOCHS},
                          callback=lambda expert, epoch, meta: trained.append(epoch))
        _, v = load_teacher(wd)
        np.savez(path, trained=trained, loss=[h["train_loss"] for h in r.history[0]],
                 **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(v))})


def _mesh_refusal_main(data_dir):
    """A streamed set on a mesh with 2 runs: refused, one line (printed for the test)."""
    from elf_jax.parallel import ParallelConfig
    from elf_jax.train.runner import fit

    streamed, _ = _splits(data_dir, "train")
    try:
        fit(_net(), _protocol(), {"images": streamed, "labels": streamed.labels}, _states(2),
            placement=ParallelConfig(parallel="shard_map", runs=2, data=1), progress=False)
    except ValueError as e:
        print("REFUSED " + str(e).replace("\n", "\\n"), flush=True)


def _popen(cache, *args, devices=1, **kw):
    """This file as a child process (the tests' XLA settings, ``devices`` CPU devices)."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(HERE.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(HERE), *map(str, args)], env=env, **kw)


def test_teacher_killed_and_resumed_is_exact(data_dir, compile_cache, tmp_path):
    wd = tmp_path / "killed"
    proc = _popen(compile_cache, "teacher", data_dir, wd, tmp_path / "killed.npz",
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # killed when the engine's checkpoint after epoch 1 is committed (else raise KILL_EPOCHS)
    kill_when_written(proc, wd / "expert_000" / "resume" / "1")
    assert not (tmp_path / "killed.npz").exists()
    # the same call again resumes; then, in that process, an uninterrupted run is the reference
    out = tmp_path / "resumed.npz"
    proc = _popen(compile_cache, "teacher", data_dir, wd, out, tmp_path / "ref",
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.communicate(timeout=300)[0].decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    a, b = np.load(out), np.load(f"{out}.ref.npz")
    assert list(b["trained"]) == list(range(1, KILL_EPOCHS + 1))
    resumed_after = int(a["trained"][0]) - 1  # the epochs the killed process had saved
    assert 1 <= resumed_after < KILL_EPOCHS
    assert list(a["trained"]) == list(range(resumed_after + 1, KILL_EPOCHS + 1))
    leaves = [k for k in b.files if k.startswith("leaf")]
    assert len(leaves) > 4 and len(b["loss"]) == KILL_EPOCHS
    for k in leaves + ["loss"]:  # the history of the epochs before the kill survives too
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_streamed_refusals(train, data_dir, compile_cache):
    from elf_jax.train.runner import fit

    streamed, memory = train
    data = {"images": streamed, "labels": memory.labels}
    cases = [({"strategy": "vmap"}, data, "repeat strategy 'vmap' needs the training set in memory"),
             ({}, {**data, "features": np.zeros((48, 2, 2, 4), np.float32)},
              r"carries images and labels only \(got \['features'\]\)")]
    for kw, d, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            fit(_net(), _protocol(), d, _states(2), progress=False, **kw)
        assert "\n" not in str(e.value)
    # a mesh with 2 runs needs 2 devices: a subprocess
    proc = _popen(compile_cache, "mesh_refusal", data_dir, devices=2, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    refused = [l[8:] for l in stdout.splitlines() if l.startswith("REFUSED ")]
    assert refused, stderr[-3000:]
    assert "set parallel.runs=1 (got runs=2)" in refused[0] and "\\n" not in refused[0]


def test_another_split_reuses_the_compiled_training_steps(data_dir, train):
    """The engine's compiled steps are cached by step and minibatch shape: the same
    net and protocol on another streamed split (the test split: 16 rows, another epoch plan) compile
    no training step again, only what depends on the split's size (its permutation). They
    did: the memory-cap test's large run compiled its teacher's steps a second time."""
    import jax

    from elf_jax.train.runner import fit

    streamed, _ = train
    test_split, _ = _splits(data_dir, "test")
    protocol = _protocol().replace(batch_size=8)  # 48 and 16 rows: full minibatches of 8
    compiled = []

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name", "?"))

    steps = []
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for split in (streamed, test_split):
            compiled.clear()
            fit(_net(), protocol, {"images": split, "labels": split.labels}, _states(1),
                num_epochs=1, engine="host", stream_steps=1, chunk_epochs=1, progress=False)
            steps.append([name for name in compiled if "_batch_step" in name])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert steps[0], compiled  # the first split compiles its training step
    assert steps[1] == [], steps[1]


if __name__ == "__main__":
    from elf_jax.data import registry

    registry.REGISTRY[NAME] = fx.TEST_INFO  # the dataset the parent test prepared
    mains = {"teacher": _teacher_main, "mesh_refusal": _mesh_refusal_main}
    mains[sys.argv[1]](*sys.argv[2:])


def test_prefetcher_yields_every_group_then_stops_and_hands_on_errors(train):
    """The reader of an epoch: every group once, in order, then StopIteration (a consumer
    iterating it to the end must not wait forever); a read error reaches the consumer."""
    from elf_jax.parallel.placement import Placement
    from elf_jax.train import streaming

    split = train[0]
    perm = np.random.default_rng(0).permutation(len(split))
    groups = streaming._groups(4, BATCH, 8, 3)  # 3 + 1 full batches, the last of 8
    put = streaming._put_fn(Placement())
    got = list(streaming._Prefetcher(split, split.labels, perm, groups, put))
    assert [u8.shape[:2] for u8, _ in got] == [(3, BATCH), (1, BATCH), (1, 8)]
    rows = perm[: 4 * BATCH + 8]
    np.testing.assert_array_equal(np.concatenate([np.asarray(y).reshape(-1) for _, y in got]),
                                  split.labels[rows])
    np.testing.assert_array_equal(np.concatenate([np.asarray(u).reshape((-1,) + u.shape[2:])
                                                  for u, _ in got]), split.read(rows))

    def broken(source, labels, rows):
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(streaming._Prefetcher(split, split.labels, perm, groups, broken))
