"""A small Vision Transformer with a declared ELF split (beyond the reference).

Patch embedding (conv ``patch x patch`` / ``patch``) -> learned position embedding ->
``depth`` pre-norm encoder blocks (multi-head self-attention, GELU MLP) -> layer norm ->
mean over tokens -> dense. No class token, so the token grid stays a spatial map.

Defaults (``ViT``): patch 4, dim 128, depth 4, heads 4, MLP 256; about 0.55M parameters on
32x32x3. ELF split after ``split_block`` (default 2) encoder blocks: the front output is the
token grid as NHWC ``[N, H/patch, W/patch, dim]`` (8x8x128 on 32x32), so a teacher feature of
another shape needs the adapter.

Parameter tree: ``patch_embed/{kernel, bias}``, ``pos_embed/embedding [1, h, w, dim]``,
``block{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}``, ``norm``, ``classifier``.
``capture_intermediates`` records ``block1..blockD`` (token sequences) and ``pre_logits``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L


class PosEmbed(nn.Module):
    @nn.compact
    def __call__(self, x):
        shape = (1,) + tuple(x.shape[1:])
        L._check_existing(self, "params", "embedding", shape,
                          lambda have: f"token grid {shape[1:3]} differs from {have[1:3]}")
        emb = self.param("embedding", nn.initializers.normal(0.02), shape, jnp.float32)
        return x + emb.astype(x.dtype)


class Attention(nn.Module):
    dim: int
    heads: int
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    def setup(self):
        self.qkv = L.Dense(3 * self.dim, dtype=self.dtype, init_mode=self.init_mode)
        self.proj = L.Dense(self.dim, dtype=self.dtype, init_mode=self.init_mode)

    def __call__(self, x):
        n, t, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(hd).astype(q.dtype)
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", w, v).reshape(n, t, d)
        return self.proj(out)


class MlpBlock(nn.Module):
    dim: int
    hidden: int
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    def setup(self):
        self.fc1 = L.Dense(self.hidden, dtype=self.dtype, init_mode=self.init_mode)
        self.fc2 = L.Dense(self.dim, dtype=self.dtype, init_mode=self.init_mode)

    def __call__(self, x):
        return self.fc2(L.activation("gelu")(self.fc1(x)))


class EncoderBlock(nn.Module):
    dim: int
    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    def setup(self):
        kw = dict(dtype=self.dtype, init_mode=self.init_mode)
        self.norm1 = L.LayerNorm(dtype=self.dtype)
        self.attn = Attention(self.dim, self.heads, **kw)
        self.norm2 = L.LayerNorm(dtype=self.dtype)
        self.mlp = MlpBlock(self.dim, self.mlp_dim, **kw)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def check_sizes(dim: int, heads: int, depth: int, split_block: int, where: str = "ViT") -> None:
    """`ValueError` unless the heads divide `dim` and the split lies in 0..depth (checked
    when the model is built: `elf_jax.models.get_model`, and by `setup`)."""
    if dim % heads:
        raise ValueError(f"{where}: dim={dim} must be divisible by heads={heads}")
    if not 0 <= split_block <= depth:
        raise ValueError(f"{where}: split_block must lie in 0..depth={depth}")


class ViT(nn.Module):
    num_classes: int = 10
    patch: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 256
    split_block: int = 2
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    has_split = True

    def setup(self):
        L.check_init(self.init_mode)
        check_sizes(self.dim, self.heads, self.depth, self.split_block)
        kw = dict(dtype=self.dtype, init_mode=self.init_mode)
        self.patch_embed = L.Conv(self.dim, self.patch, stride=self.patch, padding=0, **kw)
        self.pos_embed = PosEmbed()
        blocks = []
        for i in range(self.depth):
            blk = EncoderBlock(self.dim, self.heads, self.mlp_dim, **kw)
            setattr(self, f"block{i + 1}", blk)
            blocks.append(blk)
        self.blocks = blocks
        self.norm = L.LayerNorm(dtype=self.dtype)
        self.pre_logits = L.Tap()
        self.classifier = L.Dense(self.num_classes, **kw)

    def front(self, x, train: bool = False):
        L.check_images(x, "ViT")
        g = self.pos_embed(self.patch_embed(x))
        n, h, w, d = g.shape
        t = g.reshape(n, h * w, d)
        for blk in self.blocks[: self.split_block]:
            t = blk(t)
        return t.reshape(n, h, w, d)

    def rear(self, f, train: bool = False):
        L.check_images(f, "ViT.rear", what="feature")
        n, h, w, d = f.shape
        t = f.reshape(n, h * w, d)
        for blk in self.blocks[self.split_block:]:
            t = blk(t)
        t = self.norm(t)
        return self.classifier(self.pre_logits(jnp.mean(t, axis=1)))

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
