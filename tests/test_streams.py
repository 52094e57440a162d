"""Per-stage random streams: with one seed, no evaluation network starts from the teacher's
or an expert's initial weights, and the baseline and ELF repeats stay paired."""
import jax
import numpy as np

from elf_jax.elf import evaluate_synset
from elf_jax.teacher import load_teacher, load_trajectory, train_experts, train_teacher
from elf_jax.train import TrainProtocol

N, HW, K, WIDTH = 24, 16, 4, 8


def _data():
    from elf_jax.data.dataset import ArrayDataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, HW, HW, 3)).astype(np.float32)
    y = (np.arange(N) % K).astype(np.int32)
    return ArrayDataset(x, y, num_classes=K, name="noise", mean=(0.0,) * 3, std=(1.0,) * 3,
                        image_shape=(HW, HW, 3))


def _initial_eval_params(train, mode):
    """The evaluation's initial weights: with lr 0 (a traced per-repeat hparam) and no weight
    decay, training leaves them."""
    p = TrainProtocol(epochs=0, weight_decay=0.0, batch_size=8, dsa_strategy="none", mode=mode)
    f = np.ones((N, 2, 2, WIDTH), np.float32) / WIDTH
    r = evaluate_synset("ConvNet", train.images, train.labels, train.images, train.labels, f, p,
                        repeats=2, key=jax.random.PRNGKey(0), model_overrides={"width": WIDTH},
                        hparams={"lr": 0.0}, progress=False, return_states=True)
    return [jax.tree.map(lambda a, i=i: np.asarray(a[i]), r["states"].params) for i in range(2)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_no_stage_shares_an_initialization(tmp_path):
    train = _data()
    kw = dict(epochs=1, model_kwargs={"width": WIDTH}, batch_size=8, dsa_strategy="none",
              seed=0, progress=False)
    train_teacher("ConvNet", train, workdir=tmp_path / "teacher", **kw)
    train_experts("ConvNet", train, num_experts=2, workdir=tmp_path / "experts", **kw)
    inits = {"teacher": load_teacher(tmp_path / "teacher", 0)[1]["params"]}
    for e in range(2):
        inits[f"expert{e}"] = load_trajectory(tmp_path / "experts", e, epochs=[0])[0]["params"]
    baseline = _initial_eval_params(train, "task")
    elf = _initial_eval_params(train, "front_rear_task")
    for r in range(2):
        assert _same(baseline[r], elf[r]), f"repeat {r}: baseline and ELF start apart"
        for name, params in inits.items():
            assert not _same(baseline[r], params), f"evaluation repeat {r} starts at the {name}"
    assert not _same(baseline[0], baseline[1])
    assert not _same(inits["teacher"], inits["expert0"])
