"""VGG11 (CIFAR, 32x32) and VGG11ImageNet (64x64) of the ELF ``networks.py``.

cfg ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``; every number is a block
conv3x3 p1 -> norm (instance norm by default, BatchNorm for the ``BN`` variants) -> relu,
``M`` is a 2x2/2 max pool (kept inside the preceding block here). For 28x28 1-channel input
the first conv uses padding 3 (reference rule).

* ``VGG11``: 32x32 -> 1x1x512 -> dense K. ELF split (reference ``VGG11_L5``): front =
  blocks 1..5 ``[64,M,128,M,256,256,M,512]`` -> 4x4x512; rear = ``[512,M,512,512,M]`` + dense.
* ``VGG11ImageNet``: 64x64 -> 2x2x512 -> MLP 2048-4096-4096-K with dropout 0.5 (active when
  ``train=True``; pass ``rngs={"dropout": key}``). ELF split (``VGG11ImageNet_L6``):
  front = blocks 1..6 (up to the 4th pool) -> 4x4x512; rear = ``[512,512,M]`` + MLP.

Parameter tree::

    block{i}/conv/{kernel, bias}, block{i}/norm/{scale, bias} (+ batch_stats mean/var),
      i = 1..8 in cfg order. Torch ``VGG``: ``features.<3j + m>`` where j counts earlier
      conv blocks and m earlier 'M' entries (conv, norm at +1). ``VGG11_L5``/``_L6`` split
      ``features`` into ``layer1``/``layer2`` with the same layout restarted at 0.
    classifier/{kernel, bias}                         (CIFAR: torch ``classifier``)
    classifier/fc1, classifier/fc2, classifier/fc3    (ImageNet: torch ``classifier.0/3/6``;
                                                       fc1 rows flattened H,W,C here)

``capture_intermediates`` records ``block1..block8`` and ``pre_logits``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L
from elf_jax.models.convnet import ConvBlock

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class ImageNetHead(nn.Module):
    """dense 4096 -> relu -> dropout -> dense 4096 -> relu -> dropout -> dense K."""

    num_classes: int
    hidden: int = 4096
    dropout: float = 0.5
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    def setup(self):
        kw = dict(dtype=self.dtype, init_mode=self.init_mode)
        self.fc1 = L.Dense(self.hidden, **kw)
        self.fc2 = L.Dense(self.hidden, **kw)
        self.fc3 = L.Dense(self.num_classes, **kw)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, x, train: bool = False):
        x = self.drop(nn.relu(self.fc1(x)), deterministic=not train)
        x = self.drop(nn.relu(self.fc2(x)), deterministic=not train)
        return self.fc3(x)


class VGG(nn.Module):
    num_classes: int = 10
    cfg: tuple = VGG11_CFG
    norm: str = "instancenorm"
    imagenet: bool = False
    split_block: int = 5
    dropout: float = 0.5
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    has_split = True

    def setup(self):
        L.check_init(self.init_mode)
        blocks = []
        cfg = list(self.cfg)
        for i, c in enumerate(cfg):
            if c == "M":
                continue
            pool = "maxpooling" if i + 1 < len(cfg) and cfg[i + 1] == "M" else "none"
            blk = ConvBlock(c, norm=self.norm, pool=pool, padding=1, dtype=self.dtype,
                            init_mode=self.init_mode, bn_axis_name=self.bn_axis_name,
                            bn_chunks=self.bn_chunks)
            setattr(self, f"block{len(blocks) + 1}", blk)
            blocks.append(blk)
        if not 1 <= self.split_block <= len(blocks):
            raise ValueError(f"VGG split_block must be in 1..{len(blocks)}")
        self.blocks = blocks
        self.pre_logits = L.Tap()
        if self.imagenet:
            self.classifier = ImageNetHead(self.num_classes, dropout=self.dropout,
                                           dtype=self.dtype, init_mode=self.init_mode)
        else:
            self.classifier = L.Dense(self.num_classes, dtype=self.dtype,
                                      init_mode=self.init_mode)

    def front(self, x, train: bool = False):
        L.check_images(x, "VGG")
        first_pad = 3 if (L.mnist_padding(x) and not self.imagenet) else 1
        for i, blk in enumerate(self.blocks[: self.split_block]):
            x = blk(x, train, padding=first_pad if i == 0 else 1)
        return x

    def rear(self, f, train: bool = False):
        L.check_images(f, "VGG.rear", what="feature")
        for blk in self.blocks[self.split_block:]:
            f = blk(f, train)
        f = self.pre_logits(L.flatten(f))
        if self.imagenet:
            return self.classifier(f, train)
        return self.classifier(f)

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
