"""ZCA whitening (kornia ZCAWhitening semantics), caching, and load(zca=True)."""

import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.data import ZCA, fit_zca, load, zca_for


def _data(n=400, shape=(4, 4, 2), seed=0):
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    mix = rng.normal(size=(d, d)) * np.linspace(0.05, 1.0, d)  # anisotropic, correlated
    return (rng.normal(size=(n, d)) @ mix.T + 0.3).reshape((n,) + shape).astype(np.float32)


def test_matches_kornia_formula():
    x = _data()
    z = fit_zca(x, eps=0.1)
    flat = x.reshape(len(x), -1).astype(np.float64)
    mu = flat.mean(0)
    cov = (flat - mu).T @ (flat - mu) / (len(x) - 1)  # unbiased, as kornia
    u, s, _ = np.linalg.svd(cov)
    t = u @ np.diag(1 / np.sqrt(s + 0.1)) @ u.T
    np.testing.assert_allclose(z.transform, t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z.inverse_transform, u @ np.diag(np.sqrt(s + 0.1)) @ u.T,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z.apply(x).reshape(len(x), -1), (flat - mu) @ t,
                               rtol=1e-4, atol=1e-4)


def test_round_trip_and_identity_covariance():
    x = _data()
    z = fit_zca(x, eps=1e-8)
    w = z.apply(x)
    np.testing.assert_allclose(z.invert(w), x, atol=2e-4)
    cov = np.cov(w.reshape(len(x), -1), rowvar=False)
    np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=2e-3)
    # with the reference eps the spectrum is shrunk: cov = U diag(S/(S+eps)) U^T, all <= 1
    z1 = fit_zca(x, eps=0.1)
    ev = np.linalg.eigvalsh(np.cov(z1.apply(x).reshape(len(x), -1), rowvar=False))
    assert ev.max() < 1.0 + 1e-3
    np.testing.assert_allclose(z1.invert(z1.apply(x)), x, atol=2e-4)


def test_jax_arrays_and_shape_errors():
    x = _data()
    z = fit_zca(x)
    wj = z.apply(jnp.asarray(x))
    assert isinstance(wj, jnp.ndarray)
    np.testing.assert_allclose(np.asarray(wj), z.apply(x), atol=1e-4)
    with pytest.raises(ValueError, match="fitted on images of shape"):
        z.apply(x.reshape(len(x), 2, 4, 4))
    with pytest.raises(ValueError):
        fit_zca(x[0])


def test_cache_roundtrip(tmp_path):
    x = _data()
    z1 = zca_for("toy", x, cache_dir=tmp_path)
    files = list(tmp_path.glob("toy*_eps0.1_*.npz"))
    assert len(files) == 1
    z2 = zca_for("toy", x, cache_dir=tmp_path)
    np.testing.assert_array_equal(z1.transform, z2.transform)
    z3 = ZCA.load(files[0])
    assert z3.eps == 0.1 and z3.image_shape == (4, 4, 2) and z3.name == "toy"
    zca_for("toy", x[:300], cache_dir=tmp_path)  # other train images -> other key
    assert len(list(tmp_path.glob("toy*.npz"))) == 2


def test_load_with_zca_uses_train_fit(tmp_path):
    tr = load("digits", "train", zca=True, zca_cache_dir=tmp_path)
    te = load("digits", "test", zca=True, zca_cache_dir=tmp_path)
    assert tr.zca is not None and not tr.normalized  # reference: ZCA on [0, 1] pixels
    np.testing.assert_array_equal(tr.zca.transform, te.zca.transform)
    raw = load("digits", "test", normalize=False)
    np.testing.assert_allclose(te.to_unit(te.images), raw.images, atol=1e-4)
    np.testing.assert_allclose(te.from_unit(raw.images), te.images, atol=1e-4)
    assert len(list(tmp_path.glob("digits*.npz"))) == 1
