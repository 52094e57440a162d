"""evaluate_synset / cross_evaluate: input validation and a tiny cross evaluation."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from elf_jax.elf import cross_evaluate, evaluate_synset
from elf_jax.train import TrainProtocol

K = 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 16, 16, 3)).astype(np.float32)
    y = (np.arange(9) % K).astype(np.int32)
    tx = rng.normal(size=(7, 16, 16, 3)).astype(np.float32)
    ty = (np.arange(7) % K).astype(np.int32)
    f8 = np.abs(rng.normal(size=(9, 2, 2, 8))).astype(np.float32)
    return x, y, tx, ty, f8


TINY = TrainProtocol(epochs=1, batch_size=4, dsa_strategy="none")
W8 = {"width": 8}


def test_bank_shape_mismatch_names_both_shapes_and_split(data):
    x, y, tx, ty, f8 = data
    bad = np.zeros((9, 4, 4, 512), np.float32)
    with pytest.raises(ValueError) as e:  # with adapters switched off
        evaluate_synset("ConvNet", x, y, tx, ty, bad, TINY, 1, model_overrides=W8, adapter="off")
    msg = str(e.value)
    assert "(9, 4, 4, 512)" in msg and "(2, 2, 8)" in msg and "front = all conv blocks" in msg
    assert "adapter='auto'" in msg
    with pytest.raises(ValueError, match="needs the teacher feature bank"):
        evaluate_synset("ConvNet", x, y, tx, ty, None, TINY, 1, model_overrides=W8)
    with pytest.raises(ValueError, match="one feature per image"):
        evaluate_synset("ConvNet", x, y, tx, ty, bad[:5], TINY, 1, model_overrides=W8)
    with pytest.raises(ValueError, match="adapter maps NHWC grids"):
        evaluate_synset("ConvNet", x, y, tx, ty, bad.reshape(9, -1), TINY, 1, model_overrides=W8)

    class NoSplit(nn.Module):  # a user's module without front/rear
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(K)(x.reshape(x.shape[0], -1))

    with pytest.raises(ValueError, match="no declared ELF front/rear split"):
        evaluate_synset(NoSplit(), x, y, tx, ty, f8, TINY, 1)


def test_bad_labels_and_nans(data):
    x, y, tx, ty, f8 = data
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        evaluate_synset("ConvNet", x, y + 1, tx, ty, f8, TINY, 1, num_classes=K, model_overrides=W8)
    with pytest.raises(ValueError, match="test set: labels"):
        evaluate_synset("ConvNet", x, y, tx, ty + 5, f8, TINY, 1, num_classes=K, model_overrides=W8)
    xn = x.copy()
    xn[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        evaluate_synset("ConvNet", xn, y, tx, ty, f8, TINY, 1, model_overrides=W8)
    fn = f8.copy()
    fn[1] = np.inf
    with pytest.raises(ValueError, match="feature bank holds"):
        evaluate_synset("ConvNet", x, y, tx, ty, fn, TINY, 1, model_overrides=W8)
    with pytest.raises(ValueError, match="synthetic set: soft labels are over 5 classes but "
                       "num_classes is 3"):
        evaluate_synset("ConvNet", x, np.ones((9, 5), np.float32) / 5, tx, ty, f8, TINY, 1,
                        num_classes=K, model_overrides=W8)


@pytest.mark.parametrize("width", [2, 5])
def test_soft_label_width_blames_the_synthetic_set(data, width):
    """Soft labels over the wrong number of classes: an error about the synthetic set's labels
    (not the test set's), from cross_evaluate and from run_evaluation, before any training."""
    from elf_jax.models import get_model
    from elf_jax.train.runner import run_evaluation

    x, _, tx, ty, _ = data
    soft = np.full((9, width), 1 / width, np.float32)
    with pytest.raises(ValueError, match=f"synthetic set's soft labels are over {width} classes "
                       "but the test set's labels are 0..2"):
        cross_evaluate(["ConvNet"], x, soft, tx, ty, modes=["task"], protocol=TINY, repeats=1,
                       model_overrides=W8, progress=False)
    with pytest.raises(ValueError, match=f"synthetic set's soft labels are over {width} classes "
                       "but the network has 3 outputs"):
        run_evaluation(get_model("ConvNet", K, width=8), TINY.replace(mode="task"), x, soft, tx,
                       ty, repeats=1, progress=False)


def test_cross_evaluate_validates_before_training(data):
    x, y, tx, ty, f8 = data
    calls = []
    with pytest.raises(ValueError, match="no feature bank for ConvNetBN"):
        cross_evaluate(["ConvNet", "ConvNetBN"], x, y, tx, ty, {"ConvNet": f8}, protocol=TINY,
                       repeats=1, model_overrides=W8, on_result=lambda *a: calls.append(a))
    assert not calls  # nothing trained


def test_cross_evaluate_tiny(data, tmp_path):
    x, y, tx, ty, f8 = data
    seen = []
    out = cross_evaluate(
        ["ConvNet", "ConvNetBN"], x, y, tx, ty,
        features=lambda arch, shape: f8 if shape == (2, 2, 8) else None,
        protocol=TINY, repeats=2, key=jax.random.PRNGKey(1), model_overrides=W8,
        progress=False, on_result=lambda a, m, r: seen.append((a, m)),
    )
    assert seen == [("ConvNet", "task"), ("ConvNet", "front_rear_task"),
                    ("ConvNetBN", "task"), ("ConvNetBN", "front_rear_task")]
    for arch in ("ConvNet", "ConvNetBN"):
        s = out["summary"][arch]
        assert set(s) == {"task", "front_rear_task", "gain", "gain_ci95", "gain_significant"}
        r = out["results"][arch]["front_rear_task"]
        assert len(r["accs"]) == 2 and r["mean"] == pytest.approx(np.mean(r["accs"]))
        assert s["gain"] == pytest.approx(r["mean"] - out["results"][arch]["task"]["mean"])
    from elf_jax import report

    # the report module reads this dict as is, and summarizes it in the same format
    assert report.summarize(out["results"]).keys() == out["summary"].keys()
    assert "ConvNetBN" in report.text_table(out["summary"])


def test_learned_lr_option(data):
    x, y, tx, ty, f8 = data
    p = TINY.replace(mode="task", use_learned_lr=True)
    out = evaluate_synset("ConvNet", x, y, tx, ty, None, p, 1, learned_lr=0.003,
                          model_overrides=W8, progress=False)
    assert out["lr"] == pytest.approx(0.003)
    out = evaluate_synset("ConvNet", x, y, tx, ty, None, p.replace(use_learned_lr=False), 1,
                          learned_lr=0.003, model_overrides=W8, progress=False)
    assert out["lr"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="carries no learned lr"):  # never eval.lr instead
        evaluate_synset("ConvNet", x, y, tx, ty, None, p, 1, learned_lr=None,
                        model_overrides=W8, progress=False)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on the bad read
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(data, tmp_path, caplog):
    """The newest evaluation checkpoint damaged on disk: the rerun warns naming it, resumes
    from the step before and ends with the uninterrupted run's result."""
    x, y, tx, ty, _ = data
    p = TrainProtocol(epochs=2, batch_size=4, dsa_strategy="none", mode="task")  # 3 epochs
    kw = dict(repeats=1, key=jax.random.PRNGKey(3), workdir=tmp_path, checkpoint_every=1,
              chunk_epochs=1, model_overrides={"width": 4}, progress=False, return_states=True)
    first = evaluate_synset("ConvNet", x, y, tx, ty, None, p, **kw)
    latest = tmp_path / "checkpoints" / "3"
    for f in (latest / "state").rglob("d/*"):  # truncate the array chunks
        f.write_bytes(f.read_bytes()[:16])
    with caplog.at_level("WARNING", logger="elf_jax.checkpoint"):
        again = evaluate_synset("ConvNet", x, y, tx, ty, None, p, **kw)
    assert again["resumed_from"] == 2 and "step 3 in " + str(latest.parent) in caplog.text
    assert again["accs"] == first["accs"]
    for a, b in zip(jax.tree.leaves(first["states"].params), jax.tree.leaves(again["states"].params)):
        np.testing.assert_array_equal(a, b)


def test_a_workdir_grows_with_the_repeats(data, tmp_path):
    """Issue 27: 1 -> 3 repeats keeps repeat 0 and trains repeats 1-2 as a new part, with
    the results a fresh 3-repeat run gives (repeat r depends on r alone; the CPU's
    sequential repeats run one executable per repeat); 2 reads the first two back."""
    x, y, tx, ty, _ = data
    kw = dict(modes=("task",), protocol=TINY, key=jax.random.PRNGKey(3), model_overrides=W8,
              strategy="sequential", progress=False, checkpoint_every=1)
    one = cross_evaluate(["ConvNet"], x, y, tx, ty, repeats=1, workdir=tmp_path / "grow", **kw)
    three = cross_evaluate(["ConvNet"], x, y, tx, ty, repeats=3, workdir=tmp_path / "grow", **kw)
    fresh = cross_evaluate(["ConvNet"], x, y, tx, ty, repeats=3, workdir=tmp_path / "new", **kw)
    got = three["results"]["ConvNet"]["task"]
    assert got["accs"][:1] == one["results"]["ConvNet"]["task"]["accs"]  # read back, not rerun
    # Bit for bit only where it holds by construction: the CPU's host engine runs each
    # repeat by itself with ONE step executable, whatever the repeat count (the scan engine
    # compiles the repeats into the program, a different one per count).
    from elf_jax.loops import default_engine

    if default_engine() == "host":
        assert got["accs"] == fresh["results"]["ConvNet"]["task"]["accs"]
        assert got["final_train_loss"] == fresh["results"]["ConvNet"]["task"]["final_train_loss"]
    assert got["repeat_parts"] == [[0, 1], [1, 2]]
    assert (tmp_path / "grow" / "ConvNet" / "task" / "repeats_1-3" / "checkpoints").is_dir()
    two = cross_evaluate(["ConvNet"], x, y, tx, ty, repeats=2, workdir=tmp_path / "grow", **kw)
    assert two["results"]["ConvNet"]["task"]["accs"] == got["accs"][:2]
    assert not any(p.name.startswith("repeats_") and p.name != "repeats_1-3"
                   for p in (tmp_path / "grow" / "ConvNet" / "task").iterdir())
