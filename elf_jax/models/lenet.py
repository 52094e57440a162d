"""LeNet of the dataset-distillation ``networks.py``.

conv5x5 6 (padding 2 for 28x28 1-channel input, else 0) -> relu -> maxpool -> conv5x5 16 ->
relu -> maxpool -> dense 120 -> relu -> dense 84 -> relu -> dense K.

ELF split (beyond the reference, which has none): the front is the two conv blocks (the
feature extractor; 5x5x16 on 32x32 and on 28x28 MNIST), the rear the three dense layers, as
VGG's rear keeps its head.

Parameter tree: ``block1/conv``, ``block2/conv`` (torch ``features.0``, ``features.3``),
``fc1``, ``fc2``, ``fc3`` (torch ``fc_1..fc_3``; fc1 rows flattened H,W,C here).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L
from elf_jax.models.convnet import ConvBlock


class LeNet(nn.Module):
    num_classes: int = 10
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    has_split = True

    def setup(self):
        L.check_init(self.init_mode)
        kw = dict(norm="none", pool="maxpooling", kernel_size=5, dtype=self.dtype,
                  init_mode=self.init_mode)
        self.block1 = ConvBlock(6, padding=0, **kw)
        self.block2 = ConvBlock(16, padding=0, **kw)
        self.fc1 = L.Dense(120, dtype=self.dtype, init_mode=self.init_mode)
        self.fc2 = L.Dense(84, dtype=self.dtype, init_mode=self.init_mode)
        self.pre_logits = L.Tap()
        self.fc3 = L.Dense(self.num_classes, dtype=self.dtype, init_mode=self.init_mode)

    def front(self, x, train: bool = False):
        L.check_images(x, "LeNet")
        x = self.block1(x, train, padding=2 if L.mnist_padding(x) else 0)
        return self.block2(x, train)

    def rear(self, f, train: bool = False):
        L.check_images(f, "LeNet.rear", what="feature")
        h = nn.relu(self.fc1(L.flatten(f)))
        h = nn.relu(self.fc2(h))
        return self.fc3(self.pre_logits(h))

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
