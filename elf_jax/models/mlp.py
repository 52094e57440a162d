"""MLP of the dataset-distillation ``networks.py``: flatten -> 128 -> relu -> 128 -> relu -> K.

ELF split (beyond the reference, which has none): the front is both hidden layers, the rear
the classifier -- the ConvNet's cut (every feature layer | the classifier). The front output
is the hidden vector as a 1x1 grid ``[N, 1, 1, 128]``, so every front in the zoo is NHWC and
the adapter (``elf_jax.models.adapter``) maps it to any teacher feature. Parameter tree: ``fc1``, ``fc2``, ``fc3`` (torch
``fc_1``, ``fc_2``, ``fc_3``; the fc1 rows are flattened H,W,C here, C,H,W in torch).
``pre_logits`` records the last hidden layer.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L


class MLP(nn.Module):
    num_classes: int = 10
    hidden: int = 128
    dtype: Any = jnp.float32
    init_mode: str = "torch"

    has_split = True

    def setup(self):
        L.check_init(self.init_mode)
        self.fc1 = L.Dense(self.hidden, dtype=self.dtype, init_mode=self.init_mode)
        self.fc2 = L.Dense(self.hidden, dtype=self.dtype, init_mode=self.init_mode)
        self.pre_logits = L.Tap()
        self.fc3 = L.Dense(self.num_classes, dtype=self.dtype, init_mode=self.init_mode)

    def front(self, x, train: bool = False):
        L.check_images(x, "MLP")
        h = nn.relu(self.fc1(L.flatten(x)))
        h = nn.relu(self.fc2(h))
        return h.reshape(h.shape[0], 1, 1, h.shape[-1])

    def rear(self, f, train: bool = False):
        L.check_images(f, "MLP.rear", what="feature")
        return self.fc3(self.pre_logits(L.flatten(f)))

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
