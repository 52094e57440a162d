"""ResNet18 family of the ELF ``networks.py`` (CIFAR stem, ``_AP`` and ImageNet variants).

* ``ResNet18`` / ``ResNet18BN``: conv3x3/1 (no bias) -> norm -> relu; BasicBlock stages
  64/128/256/512 (2 blocks, strides 1/2/2/2); ``avg_pool2d(4)`` -> flatten -> dense.
  ELF split (reference ``ResNet18_Layered``): front = stem, stages 1-3 and the FIRST block
  of stage 4 -> 4x4x512 on 32x32; rear = second stage-4 block, pool, dense.
* ``ResNet18_AP`` / ``ResNet18BN_AP``: stride-2 convs replaced by stride-1 conv + 2x2 avg
  pool (also in the shortcut, between conv and norm); no final pooling, the 4x4x512 map is
  flattened into the dense layer (3x3 for 28x28). Split as ``ResNet18``.
* ``ResNet18ImageNet`` / ``ResNet18BNImageNet``: 7x7/2 stem (p3, no bias) -> norm -> relu
  -> maxpool 3/2 p1; global average pool. ELF split (``ResNet18ImageNet_L4``): front = stem
  and stages 1-3 -> 4x4x256 on 64x64; rear = stage 4, pool, dense.

Norm: instance norm (GroupNorm(C, C)) by default, BatchNorm for the ``BN`` names.

Parameter tree (torch names in brackets, ``ResNet`` / ``ResNet_AP`` / ``ResNetImageNet``)::

    stem/conv/kernel                      [conv1.weight]
    stem/norm/{scale, bias}               [bn1.weight/bias] (+ batch_stats mean/var)
    stage{s}/block{b}/conv1/kernel        [layer{s}.{b-1}.conv1.weight]
    stage{s}/block{b}/norm1               [layer{s}.{b-1}.bn1]
    stage{s}/block{b}/conv2, norm2        [... conv2, bn2]
    stage{s}/block{b}/shortcut_conv       [... shortcut.0]
    stage{s}/block{b}/shortcut_norm       [... shortcut.1 (shortcut.2 for _AP)]
    classifier/{kernel, bias}             [classifier.weight/bias; _AP: rows H,W,C here]

The reference ``ResNet18_Layered`` renames layer1..4 to layer2..4 + layer5_befor/after
(layer5_befor.0 = stage4/block1, layer5_after.0 = stage4/block2); ``ResNetImageNet_L4``
uses layer2..layer5 for stages 1..4.

``capture_intermediates`` records ``stem``, ``stage1..stage4`` (the stage holding the split
is called twice, front part then rear part, so its tuple holds the partial output first and
the stage output last), each ``stage{s}/block{b}``, and ``pre_logits``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from flax import linen as nn

from elf_jax.models import layers as L


class BasicBlock(nn.Module):
    in_planes: int
    planes: int
    stride: int = 1
    norm: str = "instancenorm"
    ap: bool = False
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    def setup(self):
        kw = dict(dtype=self.dtype, init_mode=self.init_mode, use_bias=False)
        nkw = dict(axis_name=self.bn_axis_name, bn_chunks=self.bn_chunks)
        conv_stride = 1 if self.ap else self.stride
        self.conv1 = L.Conv(self.planes, 3, stride=conv_stride, padding=1, **kw)
        self.norm1 = L.make_norm(self.norm, self.dtype, "norm1", **nkw)
        self.conv2 = L.Conv(self.planes, 3, stride=1, padding=1, **kw)
        self.norm2 = L.make_norm(self.norm, self.dtype, "norm2", **nkw)
        self.has_shortcut = self.stride != 1 or self.in_planes != self.planes
        if self.has_shortcut:
            self.shortcut_conv = L.Conv(self.planes, 1, stride=conv_stride, padding=0, **kw)
            self.shortcut_norm = L.make_norm(self.norm, self.dtype, "shortcut_norm", **nkw)

    @staticmethod
    def _norm(norm, x, train):
        return x if norm is None else norm(x, train)

    def __call__(self, x, train: bool = False):
        out = nn.relu(self._norm(self.norm1, self.conv1(x), train))
        if self.ap and self.stride != 1:
            out = L.avg_pool2(out)
        out = self._norm(self.norm2, self.conv2(out), train)
        if self.has_shortcut:
            sc = self.shortcut_conv(x)
            if self.ap and self.stride != 1:
                sc = L.avg_pool2(sc)
            sc = self._norm(self.shortcut_norm, sc, train)
        else:
            sc = x
        return nn.relu(out + sc)


class Stage(nn.Module):
    in_planes: int
    planes: int
    num_blocks: int = 2
    stride: int = 1
    norm: str = "instancenorm"
    ap: bool = False
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    def setup(self):
        blocks = []
        inp = self.in_planes
        for b in range(self.num_blocks):
            blk = BasicBlock(inp, self.planes, self.stride if b == 0 else 1, norm=self.norm,
                             ap=self.ap, dtype=self.dtype, init_mode=self.init_mode,
                             bn_axis_name=self.bn_axis_name, bn_chunks=self.bn_chunks)
            setattr(self, f"block{b + 1}", blk)
            blocks.append(blk)
            inp = self.planes
        self.blocks = blocks

    def __call__(self, x, train: bool = False, start: int = 0, stop: Optional[int] = None):
        for blk in self.blocks[start:stop]:
            x = blk(x, train)
        return x


class Stem(nn.Module):
    imagenet: bool = False
    norm: str = "instancenorm"
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    def setup(self):
        k, s, p = (7, 2, 3) if self.imagenet else (3, 1, 1)
        self.conv = L.Conv(64, k, stride=s, padding=p, use_bias=False, dtype=self.dtype,
                           init_mode=self.init_mode)
        self.norm_layer = L.make_norm(self.norm, self.dtype, "norm",
                                      axis_name=self.bn_axis_name, bn_chunks=self.bn_chunks)

    def __call__(self, x, train: bool = False):
        x = self.conv(x)
        if self.norm_layer is not None:
            x = self.norm_layer(x, train)
        x = nn.relu(x)
        if self.imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x


class ResNet(nn.Module):
    num_classes: int = 10
    stage_sizes: tuple = (2, 2, 2, 2)
    norm: str = "instancenorm"
    ap: bool = False
    imagenet: bool = False
    dtype: Any = jnp.float32
    init_mode: str = "torch"
    bn_axis_name: Any = None
    bn_chunks: int = 1  # ghost BatchNorm (layers.BatchNorm.chunks)

    has_split = True

    def setup(self):
        L.check_init(self.init_mode)
        kw = dict(norm=self.norm, dtype=self.dtype, init_mode=self.init_mode,
                  bn_axis_name=self.bn_axis_name, bn_chunks=self.bn_chunks)
        self.stem = Stem(imagenet=self.imagenet, **kw)
        stages = []
        inp = 64
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), self.stage_sizes)):
            st = Stage(inp, planes, n, stride=1 if s == 0 else 2, ap=self.ap, **kw)
            setattr(self, f"stage{s + 1}", st)
            stages.append(st)
            inp = planes
        self.stages = stages
        self.pre_logits = L.Tap()
        self.classifier = L.Dense(self.num_classes, dtype=self.dtype, init_mode=self.init_mode)

    def front(self, x, train: bool = False):
        L.check_images(x, "ResNet")
        x = self.stem(x, train)
        for st in self.stages[:3]:
            x = st(x, train)
        if not self.imagenet:  # reference ResNet18_Layered: + first block of stage 4
            x = self.stages[3](x, train, 0, 1)
        return x

    def rear(self, f, train: bool = False):
        L.check_images(f, "ResNet.rear", what="feature")
        f = self.stages[3](f, train, 1 if not self.imagenet else 0, None)
        if self.imagenet:
            f = jnp.mean(f, axis=(1, 2))  # AdaptiveAvgPool2d(1)
        elif self.ap:
            f = L.flatten(f)  # avg_pool2d(k=1) is the identity
        else:  # F.avg_pool2d(out, 4)
            if f.shape[1:3] == (4, 4):
                f = jnp.mean(f, axis=(1, 2))
            else:
                f = L.flatten(nn.avg_pool(f, (4, 4), strides=(4, 4), padding="VALID"))
        return self.classifier(self.pre_logits(f))

    def __call__(self, x, train: bool = False):
        return self.rear(self.front(x, train), train)
