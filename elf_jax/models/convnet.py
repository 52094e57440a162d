"""ConvNet of the dataset-distillation literature (DC/DSA/DM/MTT/ELF ``networks.py``).

Per block: conv3x3 (padding 1; padding 3 on the first block for 28x28 1-channel input,
decided from the input shape at call time) -> norm -> activation -> 2x2 pool. Then flatten
and one dense layer.

ELF split: the front is all conv blocks (the reference ``ConvNet_L3`` / ``ConvNetD4_L4`` /
``ConvNetW512_L3`` put every block in the front), the rear is flatten + classifier.
The ``_L*`` names are registry aliases of the plain networks. One reference difference: its
``ConvNet_feature`` class (behind the ``_L*`` names) always pads the first conv by 1, so on
28x28x1 input the reference ``ConvNet_L3`` ends at 3x3x128 while ``ConvNet`` (and every name
here) ends at 4x4x128; on 3-channel input the two are identical.

Parameter tree (PyTorch ``features.*`` indices for the default conv/norm/act/pool block)::

    block{d}/conv/{kernel [3,3,Cin,W], bias}   <- features.{4(d-1)}.weight/bias (OIHW)
    block{d}/norm/{scale, bias}                <- features.{4(d-1)+1}.weight/bias
                                                  (layernorm: [H,W,C] here, [C,H,W] there)
    block{d}/norm batch_stats {mean, var}      <- running_mean / running_var
    classifier/{kernel [H*W*W, K], bias}       <- classifier.weight (rows flattened C,H,W
                                                  in torch, H,W,C here) / classifier.bias

(without a norm a block has 3 torch modules, without pooling one fewer.) ``capture_intermediates``
records ``block1..blockD`` (block outputs) and ``pre_logits`` (flattened feature).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L


class ConvBlock(nn.Module):
    """conv3x3 -> norm -> act -> pool; sub-modules ``conv`` and ``norm``."""

    features: int
    norm: str = "instancenorm"
    pool: str = "avgpooling"
    act: str = "relu"
    padding: int = 1
    kernel_size: int = 3
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    def setup(self):
        self.conv = L.Conv(self.features, self.kernel_size, padding=self.padding,
                           dtype=self.dtype, init_mode=self.init_mode)
        self.norm_layer = L.make_norm(self.norm, self.dtype, "norm",
                                      axis_name=self.bn_axis_name, bn_chunks=self.bn_chunks)

    def __call__(self, x, train: bool = False, padding=None):
        x = self.conv(x, padding=padding)
        if self.norm_layer is not None:
            x = self.norm_layer(x, train)
        x = L.activation(self.act)(x)
        return L.pool2(self.pool, x)


class ConvNet(nn.Module):
    num_classes: int = 10
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    pool: str = "avgpooling"
    act: str = "relu"
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    has_split = True

    def setup(self):
        norm = L.canonical_norm(self.norm)
        pool = L.canonical_pool(self.pool)
        L.check_init(self.init_mode)
        L.activation(self.act)
        if self.depth < 1:
            raise ValueError(f"ConvNet depth must be >= 1, got {self.depth}")
        blocks = []
        for d in range(self.depth):
            blk = ConvBlock(self.width, norm=norm, pool=pool, act=self.act, dtype=self.dtype,
                            init_mode=self.init_mode, bn_axis_name=self.bn_axis_name,
                            bn_chunks=self.bn_chunks)
            setattr(self, f"block{d + 1}", blk)
            blocks.append(blk)
        self.blocks = blocks
        self.pre_logits = L.Tap()
        self.classifier = L.Dense(self.num_classes, dtype=self.dtype, init_mode=self.init_mode)

    def front(self, x, train: bool = False):
        L.check_images(x, "ConvNet")
        first_pad = 3 if L.mnist_padding(x) else 1
        for i, blk in enumerate(self.blocks):
            x = blk(x, train, padding=first_pad if i == 0 else 1)
        return x

    def rear(self, f, train: bool = False):
        L.check_images(f, "ConvNet.rear", what="feature")
        return self.classifier(self.pre_logits(L.flatten(f)))

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
