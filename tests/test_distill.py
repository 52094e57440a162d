"""Distillation methods on tiny shapes: 2 digit classes at 8x8, ConvNet width 8 depth 2,
cheap DSA groups (the full strategy is covered by the augment tests)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.data import load
from elf_jax.data.sampler import ClassIndex, sample_all_classes
from elf_jax import loops
from elf_jax.distill import common as C
from elf_jax.distill import distill, get_method, list_methods
from elf_jax.distill.dm import make_dm_step
from elf_jax.distill.gradient_matching import gradient_distance, make_gm_step
from elf_jax.distill.mtt import load_expert_array, make_mtt_step
from elf_jax.distill.settings import METHOD_SETTINGS, DMSettings, TrajectorySettings, from_config
from elf_jax.models import get_model

TINY = dict(width=8, depth=2)
AUG = "crop_flip"
SHAPE = (8, 8, 1)


def _two_classes(split):
    d = load("digits", split, image_size=8)
    m = d.labels < 2
    return dataclasses.replace(d, images=d.images[m], labels=d.labels[m], num_classes=2,
                               class_names=None)


@pytest.fixture(scope="module")
def tiny():
    return _two_classes("train"), _two_classes("test")


@pytest.fixture(scope="module")
def net():
    return get_model("ConvNet", 2, **TINY)


def _state(images, optimizer, extra=None):
    return C.init_state({"images": images, **(extra or {})}, optimizer, jax.random.key(1))


def _assert_image_grads(g):
    g = np.asarray(g)
    assert np.isfinite(g).all()
    assert np.abs(g).sum() > 0
    assert (np.abs(g).reshape(g.shape[0], -1).sum(1) > 0).all()  # every image gets gradient


# ----------------------------------------------------------------------------- DM
def test_dm_loss_decreases_and_grads_reach_images(tiny, net):
    train, _ = tiny
    images, _ = C.init_synthetic(jax.random.key(0), train, 2)
    real = sample_all_classes(ClassIndex(train).arrays, jax.random.key(2), 32)
    key = jax.random.key(3)
    step = make_dm_step(net, lr_img=1.0, dsa_strategy=AUG)
    state = _state(images, step.optimizer)
    losses = []
    for _ in range(5):  # same network, batch and DSA draw: plain descent on one objective
        state, m = step(state, key, real)
        losses.append(float(m["loss"]))
    assert bool(m["finite"]) and int(state.iteration) == 5
    assert losses[-1] < 0.7 * losses[0], losses
    _assert_image_grads(np.asarray(state.syn["images"]) - images)  # every image moved


# ----------------------------------------------------------------------------- DC / DSA
@pytest.mark.numerics
def test_gradient_distance_matches_reference_layout():
    rng = np.random.default_rng(0)
    # ours: HWIO conv kernel / [in, out] dense; reference: OIHW / [out, in]
    ga = {"conv": rng.normal(size=(3, 3, 2, 4)), "dense": rng.normal(size=(5, 3)),
          "bias": rng.normal(size=(4,))}
    gb = {k: rng.normal(size=v.shape) for k, v in ga.items()}

    def ref(a, b):  # torch distance_wb on the reference layout
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return np.sum(1 - np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                                              * np.linalg.norm(b, axis=-1) + 1e-6))

    want = (ref(ga["conv"].transpose(3, 2, 0, 1), gb["conv"].transpose(3, 2, 0, 1))
            + ref(ga["dense"].T, gb["dense"].T))
    got = gradient_distance(jax.tree.map(jnp.asarray, ga), jax.tree.map(jnp.asarray, gb), "ours")
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    va = np.concatenate([v.ravel() for _, v in sorted(ga.items())])
    vb = np.concatenate([v.ravel() for _, v in sorted(gb.items())])
    np.testing.assert_allclose(float(gradient_distance(ga, gb, "mse")),
                               np.sum((va - vb) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(gradient_distance(ga, gb, "cos")),
                               1 - va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-6),
                               rtol=1e-5)
    # a zero row must not give NaN gradients (torch's norm backward is 0 at 0)
    z = {"w": jnp.zeros((3, 4))}
    g = jax.grad(lambda x: gradient_distance({"w": jnp.ones((3, 4))}, x, "ours"))(z)
    assert np.isfinite(np.asarray(g["w"])).all()


def test_dsa_step_loss_decreases_and_grads(tiny, net):
    train, _ = tiny
    images, _ = C.init_synthetic(jax.random.key(0), train, 2)
    pool = ClassIndex(train).arrays
    step = make_gm_step(net, num_classes=2, ipc=2, outer_loop=2, inner_loop=1, lr_img=0.1,
                        batch_real=32, dis_metric="ours", dsa_strategy=AUG)
    state = _state(images, step.optimizer)
    key = jax.random.key(5)
    losses = []
    for _ in range(4):  # same key: same nets, batches and DSA draws every iteration
        state, m = step(state, key, pool)
        losses.append(float(m["loss"]))
    assert bool(m["finite"])
    assert losses[-1] < losses[0], losses
    _assert_image_grads(np.asarray(state.syn["images"]) - images)  # every image moved


def test_dc_batchnorm_driver_runs(tiny):
    train, _ = tiny
    s = distill("dc", train, arch="ConvNetBN", ipc=1, iterations=2, batch_real=16,
                model_kwargs=TINY, dis_metric="mse", key=jax.random.key(0), progress=False)
    assert s.images.shape == (2,) + SHAPE and s.method == "dc"
    assert np.isfinite(s.images).all()


# ----------------------------------------------------------------------------- MTT / TESLA
def _fake_trajectories(net, images, n_experts=2, epochs=4):
    """Straight-line 'trajectories' between two random inits (enough for the objective)."""
    out = []
    for e in range(n_experts):
        p0 = net.init(jax.random.key(10 + e), images[:1])["params"]
        p1 = net.init(jax.random.key(20 + e), images[:1])["params"]
        out.append([jax.tree.map(lambda a, b: a + (b - a) * 0.05 * t, p0, p1)
                    for t in range(epochs + 1)])
    return out


@pytest.fixture(scope="module")
def experts(tiny, net):
    train, _ = tiny
    traj, unravel = load_expert_array(_fake_trajectories(net, train.images), arch="ConvNet",
                                      num_classes=2, image_shape=SHAPE,
                                      model_kwargs=TINY, epochs_needed=3)
    return traj, unravel


@pytest.fixture(scope="module")
def mtt_steps(tiny, net, experts):
    """Compiled once per module: (gradient, syn_steps) -> step; all images in every batch."""
    _, unravel = experts
    _, labels = C.init_synthetic(jax.random.key(0), tiny[0], 2)
    return {(g, n): make_mtt_step(net, unravel, num_classes=2, hard_labels=labels,
                                  syn_steps=n, lr_img=100.0, lr_lr=1e-5, dsa_strategy=AUG,
                                  gradient=g)
            for g, n in (("unrolled", 3), ("tesla", 3), ("remat", 3), ("unrolled", 1),
                         ("tesla", 1))}


def test_mtt_and_tesla_loss_decreases(tiny, experts, mtt_steps):
    traj, _ = experts
    images, _ = C.init_synthetic(jax.random.key(0), tiny[0], 2)
    start, target = jnp.asarray(traj[0, 0]), jnp.asarray(traj[0, 2])
    for gradient in ("unrolled", "tesla"):
        step = mtt_steps[(gradient, 3)]
        state = _state(images, step.optimizer, {"lr": np.float32(0.01)})
        losses = []
        for _ in range(4):
            state, m = step(state, jax.random.key(7), start, target)
            losses.append(float(m["loss"]))
        assert bool(m["finite"]), gradient
        assert losses[-1] < losses[0], (gradient, losses)
        assert float(state.syn["lr"]) != 0.01  # the lr is learned


@pytest.mark.numerics
def test_tesla_gradient_is_exact_for_one_step_and_remat_matches(tiny, experts, mtt_steps):
    traj, _ = experts
    images, _ = C.init_synthetic(jax.random.key(0), tiny[0], 2)
    start, target = jnp.asarray(traj[1, 1]), jnp.asarray(traj[1, 3])
    key = jax.random.key(11)

    def first_update(gradient, syn_steps):
        step = mtt_steps[(gradient, syn_steps)]
        state = _state(images, step.optimizer, {"lr": np.float32(0.01)})
        new, m = step(state, key, start, target)
        # SGD's first step: update = -lr * grad
        return {k: (np.asarray(state.syn[k]) - np.asarray(new.syn[k])) for k in new.syn}

    # one student step: no Hessian terms, TESLA's gradient equals MTT's
    a, b = first_update("unrolled", 1), first_update("tesla", 1)
    _assert_image_grads(a["images"])
    np.testing.assert_allclose(b["images"], a["images"], rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(b["lr"], a["lr"], rtol=2e-3, atol=1e-12)
    # remat: the exact MTT gradient, recomputed
    a, b = first_update("unrolled", 3), first_update("remat", 3)
    np.testing.assert_allclose(b["images"], a["images"], rtol=2e-3, atol=1e-6)
    # TESLA for several steps: an approximation, still close to the exact direction
    c = first_update("tesla", 3)
    _assert_image_grads(c["images"])
    cos = np.sum(a["images"] * c["images"]) / (np.linalg.norm(a["images"])
                                                * np.linalg.norm(c["images"]))
    assert cos > 0.5, cos


@pytest.mark.numerics
def test_cpu_unrolled_loops_match_rolled_scans(tiny, net, experts, monkeypatch):
    """The CPU fast paths (fully unrolled scans, the host-driven DC/DSA loop) give the
    rolled ``lax.scan`` results up to float reassociation."""
    train, _ = tiny
    images, labels = C.init_synthetic(jax.random.key(0), train, 2)
    assert loops.loop_unroll(3, max_length=4) is (True if loops.cpu_loops() else 1)
    assert loops.loop_unroll(5, max_length=4) == 1
    # DSA: host loop (unrolled classes/minibatches; last partial batch) vs one jitted scan
    pool = ClassIndex(train).arrays
    out = []
    for host in (True, False):
        step = make_gm_step(net, num_classes=2, ipc=2, outer_loop=3, inner_loop=2,
                            lr_img=0.1, batch_real=16, batch_train=3, dsa_strategy=AUG,
                            host_loop=host)
        state = _state(images, step.optimizer)
        for i in range(2):
            state, m = step(state, jax.random.key(5 + i), pool)
        out.append((np.asarray(state.syn["images"]), float(m["loss"])))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-4)
    # MTT (unrolled gradient) and TESLA: unrolled student steps vs rolled scans
    traj, unravel = experts
    start, target = jnp.asarray(traj[0, 0]), jnp.asarray(traj[0, 2])
    for gradient in ("unrolled", "tesla"):
        res = []
        for bound in (loops.CPU_UNROLL_MAX, 0):  # 0: never unroll
            monkeypatch.setattr(loops, "CPU_UNROLL_MAX", bound)
            step = make_mtt_step(net, unravel, num_classes=2, hard_labels=labels, syn_steps=3,
                                 lr_img=100.0, lr_lr=1e-5, dsa_strategy=AUG, gradient=gradient)
            state = _state(images, step.optimizer, {"lr": np.float32(0.01)})
            new, m = step(state, jax.random.key(7), start, target)
            res.append((np.asarray(new.syn["images"]), float(new.syn["lr"]), float(m["loss"])))
        np.testing.assert_allclose(res[0][0], res[1][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res[0][1:], res[1][1:], rtol=1e-4)


def test_tesla_soft_labels_driver(tiny, net):
    train, _ = tiny
    trajs = _fake_trajectories(net, train.images, epochs=3)
    s = distill("tesla", train, ipc=1, iterations=2, syn_steps=2, expert_epochs=1,
                max_start_epoch=2, experts=trajs, model_kwargs=TINY, soft_labels=True,
                learn_labels=True, dsa_strategy=AUG, key=jax.random.key(0), progress=False)
    assert s.soft and s.labels.shape == (2, 2) and s.lr is not None
    np.testing.assert_allclose(s.labels.sum(1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- driver
def test_resume_after_interruption_gives_same_result(tiny, tmp_path):
    train, _ = tiny
    kw = dict(ipc=2, iterations=4, batch_real=16, model_kwargs=TINY, key=jax.random.key(4),
              checkpoint_every=2, progress=False)
    full = distill("dm", train, workdir=tmp_path / "a", **kw)

    class Killed(Exception):
        pass

    def kill(it, _):
        if it == 3:
            raise Killed

    with pytest.raises(Killed):
        distill("dm", train, workdir=tmp_path / "b", callback=kill, **kw)
    steps = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps[-1] == 2
    seen = []
    resumed = distill("dm", train, workdir=tmp_path / "b",
                      callback=lambda it, m: seen.append(it), **kw)
    assert seen == [3, 4]  # continued after the checkpoint at 2
    np.testing.assert_array_equal(resumed.images, full.images)
    # a different setting in the same workdir is refused
    with pytest.raises(ValueError, match=r"another run.s \(saved vs asked\): lr_img 1.0 vs 0.5"):
        distill("dm", train, workdir=tmp_path / "b", **{**kw, "lr_img": 0.5})


def test_evaluation_keeps_best_set(tiny, tmp_path):
    train, test = tiny
    ev = C.EvalSettings(every=1, epochs=2, repeats=1, batch_size=64)
    s = distill("dm", train, ipc=1, iterations=2, batch_real=16, model_kwargs=TINY,
                key=jax.random.key(0), evaluation=ev, test_dataset=test,
                workdir=tmp_path, progress=False)
    hist = s.metadata["history"]
    assert [h["iteration"] for h in hist] == [1, 2]
    best = max(hist, key=lambda h: h["acc"])
    assert s.metadata["iteration"] == best["iteration"]
    assert s.metadata["best_acc"] == pytest.approx(best["acc"])
    from elf_jax.distill.common import load_result

    np.testing.assert_array_equal(load_result(tmp_path, "best").images, s.images)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors(tiny, net, tmp_path):
    train, _ = tiny
    with pytest.raises(ValueError, match=r"ipc=500 but class 0 .* has only"):
        distill("dm", train, ipc=500, iterations=1, progress=False)
    with pytest.raises(ValueError, match="known methods: dc, dm, dsa, mtt, tesla"):
        get_method("gradmatch")
    assert list_methods() == ["dc", "dm", "dsa", "mtt", "tesla"]
    # expert trajectories trained for another architecture: both are named
    (tmp_path / "trajectory.json").write_text(json.dumps({
        "net_name": "ConvNetBN", "num_classes": 2, "model_kwargs": TINY,
        "image_shape": list(SHAPE), "epochs": 5, "num_experts": 1}))
    with pytest.raises(ValueError, match=r"ConvNetBN\(2 classes.*this distillation uses "
                                         r"ConvNet\(2 classes"):
        load_expert_array(tmp_path, arch="ConvNet", num_classes=2, image_shape=SHAPE,
                          model_kwargs=TINY, epochs_needed=3)
    wrong = _fake_trajectories(get_model("ConvNet", 2, width=4, depth=2), train.images, 1, 3)
    with pytest.raises(ValueError, match="another architecture"):
        load_expert_array(wrong, arch="ConvNet", num_classes=2, image_shape=SHAPE,
                          model_kwargs=TINY, epochs_needed=3)
    with pytest.raises(ValueError, match="unknown dis_metric"):
        gradient_distance({"a": jnp.ones((2, 2))}, {"a": jnp.ones((2, 2))}, "l3")
    with pytest.raises(TypeError, match="dm takes DMSettings"):
        distill("dm", train, TrajectorySettings())


def test_nan_stops_and_keeps_last_good_checkpoint(tiny, net, tmp_path):
    train, _ = tiny
    with pytest.raises(C.DistillationDiverged, match=r"images became NaN/Inf at iteration 1"
                                                     r".*iteration 0\) is kept"):
        distill("dm", train, ipc=1, iterations=3, batch_real=16, model_kwargs=TINY,
                lr_img=float("nan"), workdir=tmp_path, progress=False)
    from elf_jax.checkpoint import StepCheckpoints

    ck = StepCheckpoints(tmp_path / "checkpoints")
    assert ck.all_steps() == [0]
    state, _ = ck.restore(0)
    assert np.isfinite(np.asarray(state["state"]["syn"]["images"])).all()
    ck.close()
    trajs = _fake_trajectories(net, train.images, 1, 3)
    with pytest.raises(C.DistillationDiverged, match="lr_teacher"):
        distill("mtt", train, ipc=1, iterations=1, syn_steps=1, expert_epochs=1,
                max_start_epoch=1, experts=trajs, model_kwargs=TINY,
                lr_teacher=float("nan"), progress=False)


def test_distill_from_config_hook(tmp_path):
    import importlib.util

    from elf_jax.distill import distill_from_config

    spec = importlib.util.spec_from_file_location("cfg", "configs/distill_mnist5k_dm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.synset.iterations, c.synset.eval_every, c.synset.batch_real = 1, 0, 8
    c.synset.model_kwargs = dict(TINY)
    s = distill_from_config(c, tmp_path)
    assert s.method == "dm" and s.images.shape == (100, 28, 28, 1) and s.dataset == "mnist5k"
    assert (tmp_path / "synset_best").exists() and (tmp_path / "checkpoints").exists()


def test_every_setting_is_a_config_field():
    """``base_config().synset`` declares every settings field, with the method's defaults
    (its own ``iterations`` and ``ipc`` aside), and reads back the ones a config sets."""
    from elf_jax.config import base_config, mnist5k_distill_config

    c = base_config().synset
    for method, cls in METHOD_SETTINGS.items():
        assert [f.name for f in dataclasses.fields(cls) if f.name not in c] == []
        assert from_config(method, c) == cls(iterations=c.iterations, ipc=c.ipc)
    c.lr_img, c.batch_syn, c.experts, c.outer_loop = 2.0, 5, "runs/experts", 3
    assert from_config("tesla", c).lr_img == 2.0 and from_config("tesla", c).batch_syn == 5
    assert from_config("mtt", c).experts == "runs/experts"
    assert from_config("dc", c).outer_loop == 3 and from_config("dm", c) == DMSettings(lr_img=2.0)
    s = from_config("dm", mnist5k_distill_config("dm").synset)
    assert (s.iterations, s.batch_real, s.model_kwargs, s.eval_every) == (200, 64,
                                                                         {"width": 32}, 100)
