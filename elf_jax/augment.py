"""Differentiable siamese augmentation (DSA) in JAX.

A re-implementation of the DC/DSA/MTT reference `DiffAugment` with `ParamDiffAug`
(docs/METHOD.md, "DSA"): six groups (color, crop, cutout, flip, scale, rotate), mode "S" (one group
per call, parameters per sample) and mode "M" (every group in sequence). Images are NHWC
float. Everything is a pure function of a `jax.random` key: the same key on two batches gives
the same group and the same per-sample parameters, which is what "siamese" means.

Numerics follow the reference exactly where it matters:
- scale / rotate: PyTorch `affine_grid` + `grid_sample(align_corners=True)`, bilinear, zero
  padding (`affine_grid_sample`; the grid reproduces torch's float32 linspace bit for bit,
  outputs agree with torch to <1e-5 on [0, 1] images, tests/test_augment.py);
- crop: integer shifts in [-s, s], s = int(size * 0.125 + 0.5), zero fill;
- cutout: a square of int(size * 0.5 + 0.5) centred at an offset in [0, size] (even square),
  clipped to the image;
- color: brightness x + (u - 0.5) * 1.0, saturation mix with the per-pixel channel mean
  (factor u * 2), contrast mix with the whole image's mean (factor u + 0.5), in that order;
- flip: horizontal (axis 2) with probability 0.5.

Randomness differs from torch's generator of course; the distributions are the same.

Siamese calls and batch sizes: sample i's parameters depend only on (key, group, i), never on
the batch size, so two batches of different sizes passed the same key share the group and
the parameters of their first min(N, M) samples (the reference on CPU behaves the same way).
With `DSAParams(batchmode=True)` every sample uses sample 0's parameters, as the reference
does whenever a seed is passed (its siamese DC/DSA and DM calls); then batches of any sizes
get identical transformations.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from functools import lru_cache
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DSAParams",
    "GROUPS",
    "affine_grid_sample",
    "apply_group",
    "chosen_group",
    "draw_params",
    "dsa",
    "parse_strategy",
]

GROUPS: Tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
# Uniform numbers each group needs per sample.
_NUM_UNIFORMS = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """The reference `ParamDiffAug` values. Hashable: pass it as a static argument."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2  # sx, sy ~ U[1/ratio, ratio]
    ratio_rotate: float = 15.0  # degrees, angle ~ U[-ratio, ratio]
    ratio_crop_pad: float = 0.125  # shift ~ randint[-s, s], s = int(size * ratio + 0.5)
    ratio_cutout: float = 0.5  # square side int(size * ratio + 0.5)
    brightness: float = 1.0  # x + (u - 0.5) * brightness
    saturation: float = 2.0  # factor u * saturation
    contrast: float = 0.5  # factor u + contrast
    batchmode: bool = False  # True: all samples share sample 0's parameters (reference seeded)


def parse_strategy(strategy: str) -> Tuple[str, ...]:
    """'color_crop' -> ('color', 'crop'); 'none', 'None' or '' -> ()."""
    if strategy is None or strategy in ("", "none", "None"):
        return ()
    groups = tuple(strategy.split("_"))
    for g in groups:
        if g not in GROUPS:
            near = difflib.get_close_matches(g, GROUPS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(
                f"unknown DSA group {g!r} in strategy {strategy!r}; known groups: "
                f"{', '.join(GROUPS)} (joined with '_'), or 'none'.{hint}"
            )
    return groups


def _check_images(images) -> None:
    if images.ndim != 4:
        raise ValueError(
            f"dsa expects NHWC images of rank 4, got shape {tuple(images.shape)}; "
            "add a batch axis (x[None]) or vmap over the extra axes"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"dsa expects float images, got dtype {images.dtype}; convert (and normalize) first"
        )


# ---------------------------------------------------------------------------------------
# Parameters


def _uniforms(key, n: int, k: int, batchmode: bool) -> jax.Array:
    """[n, k] uniforms; row i depends only on (key, i), so prefixes agree across batch sizes."""
    if batchmode:
        row = jax.random.uniform(jax.random.fold_in(key, 0), (k,))
        return jnp.broadcast_to(row, (n, k))
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (k,)))(
        jnp.arange(n, dtype=jnp.uint32)
    )


def _randint(u, lo: int, hi: int) -> jax.Array:
    """Integers in [lo, hi) from uniforms in [0, 1)."""
    span = hi - lo
    return lo + jnp.minimum(jnp.floor(u * span).astype(jnp.int32), span - 1)


def _crop_shift(size: int, params: DSAParams) -> int:
    return int(size * params.ratio_crop_pad + 0.5)


def _cutout_size(size: int, params: DSAParams) -> int:
    return int(size * params.ratio_cutout + 0.5)


def draw_params(key, group: str, shape, params: DSAParams = DSAParams()) -> Dict[str, jax.Array]:
    """Per-sample parameters of one group for images of `shape` (NHWC), as `dsa` draws them.

    color: brightness (additive), saturation and contrast (multiplicative factors);
    crop: shift_h, shift_w (int); cutout: center_h, center_w (int); flip: flip (bool);
    scale: scale_w, scale_h (theta[0,0], theta[1,1]); rotate: angle (radians).
    """
    n, h, w = int(shape[0]), int(shape[1]), int(shape[2])
    u = _uniforms(key, n, _NUM_UNIFORMS[group], params.batchmode)
    if group == "color":
        return {
            "brightness": (u[:, 0] - 0.5) * params.brightness,
            "saturation": u[:, 1] * params.saturation,
            "contrast": u[:, 2] + params.contrast,
        }
    if group == "crop":
        sh, sw = _crop_shift(h, params), _crop_shift(w, params)
        return {
            "shift_h": _randint(u[:, 0], -sh, sh + 1),
            "shift_w": _randint(u[:, 1], -sw, sw + 1),
        }
    if group == "cutout":
        ch, cw = _cutout_size(h, params), _cutout_size(w, params)
        return {
            "center_h": _randint(u[:, 0], 0, h + (1 - ch % 2)),
            "center_w": _randint(u[:, 1], 0, w + (1 - cw % 2)),
        }
    if group == "flip":
        return {"flip": u[:, 0] < params.prob_flip}
    if group == "scale":
        r = params.ratio_scale
        lo = 1.0 / r
        return {"scale_w": u[:, 0] * (r - lo) + lo, "scale_h": u[:, 1] * (r - lo) + lo}
    if group == "rotate":
        return {"angle": (u[:, 0] - 0.5) * 2 * params.ratio_rotate / 180 * float(np.pi)}
    raise ValueError(f"unknown DSA group {group!r}; known: {', '.join(GROUPS)}")


# ---------------------------------------------------------------------------------------
# Deterministic transformations


def _color(x, brightness, saturation, contrast):
    b = lambda v: v.astype(x.dtype)[:, None, None, None]  # noqa: E731
    x = x + b(brightness)
    # Channel mean as explicit adds: XLA's reduction over a size-3 minor axis is ~10x slower.
    c = x.shape[3]
    m = x[..., 0:1]
    for i in range(1, c):
        m = m + x[..., i : i + 1]
    m = m / c
    x = (x - m) * b(saturation) + m
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - m) * b(contrast) + m


def _crop(x, shift_h, shift_w, pad_h: int, pad_w: int):
    """out[n, i, j] = x[n, i + shift_h, j + shift_w], zero outside (|shift| <= pad)."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    def take(im, a, b):
        return jax.lax.dynamic_slice(im, (pad_h + a, pad_w + b, 0), (h, w, c))

    return jax.vmap(take)(xp, shift_h.astype(jnp.int32), shift_w.astype(jnp.int32))


def _cutout(x, center_h, center_w, size_h: int, size_w: int):
    n, h, w, _ = x.shape
    top = (center_h - size_h // 2)[:, None]
    left = (center_w - size_w // 2)[:, None]
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_h = (rows >= top) & (rows < top + size_h)
    in_w = (cols >= left) & (cols < left + size_w)
    mask = ~(in_h[:, :, None] & in_w[:, None, :])
    return x * mask[..., None].astype(x.dtype)


def _flip(x, flip):
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


@lru_cache(maxsize=None)
def _linspace_like_torch(n: int) -> np.ndarray:
    """torch.linspace(-1, 1, n) in float32, bit for bit (its CPU kernel: two halves, fma)."""
    if n <= 1:
        return np.zeros((max(n, 0),), np.float32)  # torch's affine_grid uses 0 for one step
    step = np.float64(np.float32(np.float32(2.0) / np.float32(n - 1)))
    i = np.arange(n)
    lo = (-1.0 + step * i).astype(np.float32)
    hi = (1.0 - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _source_coords(theta, h: int, w: int, dtype):
    """Pixel coordinates sampled for each output pixel, as affine_grid + grid_sample compute."""
    theta = theta.astype(dtype)
    bx = jnp.asarray(_linspace_like_torch(w), dtype)[None, None, :]
    by = jnp.asarray(_linspace_like_torch(h), dtype)[None, :, None]
    t = lambda r, c: theta[:, r, c][:, None, None]  # noqa: E731
    gx = (bx * t(0, 0) + by * t(0, 1)) + t(0, 2)
    gy = (bx * t(1, 0) + by * t(1, 1)) + t(1, 2)
    ix = (gx + 1) * ((w - 1) / 2)
    iy = (gy + 1) * ((h - 1) / 2)
    return ix, iy


def _bilinear_taps(images, theta):
    """Flat row indices of the 2x2 neighbourhood (in the image padded by one zero pixel,
    flattened to [N*(H+2)*(W+2), C]) and the four bilinear weights, zero for corners outside
    the image (grid_sample's zero padding). Weights as torch's CPU kernel forms them."""
    n, h, w, _ = images.shape
    dtype = images.dtype
    # XLA may contract a*b + c into an fma here and move a coordinate by an ulp, so results
    # agree with torch to ~1e-6 relative (a few 1e-6 absolute on [0, 1] images), not bitwise.
    ix, iy = _source_coords(theta, h, w, dtype)
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    fx = ix - x0
    fy = iy - y0
    zero = jnp.zeros((), dtype)
    wx0 = jnp.where((x0 >= 0) & (x0 <= w - 1), 1 - fx, zero)
    wx1 = jnp.where((x0 >= -1) & (x0 <= w - 2), fx, zero)
    wy0 = jnp.where((y0 >= 0) & (y0 <= h - 1), 1 - fy, zero)
    wy1 = jnp.where((y0 >= -1) & (y0 <= h - 2), fy, zero)
    # Clipped corners have weight 0, so clipping only keeps the reads inside the padded image.
    xi = jnp.clip(x0 + 1, 0, w).astype(jnp.int32)
    yi = jnp.clip(y0 + 1, 0, h).astype(jnp.int32)
    base = jnp.arange(n, dtype=jnp.int32)[:, None, None] * ((h + 2) * (w + 2)) + yi * (w + 2) + xi
    rows = (base, base + 1, base + (w + 2), base + (w + 3))
    weights = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)
    return rows, weights


def _padded_rows(images):
    c = images.shape[-1]
    return jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, c)


def _sample_taps(images, theta):
    # Differentiation-friendly form: one gather of the four rows, so the transpose is a
    # single scatter-add.
    rows, weights = _bilinear_taps(images, theta)
    vals = _padded_rows(images)[jnp.stack(rows, -1)]  # [N, H, W, 4, C]
    return jnp.einsum("nhwk,nhwkc->nhwc", jnp.stack(weights, -1), vals)


@jax.custom_jvp
def affine_grid_sample(images, theta):
    """PyTorch `grid_sample(x, affine_grid(theta, x.shape, align_corners=True),
    mode="bilinear", padding_mode="zeros", align_corners=True)` for NHWC images.

    images: [N, H, W, C] float; theta: [N, 2, 3] (row 0 maps to the width coordinate, as in
    torch). Agrees with torch's CPU kernel to <1e-5 on [0, 1] images (same grid, same tap
    weights; XLA may fuse a multiply-add into an fma). Differentiable w.r.t. images and
    theta, forward and reverse mode.
    """
    rows, weights = _bilinear_taps(images, theta)
    flat = _padded_rows(images)
    out = None
    for r, wt in zip(rows, weights):  # nw + ne + sw + se, torch's order
        term = wt[..., None] * flat[r]
        out = term if out is None else out + term
    return out


@affine_grid_sample.defjvp
def _affine_grid_sample_jvp(primals, tangents):
    # Fast four-gather forward; tangents (and, by transposition, gradients) through the
    # single-gather form, whose transpose is one scatter-add instead of four.
    out = affine_grid_sample(*primals)
    _, tangent = jax.jvp(_sample_taps, primals, tangents)
    return out, tangent


def _scale_theta(scale_w, scale_h):
    z = jnp.zeros_like(scale_w)
    return jnp.stack([jnp.stack([scale_w, z, z], -1), jnp.stack([z, scale_h, z], -1)], 1)


def _rotate_theta(angle):
    z = jnp.zeros_like(angle)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([jnp.stack([cos, -sin, z], -1), jnp.stack([sin, cos, z], -1)], 1)


def apply_group(group: str, images, p: Dict[str, jax.Array], params: DSAParams = DSAParams()):
    """Apply one group with explicit per-sample parameters `p` (as from `draw_params`).

    Crop shifts must lie in the range `params` allows (|shift| <= int(size * ratio + 0.5)).
    """
    _, h, w, _ = images.shape
    if group == "color":
        return _color(images, p["brightness"], p["saturation"], p["contrast"])
    if group == "crop":
        pad_h, pad_w = _crop_shift(h, params), _crop_shift(w, params)
        return _crop(images, p["shift_h"], p["shift_w"], pad_h, pad_w)
    if group == "cutout":
        size_h, size_w = _cutout_size(h, params), _cutout_size(w, params)
        return _cutout(images, p["center_h"], p["center_w"], size_h, size_w)
    if group == "flip":
        return _flip(images, p["flip"])
    if group == "scale":
        return affine_grid_sample(images, _scale_theta(p["scale_w"], p["scale_h"]))
    if group == "rotate":
        return affine_grid_sample(images, _rotate_theta(p["angle"]))
    raise ValueError(f"unknown DSA group {group!r}; known: {', '.join(GROUPS)}")


def _random_group(key, images, group: str, params: DSAParams):
    return apply_group(group, images, draw_params(key, group, images.shape, params), params)


# ---------------------------------------------------------------------------------------
# Entry point


def chosen_group(key, strategy: str = DEFAULT_STRATEGY) -> jax.Array:
    """Index into `parse_strategy(strategy)` of the group mode "S" applies for `key`."""
    groups = parse_strategy(strategy)
    if len(groups) <= 1:
        return jnp.zeros((), jnp.int32)
    return jax.random.randint(jax.random.split(key)[0], (), 0, len(groups))


def dsa(
    key,
    images,
    strategy: str = DEFAULT_STRATEGY,
    mode: str = "S",
    params: DSAParams = DSAParams(),
):
    """Differentiable siamese augmentation of NHWC float `images`.

    mode "S": one group of `strategy` drawn per call (uniformly, as the reference), applied
    with per-sample parameters; mode "M": every group in order. `strategy`, `mode` and
    `params` are static (Python values); `key` and `images` may be traced. The same key gives
    the same transformation (siamese); see the module docstring for batches of different
    sizes. Shape and dtype are kept.
    """
    groups = parse_strategy(strategy)
    if mode not in ("S", "M"):
        raise ValueError(
            f"unknown DSA mode {mode!r}; use 'S' (one group per call) or 'M' (all groups)"
        )
    if not groups:
        return images
    images = jnp.asarray(images)
    _check_images(images)
    if mode == "M":
        for pos, g in enumerate(groups):
            k = jax.random.fold_in(key, pos)
            apply = functools.partial(_random_group, group=g, params=params)
            # Both branches are the same group: the conditional only stops XLA from fusing
            # the whole chain into one loop around a gather, which runs scalar (~50x slower
            # on CPU for color_crop_cutout_flip).
            pick = jax.random.bits(jax.random.fold_in(k, 1 << 20), (), jnp.uint8) < 128
            images = jax.lax.cond(pick, apply, apply, k, images)
        return images
    k_params = jax.random.split(key)[1]
    if len(groups) == 1:
        return _random_group(jax.random.fold_in(k_params, 0), images, groups[0], params)
    index = chosen_group(key, strategy)
    branches = [
        (lambda x, k, g=g, pos=pos: _random_group(jax.random.fold_in(k, pos), x, g, params))
        for pos, g in enumerate(groups)
    ]
    return jax.lax.switch(index, branches, images, k_params)

