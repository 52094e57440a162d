"""DSA (elf_jax.augment): reference numerics, siamese behaviour, AD/jit/vmap properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elf_jax.augment import (
    DEFAULT_STRATEGY,
    GROUPS,
    DSAParams,
    affine_grid_sample,
    apply_group,
    chosen_group,
    draw_params,
    dsa,
    parse_strategy,
)

SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
dsa_jit = jax.jit(dsa, static_argnames=("strategy", "mode", "params"))


def _images(seed, shape, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(dtype))


# ---------------------------------------------------------------------------------------
# Reference numerics (torch re-implementation of the DiffAugment formulas, same parameters)


def _torch_group(torch, group, x_nhwc, p, params=DSAParams()):
    """The reference's formulas in NCHW torch, driven by our drawn parameters `p`."""
    F = torch.nn.functional
    x = torch.tensor(np.asarray(x_nhwc)).permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    col = lambda v: torch.tensor(np.asarray(v)).reshape(n, 1, 1, 1)  # noqa: E731
    if group == "color":
        x = x + col(p["brightness"])
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * col(p["saturation"]) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - m) * col(p["contrast"]) + m
    elif group == "crop":
        tx = torch.tensor(np.asarray(p["shift_h"])).long().reshape(n, 1, 1)
        ty = torch.tensor(np.asarray(p["shift_w"])).long().reshape(n, 1, 1)
        ar = torch.arange
        gb, gx, gy = torch.meshgrid(ar(n), ar(h), ar(w), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, h + 1)
        gy = torch.clamp(gy + ty + 1, 0, w + 1)
        xp = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        x = xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    elif group == "cutout":
        ch, cw = int(h * params.ratio_cutout + 0.5), int(w * params.ratio_cutout + 0.5)
        ox = torch.tensor(np.asarray(p["center_h"])).long().reshape(n, 1, 1)
        oy = torch.tensor(np.asarray(p["center_w"])).long().reshape(n, 1, 1)
        ar = torch.arange
        gb, gx, gy = torch.meshgrid(ar(n), ar(ch), ar(cw), indexing="ij")
        gx = torch.clamp(gx + ox - ch // 2, min=0, max=h - 1)
        gy = torch.clamp(gy + oy - cw // 2, min=0, max=w - 1)
        mask = torch.ones(n, h, w)
        mask[gb, gx, gy] = 0
        x = x * mask.unsqueeze(1)
    elif group == "flip":
        x = torch.where(torch.tensor(np.asarray(p["flip"])).reshape(n, 1, 1, 1), x.flip(3), x)
    elif group in ("scale", "rotate"):
        if group == "scale":
            sx = torch.tensor(np.asarray(p["scale_w"]))
            sy = torch.tensor(np.asarray(p["scale_h"]))
            z = torch.zeros(n)
            th = torch.stack([torch.stack([sx, z, z], -1), torch.stack([z, sy, z], -1)], 1)
        else:
            a = torch.tensor(np.asarray(p["angle"]))
            z = torch.zeros(n)
            row0 = torch.stack([a.cos(), torch.sin(-a), z], -1)
            th = torch.stack([row0, torch.stack([a.sin(), a.cos(), z], -1)], 1)
        grid = F.affine_grid(th, list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, align_corners=True)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("hw", [(32, 32), (28, 28), (9, 13), (64, 64), (2, 3)])
def test_affine_grid_sample_matches_torch(hw):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    h, w = hw
    rng = np.random.default_rng(h * 100 + w)
    x = rng.uniform(0, 1, size=(12, h, w, 3)).astype(np.float32)
    theta = (np.eye(2, 3)[None] + 0.4 * rng.normal(size=(12, 2, 3))).astype(np.float32)
    theta[0] = np.eye(2, 3)  # identity
    theta[1] = [[-1, 0, 0], [0, 1, 0]]  # exact flip: samples on pixel centres
    xt = torch.tensor(x).permute(0, 3, 1, 2)
    grid = F.affine_grid(torch.tensor(theta), list(xt.shape), align_corners=True)
    ref = F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    ref = ref.permute(0, 2, 3, 1).numpy()
    out = np.asarray(jax.jit(affine_grid_sample)(x, theta))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("hw", [(32, 32), (28, 28), (15, 10)])
def test_groups_match_torch_reference(group, hw):
    torch = pytest.importorskip("torch")
    x = _images(7, (16, *hw, 3))
    p = draw_params(jax.random.key(3), group, x.shape)
    ref = _torch_group(torch, group, x, p)
    out = np.asarray(jax.jit(functools.partial(apply_group, group))(x, p))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    if group in ("crop", "cutout", "flip"):  # pure data movement: bit for bit
        np.testing.assert_array_equal(out, ref)


@pytest.mark.torch
def test_dsa_equals_chosen_group_with_its_parameters():
    torch = pytest.importorskip("torch")
    x = _images(1, (8, 32, 32, 3))
    groups = parse_strategy(DEFAULT_STRATEGY)
    for seed in range(6):
        key = jax.random.key(seed)
        i = int(chosen_group(key))
        p = draw_params(jax.random.fold_in(jax.random.split(key)[1], i), groups[i], x.shape)
        ref = _torch_group(torch, groups[i], x, p)
        np.testing.assert_allclose(np.asarray(dsa_jit(key, x)), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Parameters


def test_parameter_ranges_match_reference():
    n, h, w = 2000, 32, 32
    key = jax.random.key(0)
    c = draw_params(key, "color", (n, h, w, 3))
    assert -0.5 <= float(c["brightness"].min()) and float(c["brightness"].max()) < 0.5
    assert 0.0 <= float(c["saturation"].min()) and float(c["saturation"].max()) < 2.0
    assert 0.5 <= float(c["contrast"].min()) and float(c["contrast"].max()) < 1.5
    cr = draw_params(key, "crop", (n, h, w, 3))
    for k in ("shift_h", "shift_w"):  # int(32 * 0.125 + 0.5) = 4: all of -4..4
        assert set(np.unique(np.asarray(cr[k])).tolist()) == set(range(-4, 5))
    cu = draw_params(key, "cutout", (n, h, w, 3))
    for k in ("center_h", "center_w"):  # square 16 (even): randint(0, 33)
        assert set(np.unique(np.asarray(cu[k])).tolist()) == set(range(0, 33))
    cu_odd = draw_params(key, "cutout", (n, 30, 30, 3))  # square 15 (odd): randint(0, 30)
    assert set(np.unique(np.asarray(cu_odd["center_h"])).tolist()) == set(range(0, 30))
    fl = np.asarray(draw_params(key, "flip", (n, h, w, 3))["flip"])
    assert abs(fl.mean() - 0.5) < 0.05
    sc = draw_params(key, "scale", (n, h, w, 3))
    for k in ("scale_w", "scale_h"):
        assert 1 / 1.2 - 1e-6 <= float(sc[k].min()) and float(sc[k].max()) <= 1.2 + 1e-6
        assert float(sc[k].min()) < 0.85 and float(sc[k].max()) > 1.18
    ang = np.degrees(np.asarray(draw_params(key, "rotate", (n, h, w, 3))["angle"]))
    assert -15 - 1e-4 <= ang.min() and ang.max() <= 15 + 1e-4 and ang.min() < -14 and ang.max() > 14


def test_mode_s_draws_every_group_uniformly():
    keys = jax.random.split(jax.random.key(0), 1200)
    idx = np.asarray(jax.vmap(chosen_group)(keys))
    counts = np.bincount(idx, minlength=len(GROUPS))
    assert counts.min() > 150 and counts.max() < 250, counts


def test_strategy_parsing_and_errors():
    assert parse_strategy(DEFAULT_STRATEGY) == GROUPS
    assert parse_strategy("none") == parse_strategy("None") == parse_strategy("") == ()
    x = _images(0, (2, 8, 8, 3))
    for s in ("none", "None", ""):
        assert dsa(jax.random.key(0), x, s) is x
    with pytest.raises(ValueError, match="crop"):
        dsa(jax.random.key(0), x, "color_crpo")
    with pytest.raises(ValueError, match="mode"):
        dsa(jax.random.key(0), x, mode="X")
    with pytest.raises(ValueError, match="rank 4"):
        dsa(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="float"):
        dsa(jax.random.key(0), (x * 100).astype(jnp.int32))


# ---------------------------------------------------------------------------------------
# Identity cases


def test_identity_cases_exact():
    x = _images(3, (3, 16, 12, 3))
    key = jax.random.key(5)
    ident = {
        "flip": DSAParams(prob_flip=0.0),
        "crop": DSAParams(ratio_crop_pad=0.0),
        "cutout": DSAParams(ratio_cutout=0.0),
    }
    for group, prm in ident.items():
        np.testing.assert_array_equal(np.asarray(dsa_jit(key, x, group, params=prm)), np.asarray(x))
    # brightness 0, saturation and contrast factor 1: (x - m) * 1 + m is x up to rounding
    p = {"brightness": jnp.zeros(3), "saturation": jnp.ones(3), "contrast": jnp.ones(3)}
    np.testing.assert_allclose(np.asarray(apply_group("color", x, p)), np.asarray(x), atol=1e-6)
    # flip with probability 1 is an exact mirror
    np.testing.assert_array_equal(
        np.asarray(dsa_jit(key, x, "flip", params=DSAParams(prob_flip=1.0))),
        np.asarray(x[:, :, ::-1]),
    )
    # rotate 0 degrees / scale 1: identity theta. torch's float32 grid misses pixel centres by
    # an ulp for most sizes (so does ours, on purpose), hence ~1e-6; exact for 2^k + 1 sizes.
    zero_cases = ((DSAParams(ratio_rotate=0.0), "rotate"), (DSAParams(ratio_scale=1.0), "scale"))
    for prm, group in zero_cases:
        out = np.asarray(dsa_jit(key, x, group, params=prm))
        np.testing.assert_allclose(out, np.asarray(x), atol=1e-5)
    x33 = _images(4, (2, 9, 17, 2))  # sizes 2^k + 1: the grid is exact in binary
    for prm, group in zero_cases:
        out = np.asarray(dsa_jit(key, x33, group, params=prm))
        np.testing.assert_array_equal(out, np.asarray(x33))


def test_crop_and_cutout_semantics():
    x = jnp.arange(1, 1 + 2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)
    prm = DSAParams(ratio_crop_pad=0.375)  # shifts up to int(8 * 0.375 + 0.5) = 3
    p = {"shift_h": jnp.array([1, -2]), "shift_w": jnp.array([0, 3])}
    y = np.asarray(apply_group("crop", x, p, prm))
    xn = np.asarray(x)
    np.testing.assert_array_equal(y[0, :7], xn[0, 1:])  # row i reads row i + 1
    np.testing.assert_array_equal(y[0, 7], 0)
    np.testing.assert_array_equal(y[1, 2:, :5], xn[1, :6, 3:])
    assert (y[1, :2] == 0).all() and (y[1, :, 5:] == 0).all()
    c = {"center_h": jnp.array([0, 8]), "center_w": jnp.array([4, 8])}
    z = np.asarray(apply_group("cutout", x, c))  # square 4: rows [c-2, c+2) clipped
    zero = z == 0
    assert zero[0, :2, 2:6].all() and zero[0].sum() == 8
    assert zero[1, 6:, 6:].all() and zero[1].sum() == 4


# ---------------------------------------------------------------------------------------
# Properties (hypothesis). Few distinct shapes so that compiled functions are reused.

shapes = st.sampled_from([(1, 8, 8, 3), (3, 10, 7, 1), (4, 9, 9, 3)])
strategies = st.sampled_from(list(GROUPS) + [DEFAULT_STRATEGY, "crop_flip"])


@functools.partial(jax.jit, static_argnames=("strategy", "mode"))
def _value_and_grad(key, x, strategy, mode):
    loss = lambda im: jnp.sum(jnp.sin(dsa(key, im, strategy, mode)))  # noqa: E731
    return jax.value_and_grad(loss)(x), dsa(key, x, strategy, mode)


@SETTINGS
@given(
    shape=shapes, strategy=strategies, mode=st.sampled_from(["S", "M"]), seed=st.integers(0, 2**16)
)
def test_shape_dtype_determinism_and_finite_gradients(shape, strategy, mode, seed):
    x = _images(seed, shape)
    key = jax.random.key(seed)
    (_, g), y1 = _value_and_grad(key, x, strategy, mode)
    y2 = dsa_jit(key, x, strategy, mode)  # same key, same output
    assert y1.shape == x.shape and y1.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-6)
    assert np.isfinite(np.asarray(y1)).all()
    assert g.shape == x.shape and np.isfinite(np.asarray(g)).all()


@functools.partial(jax.jit, static_argnames=("params",))
def _every_group(key, x, params=DSAParams()):
    return tuple(dsa(key, x, g, params=params) for g in GROUPS)


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_siamese_prefix_and_batchmode(seed):
    """Same key: the first min(N, M) samples of two batches get the same parameters."""
    x = _images(seed, (6, 10, 10, 3))
    key = jax.random.key(seed)
    for big, small in zip(_every_group(key, x), _every_group(key, x[:4])):
        np.testing.assert_allclose(np.asarray(big[:4]), np.asarray(small), atol=1e-6)
    # batchmode: one draw shared by all samples (the reference's seeded calls)
    same = jnp.broadcast_to(x[:1], x.shape)
    for y in _every_group(key, same, DSAParams(batchmode=True)):
        y = np.asarray(y)
        np.testing.assert_allclose(y, np.broadcast_to(y[:1], y.shape), atol=1e-6)


def test_siamese_real_and_synthetic_share_transformation():
    real, syn = _images(0, (6, 10, 10, 3)), _images(1, (6, 10, 10, 3))
    key = jax.random.key(11)
    bm = DSAParams(batchmode=True)
    both = _every_group(key, jnp.concatenate([real, syn]), bm)
    for r, s_, b in zip(_every_group(key, real, bm), _every_group(key, syn, bm), both):
        np.testing.assert_allclose(np.asarray(r), np.asarray(b[:6]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(s_), np.asarray(b[6:]), atol=1e-6)
    # geometric groups are linear in the image: the transformation commutes with real - syn
    diff = _every_group(key, real - syn)
    for g, r, s_, d in zip(GROUPS, _every_group(key, real), _every_group(key, syn), diff):
        if g != "color":
            np.testing.assert_allclose(np.asarray(r - s_), np.asarray(d), atol=1e-5)


@pytest.mark.parametrize("mode", ["S", "M"])
def test_jit_and_vmap(mode):
    x = _images(2, (2, 3, 8, 8, 3))  # [batches, N, H, W, C]
    keys = jax.random.split(jax.random.key(0), 2)
    f = functools.partial(dsa, strategy="color_crop_rotate", mode=mode)
    single = jax.jit(f)
    per_key = np.stack([np.asarray(single(k, xb)) for k, xb in zip(keys, x)])
    vm = np.asarray(jax.jit(jax.vmap(f))(keys, x))  # batched key: every branch, then select
    np.testing.assert_allclose(vm, per_key, atol=1e-5)
    shared = np.asarray(jax.jit(jax.vmap(f, in_axes=(None, 0)))(keys[1], x))
    np.testing.assert_allclose(shared[1], per_key[1], atol=1e-5)
    gfn = jax.jit(jax.vmap(jax.grad(lambda im, k: jnp.sum(f(k, im) ** 2))))
    assert np.isfinite(np.asarray(gfn(x, keys))).all()


def test_affine_sampler_derivatives():
    x = _images(0, (2, 7, 6, 2))
    noise = np.random.default_rng(1).normal(size=(2, 2, 3)) * 0.3
    theta = jnp.asarray(noise + np.eye(2, 3), jnp.float32)
    u, v = _images(5, x.shape), _images(9, x.shape)

    @jax.jit
    def derivatives(x, theta, u, v):
        sample = lambda im: affine_grid_sample(im, theta)  # noqa: E731
        (gx,) = jax.vjp(sample, x)[1](v)
        tangent = jax.jvp(sample, (x,), (u,))[1]
        f = lambda t: jnp.sum(affine_grid_sample(x, t) * v)  # noqa: E731
        eps = 1e-3
        d = jnp.zeros_like(theta).at[0, 0, 1].set(eps)
        fd = (f(theta + d) - f(theta - d)) / (2 * eps)
        return gx, tangent, affine_grid_sample(u, theta), jax.grad(f)(theta)[0, 0, 1], fd

    gx, tangent, su, gt, fd = derivatives(x, theta, u, v)
    # linear in the image: the jvp is the sampler itself, and the vjp is its transpose
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(su), atol=1e-6)
    np.testing.assert_allclose(float(jnp.vdot(gx, u)), float(jnp.vdot(v, tangent)), rtol=1e-5)
    # gradient w.r.t. theta agrees with a central difference
    np.testing.assert_allclose(float(gt), float(fd), rtol=2e-2, atol=2e-3)


def test_low_precision_dtypes_kept():
    x = _images(0, (2, 8, 8, 3)).astype(jnp.bfloat16)
    for y in _every_group(jax.random.key(1), x):
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape
