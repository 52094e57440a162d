"""Evaluation protocol, train step and runner (tiny shapes, real registry models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.models import get_model
from elf_jax.train import TrainProtocol, TrainingDiverged, run_evaluation, torch_sgd
from elf_jax.keys import stage_key
from elf_jax.train.runner import init_states
from elf_jax.train.step import jit_train_step

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it


# ----------------------------------------------------------------------------- protocol
def test_schedule_and_batches():
    p = TrainProtocol(epochs=10)
    assert p.num_epochs == 11 and p.decay_epoch == 6  # range(E + 1); E // 2 + 1
    factors = [float(p.lr_factor(e)) for e in range(11)]
    assert factors == [1.0] * 7 + [pytest.approx(0.1)] * 4  # decayed AFTER epoch 6
    assert TrainProtocol().decay_epoch == 501
    assert p.batch_plan(1000) == (3, 256, 232)  # CIFAR-100 IPC 10: 4 steps, last one 232
    assert p.batch_plan(100) == (1, 100, 0)  # CIFAR-10 IPC 10: one batch of 100
    assert p.batch_plan(512) == (2, 256, 0)
    assert float(TrainProtocol(epochs=10, lr_decay=False).lr_factor(10)) == 1.0
    with pytest.raises(ValueError, match="mode"):
        TrainProtocol(mode="elf")


def test_torch_sgd_matches_torch_with_optimizer_rebuild():
    """optax chain == torch.optim.SGD(lr, 0.9, wd 5e-4); the reference rebuilds the
    optimizer at the decay (momentum restarts), which the runner reproduces by zeroing the
    trace."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = rng.normal(size=(6, 4, 3)).astype(np.float32)
    lr = 0.05
    # torch: 3 steps, rebuild with lr*0.1, 3 steps
    w = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=5e-4)
    for i, g in enumerate(grads):
        if i == 3:
            opt = torch.optim.SGD([w], lr=lr * 0.1, momentum=0.9, weight_decay=5e-4)
        w.grad = torch.tensor(g)
        opt.step()
    want = w.detach().numpy()
    # ours: the direction transform of the protocol, -lr applied by hand, trace zeroed at 3
    tx = TrainProtocol().optimizer()
    p = jnp.asarray(p0)
    state = tx.init(p)
    for i, g in enumerate(grads):
        if i == 3:
            state = jax.tree.map(jnp.zeros_like, state)
        d, state = tx.update(jnp.asarray(g), state, p)
        p = p - (lr if i < 3 else lr * 0.1) * d
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-6, atol=1e-7)
    # the stand-alone optax SGD (no rebuild) equals torch without the rebuild
    w = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=5e-4)
    tx = torch_sgd(lr, 0.9, 5e-4)
    p = jnp.asarray(p0)
    state = tx.init(p)
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
        u, state = tx.update(jnp.asarray(g), state, p)
        p = p + u
    np.testing.assert_allclose(np.asarray(p), w.detach().numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- runner
N, K, B = 13, 4, 5  # 2 full batches of 5 and a last batch of 3


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 16, 16, 3)).astype(np.float32)
    y = (np.arange(N) % K).astype(np.int32)
    f = np.abs(rng.normal(size=(N, 2, 2, 8))).astype(np.float32)
    return x, y, f


def _python_loop(net, protocol, x, y, f, key):
    """The reference loop written plainly: per epoch a permutation, batches of B with the last
    partial one kept, one jitted step each, lr decay + momentum restart after E//2+1."""
    # run_evaluation's repeat 0 of the evaluation stage
    state = jax.tree.map(lambda a: a[0], init_states(net, protocol, stage_key(key, "evaluate"), 1,
                                                     jnp.asarray(x[:1])))
    for ep in range(protocol.num_epochs):
        k_next, k_perm, k_aug = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        perm = np.asarray(jax.random.permutation(k_perm, N))
        batches = [perm[i : i + B] for i in range(0, N, B)]
        keys = jax.random.split(k_aug, len(batches))
        for idx, k in zip(batches, keys):
            batch = {"images": x[idx], "labels": y[idx], "features": f[idx]}
            state, _ = jit_train_step(state, batch, k, net=net, protocol=protocol)
        if ep == protocol.decay_epoch:
            state = state._replace(opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))
        state = state._replace(key=jax.random.key_data(k_next), epoch=state.epoch + 1)
    return state


def test_runner_equals_plain_loop_and_vmap(tiny):
    x, y, f = tiny
    net = get_model("ConvNetBN", K, width=8)
    p = TrainProtocol(epochs=3, batch_size=B, dsa_strategy="flip", lr=0.05)
    key = jax.random.PRNGKey(3)
    ref = _python_loop(net, p, x, y, f, key)
    outs = {}
    for name, strat, engine in (("sequential", "sequential", "scan"), ("vmap", "vmap", "scan"),
                                ("host", "sequential", "host")):
        outs[name] = run_evaluation(net, p, x, y, x, y, f, repeats=2, key=key, strategy=strat,
                                    engine=engine, chunk_epochs=3, progress=False,
                                    return_states=True)
        assert outs[name]["engine"] == engine
    seq = outs["sequential"]["states"]
    for a, b in zip(jax.tree.leaves((ref.params, ref.batch_stats)),
                    jax.tree.leaves((seq.params, seq.batch_stats))):
        np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a), rtol=2e-5, atol=2e-6)
    assert int(seq.epoch[0]) == 4 and int(seq.step[0]) == 4 * 3
    for other in ("vmap", "host"):
        for a, b in zip(jax.tree.leaves(seq.params), jax.tree.leaves(outs[other]["states"].params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(outs[other]["train_loss"], outs["sequential"]["train_loss"],
                                   rtol=1e-5)
    assert outs["sequential"]["train_loss"].shape == (2, 4)
    assert np.all(np.isfinite(outs["sequential"]["train_loss"]))
    # repeats differ (different init), accuracies are fractions
    assert not np.allclose(jax.tree.leaves(seq.params)[0][0], jax.tree.leaves(seq.params)[0][1])
    assert all(0.0 <= a <= 1.0 for a in outs["sequential"]["accs"])


def test_rear_batchnorm_sees_the_feature_batch():
    """VGG11BN has BN in its rear: with ELF the rear runs on the teacher feature in train mode
    (as the reference's net(feature=ftr)), so the rear's running stats get a second update;
    the front's stats come from the image path alone."""
    net = get_model("VGG11BN", K)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    f = np.abs(rng.normal(size=(4, 4, 4, 512))).astype(np.float32) * 3.0
    batch = {"images": x, "labels": np.arange(4, dtype=np.int32), "features": f}
    key = jax.random.PRNGKey(0)
    out = {}
    for mode in ("task", "front_task"):
        p = TrainProtocol(mode=mode, dsa_strategy="none")
        st = jax.tree.map(lambda a: a[0], init_states(net, p, key, 1, jnp.asarray(x[:1])))
        out[mode], _ = jit_train_step(st, batch, jax.random.PRNGKey(1), net=net, protocol=p)
    bt, bf = out["task"].batch_stats, out["front_task"].batch_stats
    flat_t = dict(jax.tree_util.tree_flatten_with_path(bt)[0])
    flat_f = dict(jax.tree_util.tree_flatten_with_path(bf)[0])
    same = [jax.tree_util.keystr(k) for k in flat_t if np.allclose(flat_t[k], flat_f[k])]
    diff = [jax.tree_util.keystr(k) for k in flat_t if not np.allclose(flat_t[k], flat_f[k])]
    assert same and diff  # front BN layers identical, rear BN layers changed by rear(f)


def test_nan_stops_with_clear_error_and_keeps_checkpoint(tiny, tmp_path):
    x, y, f = tiny
    net = get_model("ConvNet", K, width=8)
    # E=4: epochs 0..3 at lr, then the decay multiplies the lr by inf -> epoch 4 diverges
    p = TrainProtocol(epochs=4, batch_size=B, dsa_strategy="none", mode="task",
                     decay_factor=float("inf"))
    with pytest.raises(TrainingDiverged, match=r"at repeat 0, epoch 4 ") as e:
        run_evaluation(net, p, x, y, x, y, repeats=2, key=jax.random.PRNGKey(0),
                       chunk_epochs=1, checkpoint_every=1, workdir=tmp_path, progress=False)
    assert "last good checkpoint (epoch 4)" in str(e.value)
    from elf_jax.checkpoint import StepCheckpoints

    assert StepCheckpoints(tmp_path / "checkpoints").latest_step() == 4


def test_checkpoints_of_an_older_format_are_refused(tiny, tmp_path, monkeypatch):
    """Checkpoints written before the random streams changed cannot be continued exactly:
    refused with a message that says why and what to do, never mixed in."""
    from elf_jax.train import runner

    x, y, f = tiny
    net = get_model("ConvNet", K, width=8)
    p = TrainProtocol(epochs=1, batch_size=B, dsa_strategy="none", mode="task")
    kw = dict(repeats=1, key=jax.random.PRNGKey(0), checkpoint_every=1, workdir=tmp_path,
              progress=False)
    with monkeypatch.context() as m:
        m.setattr(runner, "EVAL_FORMAT", "elf_jax.eval_run/1")
        run_evaluation(net, p, x, y, x, y, **kw)
    with pytest.raises(ValueError, match=r"format 'elf_jax.eval_run/1'.*delete that directory"):
        run_evaluation(net, p, x, y, x, y, **kw)


def test_checkpoints_are_keyed_by_what_the_runs_mode_reads(tiny, tmp_path):
    """Issue 31: a baseline (task) run is not invalidated by a setting only the ELF modes
    read (feature distance, lambdas); a change it does read is refused naming the
    difference in words and the stage to recompute."""
    x, y, f = tiny
    net = get_model("ConvNet", K, width=8)
    p = TrainProtocol(epochs=1, batch_size=B, dsa_strategy="none", mode="task")
    kw = dict(repeats=1, key=jax.random.PRNGKey(0), checkpoint_every=1, progress=False)
    wd = tmp_path / "eval" / "ConvNet" / "task"
    first = run_evaluation(net, p, x, y, x, y, workdir=wd, **kw)
    elf_only = p.replace(kind="l2", lambda_front=3.0, lambda_rear=0.5)
    again = run_evaluation(net, elf_only, x, y, x, y, workdir=wd, **kw)
    assert again["resumed_from"] == 2 and list(again["accs"]) == list(first["accs"])
    with pytest.raises(ValueError) as err:
        run_evaluation(net, p.replace(lr=0.02), x, y, x, y, workdir=wd, **kw)
    assert "lr 0.01 vs 0.02" in str(err.value)
    assert "`elf-jax evaluate --overwrite=evaluate`" in str(err.value)
    with pytest.raises(ValueError, match="another data .hash of the training set: synthetic"):
        run_evaluation(net, p, x[::-1].copy(), y[::-1].copy(), x, y, workdir=wd, **kw)


def test_bf16_and_soft_labels_and_lambda_sweep(tiny):
    x, y, f = tiny
    net = get_model("ConvNet", K, width=8, dtype=jnp.bfloat16)
    soft = np.eye(K, dtype=np.float32)[y] * 0.9 + 0.1 / K
    p = TrainProtocol(epochs=1, batch_size=B, dsa_strategy="none", dtype="bfloat16")
    out = run_evaluation(net, p, x, soft, x, y, f, repeats=3, key=jax.random.PRNGKey(0),
                         hparams={"lambda_front": np.array([0.0, 1.0, 2.0])},
                         progress=False, return_states=True)
    assert np.all(np.isfinite(out["train_loss"]))
    np.testing.assert_allclose(np.asarray(out["states"].hparams["lambda_front"]), [0, 1, 2])
    assert jax.tree.leaves(out["states"].params)[0].dtype == jnp.float32
