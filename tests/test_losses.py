"""ELF losses against hand-computed numpy values (docs/METHOD.md stage 4)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from elf_jax.elf import elf_objective, feature_loss, task_loss
from elf_jax.losses import ELF_MODES

pytestmark = pytest.mark.numerics  # rounding-sensitive: make test-avx2 reruns it


def _np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    t = np.abs(rng.normal(size=(3, 2, 2, 5))).astype(np.float32)  # raw (post-relu) teacher
    return s, t


def test_ce_tiny_by_hand():
    # one sample, one position, two channels: s=[0, log 3] -> softmax [1/4, 3/4]
    s = np.array([0.0, np.log(3.0)], np.float32).reshape(1, 1, 1, 2)
    t = np.array([2.0, 1.0], np.float32).reshape(1, 1, 1, 2)
    want = -(2.0 * np.log(0.25) + 1.0 * np.log(0.75))
    np.testing.assert_allclose(feature_loss(s, t, "ce"), want, rtol=1e-6)


def test_feature_kinds_match_numpy(feats):
    s, t = feats
    ce = -(t * _np_log_softmax(s, -1)).sum(-1).mean()  # mean over n,h,w; sum over c
    np.testing.assert_allclose(feature_loss(s, t, "ce"), ce, rtol=1e-5)
    np.testing.assert_allclose(feature_loss(s, t, "l2"), ((s - t) ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(feature_loss(s, t, "l1"), np.abs(s - t).mean(), rtol=1e-5)
    sv, tv = s.reshape(-1).astype(np.float64), t.reshape(-1).astype(np.float64)
    cos = 1 - sv @ tv / (np.linalg.norm(sv) * np.linalg.norm(tv) + 1e-6)
    np.testing.assert_allclose(feature_loss(s, t, "cos"), cos, rtol=1e-5)


def test_cos_is_whole_batch_not_per_sample():
    s = np.array([[1.0, 0.0], [0.0, 10.0]], np.float32)
    t = np.array([[1.0, 0.0], [10.0, 0.0]], np.float32)
    # whole vectors [1,0,0,10] . [1,0,10,0] = 1; norms sqrt(101) each
    np.testing.assert_allclose(feature_loss(s, t, "cos"), 1 - 1 / (101 + 1e-6), rtol=1e-6)


def test_no_gradient_into_teacher(feats):
    s, t = feats
    for kind in ("ce", "l2", "l1", "cos"):
        g = jax.grad(lambda tt: feature_loss(s, tt, kind))(jnp.asarray(t))
        assert float(jnp.abs(g).max()) == 0.0


def test_task_loss_hard_and_soft():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
    y = np.array([1, 2])
    lp = _np_log_softmax(logits)
    np.testing.assert_allclose(task_loss(logits, y), -(lp[0, 1] + lp[1, 2]) / 2, rtol=1e-6)
    soft = np.array([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]], np.float32)
    np.testing.assert_allclose(task_loss(logits, soft), -(soft * lp).sum(-1).mean(), rtol=1e-6)


@pytest.mark.parametrize("mode", ELF_MODES)
@pytest.mark.parametrize("soft", [False, True])
def test_elf_objective_modes(mode, soft, feats):
    s, t = feats
    rng = np.random.default_rng(1)
    li = rng.normal(size=(3, 4)).astype(np.float32)
    lf = rng.normal(size=(3, 4)).astype(np.float32)
    if soft:
        y = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
        yy = y
    else:
        y = np.array([0, 3, 1], np.int32)
        yy = np.eye(4, dtype=np.float32)[y]
    ce = lambda lg: -(yy * _np_log_softmax(lg)).sum(-1).mean()  # noqa: E731
    front = -(t * _np_log_softmax(s)).sum(-1).mean()
    a, b = 0.3, 2.5
    want = {
        "task": ce(li),
        "front_task": a * front + ce(li),
        "rear_task": b * ce(lf) + ce(li),
        "front_rear": a * front + b * ce(lf),
        "front_rear_task": a * front + b * ce(lf) + ce(li),
    }[mode]
    loss, aux = elf_objective(li, lf, s, t, y, mode, "ce", a, b)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["task"], ce(li), rtol=1e-5)
    assert set(aux) >= {"loss", "task", "front", "rear", "acc"}


def test_mask_equals_smaller_batch(feats):
    s, t = feats
    rng = np.random.default_rng(2)
    li = rng.normal(size=(3, 4)).astype(np.float32)
    lf = rng.normal(size=(3, 4)).astype(np.float32)
    y = np.array([0, 3, 1], np.int32)
    mask = np.array([1, 1, 0], np.float32)
    for kind in ("ce", "l2", "l1", "cos"):
        full, _ = elf_objective(li, lf, s, t, y, "front_rear_task", kind, 1.0, 1.0, mask=mask)
        small, _ = elf_objective(li[:2], lf[:2], s[:2], t[:2], y[:2], "front_rear_task", kind, 1.0, 1.0)
        np.testing.assert_allclose(full, small, rtol=1e-5)


def test_bad_arguments(feats):
    s, t = feats
    with pytest.raises(ValueError, match="kind"):
        feature_loss(s, t, "kl")
    with pytest.raises(ValueError, match="mode"):
        elf_objective(np.zeros((3, 4)), None, s, t, np.zeros(3, np.int32), "front", "ce", 1, 1)
    with pytest.raises(ValueError, match="does not match"):
        feature_loss(s, t[:, :1], "l2")
    with pytest.raises(ValueError, match="logits_feat"):
        elf_objective(np.zeros((3, 4)), None, s, t, np.zeros(3, np.int32), "rear_task", "ce", 1, 1)
