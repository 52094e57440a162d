"""DSA throughput: mode "S" on a batch of 32x32x3 images under jit, per group and full strategy.

    .venv/bin/python benchmarks/bench_dsa.py [--batch 256] [--iters 200] [--grad]

Prints ms per batch and images/s for each group alone and for the full strategy (mode S, a
fresh key per call so every group is drawn), plus mode M. With --grad also times the
gradient w.r.t. the images (what distillation pays). Add --torch to time the reference
formulas re-implemented in PyTorch on the same machine, for comparison.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.augment import DEFAULT_STRATEGY, GROUPS, dsa


def _time(fn, keys, x, iters: int) -> float:
    out = fn(keys[0], x)
    jax.block_until_ready(out)
    for k in keys[1:6]:
        jax.block_until_ready(fn(k, x))
    best = []
    for rep in range(3):
        t0 = time.perf_counter()
        for i in range(iters):
            out = fn(keys[i % len(keys)], x)
        jax.block_until_ready(out)
        best.append((time.perf_counter() - t0) / iters)
    return min(best) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--grad", action="store_true", help="also time d(sum of squares)/d(images)")
    ap.add_argument("--torch", action="store_true", help="also time a torch re-implementation")
    args = ap.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3), jnp.float32)
    keys = list(jax.random.split(jax.random.key(1), 64))
    cases = [(g, "S") for g in GROUPS] + [(DEFAULT_STRATEGY, "S"), (DEFAULT_STRATEGY, "M")]
    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {cpu}")
    size = f"{args.size}x{args.size}x3"
    print(f"batch {args.batch} x {size} float32, jit, best of 3 x {args.iters} calls")
    head = f"{'strategy':<40} {'mode':<4} {'ms/batch':>9} {'images/s':>11}"
    if args.grad:
        head += f" {'grad ms':>9}"
    print(head)
    for strategy, mode in cases:
        fwd = jax.jit(lambda k, im, s=strategy, m=mode: dsa(k, im, s, m))
        ms = _time(fwd, keys, x, args.iters)
        line = f"{strategy:<40} {mode:<4} {ms:9.3f} {args.batch / ms * 1e3:11.0f}"
        if args.grad:
            g = jax.jit(jax.grad(lambda im, k, s=strategy, m=mode: jnp.sum(dsa(k, im, s, m) ** 2)))
            gms = _time(lambda k, im: g(im, k), keys, x, max(args.iters // 4, 10))
            line += f" {gms:9.3f}"
        print(line, flush=True)

    if args.torch:
        _bench_torch(np.asarray(x), args)


def torch_dsa_groups(n: int, h: int, w: int) -> dict:
    """The reference DiffAugment formulas (ParamDiffAug defaults) in PyTorch, NCHW, unseeded:
    ``{group: fn(x [n, C, h, w]) -> same shape}`` for the six groups. Also used by
    ``bench_vs_torch.py`` as the torch side of the ELF step."""
    import torch
    import torch.nn.functional as F

    def color(x):
        x = x + (torch.rand(n, 1, 1, 1) - 0.5)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (torch.rand(n, 1, 1, 1) * 2.0) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - m) * (torch.rand(n, 1, 1, 1) + 0.5) + m

    def crop(x):
        s = int(h * 0.125 + 0.5)
        tx = torch.randint(-s, s + 1, size=[n, 1, 1])
        ty = torch.randint(-s, s + 1, size=[n, 1, 1])
        ar = torch.arange
        gb, gx, gy = torch.meshgrid(ar(n), ar(h), ar(w), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, h + 1)
        gy = torch.clamp(gy + ty + 1, 0, w + 1)
        xp = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        return xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)

    def cutout(x):
        cs = int(h * 0.5 + 0.5)
        ox = torch.randint(0, h + (1 - cs % 2), size=[n, 1, 1])
        oy = torch.randint(0, w + (1 - cs % 2), size=[n, 1, 1])
        ar = torch.arange
        gb, gx, gy = torch.meshgrid(ar(n), ar(cs), ar(cs), indexing="ij")
        gx = torch.clamp(gx + ox - cs // 2, min=0, max=h - 1)
        gy = torch.clamp(gy + oy - cs // 2, min=0, max=w - 1)
        mask = torch.ones(n, h, w)
        mask[gb, gx, gy] = 0
        return x * mask.unsqueeze(1)

    def flip(x):
        return torch.where(torch.rand(n, 1, 1, 1) < 0.5, x.flip(3), x)

    def affine(x, theta):
        grid = F.affine_grid(theta, x.shape, align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def scale(x):
        sx = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
        sy = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
        z = torch.zeros(n)
        return affine(x, torch.stack([torch.stack([sx, z, z], -1), torch.stack([z, sy, z], -1)], 1))

    def rotate(x):
        a = (torch.rand(n) - 0.5) * 2 * 15.0 / 180 * float(np.pi)
        z = torch.zeros(n)
        row0 = torch.stack([a.cos(), -a.sin(), z], -1)
        th = torch.stack([row0, torch.stack([a.sin(), a.cos(), z], -1)], 1)
        return affine(x, th)

    return dict(color=color, crop=crop, cutout=cutout, flip=flip, scale=scale, rotate=rotate)


def torch_dsa(x, strategy: str, groups: dict):
    """The reference ``DiffAugment`` in mode "S": ONE group of ``strategy`` drawn uniformly
    per call (torch's generator), applied with per-sample parameters. ``groups`` from
    :func:`torch_dsa_groups`."""
    import torch

    names = [g for g in strategy.split("_") if g]
    return groups[names[int(torch.randint(0, len(names), size=(1,)).item())]](x)


def _bench_torch(x_nhwc: np.ndarray, args) -> None:
    """The reference DiffAugment formulas (ParamDiffAug defaults), NCHW, unseeded."""
    import torch

    x = torch.tensor(x_nhwc).permute(0, 3, 1, 2).contiguous()
    n, _, h, w = x.shape
    fns = torch_dsa_groups(n, h, w)
    print(f"\ntorch {torch.__version__} re-implementation (threads {torch.get_num_threads()})")

    def grad_step(f):
        xg = x.clone().requires_grad_(True)
        f(xg).pow(2).sum().backward()

    tot, gtot = [], []
    for name, f in fns.items():
        for _ in range(5):
            f(x)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            f(x)
        ms = (time.perf_counter() - t0) / args.iters * 1e3
        tot.append(ms)
        line = f"{name:<40} {'S':<4} {ms:9.3f} {n / ms * 1e3:11.0f}"
        if args.grad:
            giters = max(args.iters // 4, 10)
            grad_step(f)
            t0 = time.perf_counter()
            for _ in range(giters):
                grad_step(f)
            gtot.append((time.perf_counter() - t0) / giters * 1e3)
            line += f" {gtot[-1]:9.3f}"
        print(line)
    mean = float(np.mean(tot))
    line = f"{'mean over groups (mode S)':<40} {'S':<4} {mean:9.3f} {n / mean * 1e3:11.0f}"
    if gtot:
        line += f" {np.mean(gtot):9.3f}"
    print(line)


if __name__ == "__main__":
    main()
