"""Feature adapters (elf_jax.models.adapter): ELF for every registry architecture against one
ConvNetW512 teacher bank, paired with the baseline, checkpointed like the rest."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _float32 import U, assert_rounding_close, float_scale, scaled_error  # noqa: E402
from elf_jax.elf import evaluate_synset
from elf_jax.models import adapt, front_shape, get_model, list_models, model_info
from elf_jax.models.adapter import Adapted, adapter_params, init_variables, resize_grid
from elf_jax.train import TrainProtocol
from elf_jax.train.step import init_state, train_step

K = 4


@pytest.mark.parametrize("src,dst", [((8, 8), (4, 4)), ((2, 2), (6, 6)), ((7, 7), (4, 4)),
                                     ((1, 1), (4, 4)), ((4, 4), (1, 1))])
def test_resize_grid_keeps_constants_and_means(src, dst):
    x = jnp.full((2,) + src + (3,), 1.5)
    y = resize_grid(x, dst)
    assert y.shape == (2,) + dst + (3,)
    np.testing.assert_allclose(y, 1.5, rtol=1e-6)  # weights sum to one: a bias commutes
    r = jax.random.normal(jax.random.key(0), (2,) + src + (3,))
    if src[0] % dst[0] == 0:  # area mean: the grid mean is kept exactly
        np.testing.assert_allclose(resize_grid(r, dst).mean((1, 2)), r.mean((1, 2)), atol=1e-6)


def test_adapted_net_starts_from_the_bare_nets_weights():
    """Paired repeats: the wrapped network's initial weights equal the bare network's."""
    net = get_model("ViT", K, depth=2, split_block=1, dim=16, mlp_dim=16, heads=2)
    x = jnp.zeros((1, 16, 16, 3))
    student = front_shape(net, (16, 16, 3))[1:]
    wrapped = adapt(net, student, (2, 2, 8))
    key = jax.random.key(5)
    bare, both = init_variables(net, key, x), init_variables(wrapped, key, x)
    for a, b in zip(jax.tree.leaves(bare["params"]), jax.tree.leaves(both["params"]["net"])):
        np.testing.assert_array_equal(a, b)
    n_adapter = sum(int(v.size) for v in jax.tree.leaves(both["params"]["adapter"]))
    assert n_adapter == adapter_params(wrapped) == (16 * 8 + 8) + (8 * 16 + 16)
    # plain `init` makes the same tree (what memory estimates see)
    plain = jax.eval_shape(lambda: wrapped.init(key, x, train=False))
    assert jax.tree.structure(plain) == jax.tree.structure(both)
    out = wrapped.apply(both, x)  # test-time forward: the network alone
    np.testing.assert_array_equal(out, net.apply(bare, x))


def _data(hwc, n=K, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + hwc).astype(np.float32)
    return x, (np.arange(n) % K).astype(np.int32)


#: The adapted ELF run with zero lambdas against the baseline run, in units of float32
#: rounding of the parameters' scale: the same math (the adapter's terms add exactly zero
#: gradient) in two programs that XLA fuses differently (4 SGD steps of an MLP). Measured:
#: 0 units on an AMD EPYC (AVX2) at the tests' fast-compile settings (2026-12-07); 1 ulp in
#: one parameter on an Intel Sapphire Rapids there (2026-12-02). The adapter's terms with
#: the lambdas on move the parameters by more than 100x the bound (checked below).
ZERO_LAMBDA_UNITS = 64


@pytest.mark.numerics
def test_zero_lambdas_through_an_adapter_train_like_the_baseline():
    """lambda_front = lambda_rear = 0: the adapter's terms add exactly zero gradient, so an
    adapted ELF run reproduces the baseline run of the same repeat, to float32 rounding (two
    programs: ``_float32.py``)."""
    x, y = _data((28, 28, 1), 8)
    tx, ty = _data((28, 28, 1), 6, seed=1)
    f = np.abs(np.random.default_rng(2).normal(size=(8, 4, 4, 16))).astype(np.float32)
    kw = dict(repeats=1, key=jax.random.key(1), progress=False, return_states=True)
    p = TrainProtocol(epochs=2, batch_size=4, dsa_strategy="none")
    base = evaluate_synset("MLP", x, y, tx, ty, None, p.replace(mode="task"), **kw)
    elf = evaluate_synset("MLP", x, y, tx, ty, f, p.replace(mode="front_rear_task"), **kw,
                          hparams={"lambda_front": 0.0, "lambda_rear": 0.0})
    assert elf["adapter_params"] > 0 and base["adapter_params"] == 0
    base_leaves = jax.tree.leaves(base["states"].params)
    scale = float_scale(base_leaves)
    errs = [assert_rounding_close(a, b, units=ZERO_LAMBDA_UNITS, scale=scale, err_msg="params")
            for a, b in zip(jax.tree.leaves(elf["states"].params["net"]), base_leaves)]
    print(f"zero lambdas vs baseline: {max(errs):.1f} units of float32 rounding")
    # parameters equal to rounding classify the 6 test images alike but for a near-tie
    assert np.max(np.abs(np.asarray(elf["accs"]) - base["accs"])) <= 1 / 6 + 1e-9
    # and with the lambdas on, the adapter's loss terms change the training
    on = evaluate_synset("MLP", x, y, tx, ty, f, p.replace(mode="front_rear_task"), **kw)
    assert not np.allclose(np.asarray(on["train_loss"]), np.asarray(base["train_loss"]))
    moved = max(scaled_error(a, b, scale) for a, b in
                zip(jax.tree.leaves(on["states"].params["net"]), base_leaves)) / U
    assert moved > 100 * ZERO_LAMBDA_UNITS, moved


def test_adapted_evaluation_resumes_from_its_checkpoint(tmp_path):
    x, y = _data((16, 16, 3), 8)
    tx, ty = _data((16, 16, 3), 6, seed=1)
    f = np.abs(np.random.default_rng(2).normal(size=(8, 2, 2, 8))).astype(np.float32)
    p = TrainProtocol(epochs=2, batch_size=4, dsa_strategy="none", mode="front_rear_task")
    kw = dict(repeats=1, key=jax.random.key(3), workdir=tmp_path, checkpoint_every=1,
              chunk_epochs=1, progress=False, return_states=True)
    first = evaluate_synset("LeNet", x, y, tx, ty, f, p, **kw)
    again = evaluate_synset("LeNet", x, y, tx, ty, f, p, **kw)
    assert again["resumed_from"] == 3 and again["accs"] == first["accs"]
    for a, b in zip(jax.tree.leaves(first["states"].params), jax.tree.leaves(again["states"].params)):
        np.testing.assert_array_equal(a, b)


def _teacher_feature(hwc):
    """The per-image feature of a ConvNetW512 teacher (its front) at this input size."""
    return front_shape(get_model("ConvNetW512", K), hwc)[1:]


@pytest.mark.parametrize("name", list_models(include_aliases=False))
def test_every_registry_architecture_takes_a_convnetw512_bank(name):
    """Shapes and a traced ELF step (front_rear_task, ce) for every architecture of the zoo
    against a ConvNetW512 teacher feature, through an adapter where the shapes differ."""
    hwc = model_info(name)["input_shape"]
    net = get_model(name, K)
    student, teacher = front_shape(net, hwc)[1:], _teacher_feature(hwc)
    train_net = net if student == teacher else adapt(net, student, teacher)
    p = TrainProtocol(mode="front_rear_task", dsa_strategy="none", batch_size=2)
    x = jnp.zeros((2,) + hwc)
    batch = {"images": x, "labels": jnp.zeros((2,), jnp.int32),
             "features": jnp.ones((2,) + teacher)}

    def step(key):
        s = init_state(train_net, p, key, jax.random.key_data(key), x)
        return train_step(s, batch, key, net=train_net, protocol=p)

    state, metrics = jax.eval_shape(step, jax.random.key(0))
    assert metrics["front"].shape == () and metrics["rear"].shape == ()
    assert isinstance(train_net, Adapted) == ("adapter" in state.params)


# The split architectures new to ELF, end to end (the whole zoo: the slow test below).
NEW = ["MLP", "LeNet", "AlexNetBN", "ViT"]


def _run_elf_end_to_end(name):
    hwc = model_info(name)["input_shape"]
    teacher = get_model("ConvNetW512", K)
    x, y = _data(hwc, 2 * K)
    tx, ty = _data(hwc, 2 * K, seed=1)
    tv = teacher.init(jax.random.key(9), jnp.asarray(x[:1]))
    bank = np.asarray(teacher.apply(tv, jnp.asarray(x), method=teacher.front))
    p = TrainProtocol(epochs=1, batch_size=2 * K, dsa_strategy="color_crop_cutout_flip_scale_rotate",
                      mode="front_rear_task")
    r = evaluate_synset(name, x, y, tx, ty, bank, p, repeats=1, progress=False)
    assert np.isfinite(np.asarray(r["train_loss"])).all() and len(r["accs"]) == 1
    return r


@pytest.mark.parametrize("name", NEW)
def test_new_splits_run_elf_end_to_end_on_a_teacher_bank(name):
    r = _run_elf_end_to_end(name)
    assert r["adapter_params"] > 0  # none of them has the ConvNetW512 feature shape


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(list_models(include_aliases=False)) - set(NEW)))
def test_every_registry_architecture_runs_elf_end_to_end(name):
    _run_elf_end_to_end(name)


def test_pipeline_teachers_fall_back_to_the_distillation_nets_teacher(tmp_path):
    """A pool net without a teacher of its feature shape learns from the distillation net's
    teacher through an adapter; with eval.adapter=off the config is refused up front."""
    from elf_jax.config import demo_config
    from elf_jax.pipeline import Run

    c = demo_config()
    c.eval.pool = ("ConvNet", "MLP", "ViT", "ConvNetD1")
    assert Run(c, tmp_path).teachers == {"ConvNet": "ConvNetW32", "MLP": "ConvNetW32",
                                         "ViT": "ConvNetW32", "ConvNetD1": "ConvNetW32"}
    c.eval.pool = ("ConvNet", "VGG11")
    c.eval.width = 0
    assert Run(c, tmp_path).teachers == {"ConvNet": "ConvNet", "VGG11": "ConvNetW512"}
    c.eval.adapter = "off"
    c.eval.pool = ("ConvNet", "MLP")
    with pytest.raises(ValueError, match="no registered ConvNetW512-family teacher.*MLP"):
        Run(c, tmp_path).teachers
    c.eval.adapter = "sometimes"
    with pytest.raises(ValueError, match="eval.adapter"):
        Run(c, tmp_path)
