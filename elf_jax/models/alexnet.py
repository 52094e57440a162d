"""AlexNet / AlexNetBN of the dataset-distillation ``networks.py`` (32x32 or 28x28x1 input).

conv5x5 128 p2 -> [BN] -> relu -> maxpool; conv5x5 192 p2 -> [BN] -> relu -> maxpool;
conv3x3 256 p1; conv3x3 192 p1; conv3x3 192 p1 -> maxpool; dense. For 28x28 1-channel input
the first conv uses padding 4 (reference rule), so every input size ends at 4x4x192.

ELF split (beyond the reference, which has none): the front is the five conv blocks, the
rear the classifier -- the ConvNet's cut. The front output is 4x4x192, on the ConvNet
teacher's 4x4 grid, so the adapter (``elf_jax.models.adapter``) only maps channels.

Parameter tree (torch names in brackets; plain AlexNet has no norms)::

    block{i}/conv/{kernel, bias}      [features.<k>.weight/bias]
    block{i}/norm/{scale, bias}       [features.<k+1>.weight/bias, AlexNetBN only]
    classifier/{kernel, bias}         [fc.weight/bias; rows flattened H,W,C here]

``capture_intermediates`` records ``block1..block5`` and ``pre_logits``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L
from elf_jax.models.convnet import ConvBlock

# (features, kernel, padding, pool after)
_ALEX_CFG = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False),
             (192, 3, 1, True))


class AlexNet(nn.Module):
    num_classes: int = 10
    norm: str = "none"
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    has_split = True

    def setup(self):
        L.check_init(self.init_mode)
        blocks = []
        for i, (c, k, p, pool) in enumerate(_ALEX_CFG):
            blk = ConvBlock(c, norm=self.norm, pool="maxpooling" if pool else "none",
                            padding=p, kernel_size=k, dtype=self.dtype,
                            init_mode=self.init_mode, bn_axis_name=self.bn_axis_name,
                            bn_chunks=self.bn_chunks)
            setattr(self, f"block{i + 1}", blk)
            blocks.append(blk)
        self.blocks = blocks
        self.pre_logits = L.Tap()
        self.classifier = L.Dense(self.num_classes, dtype=self.dtype, init_mode=self.init_mode)

    def front(self, x, train: bool = False):
        L.check_images(x, "AlexNet")
        first_pad = 4 if L.mnist_padding(x) else 2
        for i, blk in enumerate(self.blocks):
            x = blk(x, train, padding=first_pad if i == 0 else None)
        return x

    def rear(self, f, train: bool = False):
        L.check_images(f, "AlexNet.rear", what="feature")
        return self.classifier(self.pre_logits(L.flatten(f)))

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
