"""Test-only PyTorch re-implementation of the reference ``networks.py`` classes.

Written from reading the reference repositories (DatasetCondensation, mtt-distillation,
Lirui-Zhao/ELF). The module *structure* (attribute names, ``nn.Sequential`` indices, the
order in which modules are registered) is what matters here: it fixes the state_dict key
names and the ``net.parameters()`` order that the reference checkpoints and MTT expert
buffers use. ``get_reference_network(name, channel, num_classes, im_size)`` mirrors the
reference ``get_network`` for the names the interop tests need.

This file imports torch at module level; import it only after
``pytest.importorskip("torch")``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["get_reference_network", "REFERENCE_NAMES"]


# --------------------------------------------------------------------------- ConvNet


def _norm_layer(kind: str, c: int, h: int, w: int):
    if kind == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if kind == "layernorm":
        return nn.LayerNorm([c, h, w], elementwise_affine=True)
    if kind == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}")


def _pool_layer(kind: str):
    if kind == "avgpooling":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if kind == "maxpooling":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    if kind == "none":
        return None
    raise ValueError(f"unknown pooling {kind!r}")


def _conv_blocks(shape, width, depth, norm, pooling, first_pad):
    """Conv blocks as the reference builds them; ``shape`` = [C, H, W] (mutated)."""
    layers = []
    for d in range(depth):
        pad = first_pad if d == 0 else 1
        layers.append(nn.Conv2d(shape[0], width, kernel_size=3, padding=pad))
        shape[0] = width
        shape[1] = shape[1] + 2 * pad - 2
        shape[2] = shape[2] + 2 * pad - 2
        layer = _norm_layer(norm, *shape)
        if layer is not None:
            layers.append(layer)
        layers.append(nn.ReLU(inplace=True))
        pool = _pool_layer(pooling)
        if pool is not None:
            layers.append(pool)
            shape[1] //= 2
            shape[2] //= 2
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Reference ``ConvNet``: ``features`` Sequential then ``classifier`` Linear."""

    def __init__(self, channel, num_classes, net_width=128, net_depth=3,
                 net_norm="instancenorm", net_pooling="avgpooling", im_size=(32, 32)):
        super().__init__()
        shape = [channel, im_size[0], im_size[1]]
        # padding 3 on the first conv for 1-channel (28x28 -> 32x32) input
        self.features = _conv_blocks(shape, net_width, net_depth, net_norm, net_pooling,
                                     3 if channel == 1 else 1)
        self.classifier = nn.Linear(shape[0] * shape[1] * shape[2], num_classes)

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.reshape(out.shape[0], -1))


class ConvNetFeature(nn.Module):
    """Reference ``ConvNet_feature`` (split names ``ConvNet_L3`` ...): ``layer1``,
    ``layer2`` (empty when feature_depth == depth), ``classifier``. Padding 1 always."""

    def __init__(self, channel, num_classes, net_width=128, net_depth=3, feature_depth=3,
                 net_norm="instancenorm", net_pooling="avgpooling", im_size=(32, 32)):
        super().__init__()
        shape = [channel, im_size[0], im_size[1]]
        self.layer1 = _conv_blocks(shape, net_width, feature_depth, net_norm, net_pooling, 1)
        self.layer2 = _conv_blocks(shape, net_width, max(net_depth - feature_depth, 0),
                                   net_norm, net_pooling, 1)
        self.classifier = nn.Linear(shape[0] * shape[1] * shape[2], num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(x))
        return self.classifier(out.reshape(out.shape[0], -1))


# --------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    def __init__(self, channel, num_classes, bn=False):
        super().__init__()
        spec = [(128, 5, 4 if channel == 1 else 2, True), (192, 5, 2, True),
                (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True)]
        layers, cin = [], channel
        for cout, k, pad, pool in spec:
            layers.append(nn.Conv2d(cin, cout, kernel_size=k, padding=pad))
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(192 * 4 * 4, num_classes)

    def forward(self, x):
        out = self.features(x)
        return self.fc(out.reshape(out.shape[0], -1))


# --------------------------------------------------------------------------- VGG

VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _vgg_layers(cfg, cin, norm, first_pad, final_avgpool):
    layers = []
    for i, v in enumerate(cfg):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(cin, v, kernel_size=3, padding=first_pad if i == 0 else 1))
        layers.append(nn.GroupNorm(v, v, affine=True) if norm == "instancenorm"
                      else nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        cin = v
    if final_avgpool:
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
    return nn.Sequential(*layers), cin


class VGG11(nn.Module):
    """Reference ``VGG('VGG11')``: ``features`` (ending with AvgPool(1)), ``classifier``."""

    def __init__(self, channel, num_classes, norm="instancenorm"):
        super().__init__()
        self.features, _ = _vgg_layers(VGG11_CFG, channel, norm,
                                       3 if channel == 1 else 1, True)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.reshape(out.shape[0], -1))


class VGG11Feature(nn.Module):
    """Reference ``VGG_feature('VGG11', 5)`` (``VGG11_L5``): ``layer1``, ``layer2``."""

    def __init__(self, channel, num_classes, norm="instancenorm", feature_depth=5):
        super().__init__()
        cut = [i for i, v in enumerate(VGG11_CFG) if v != "M"][feature_depth]
        self.layer1, c = _vgg_layers(VGG11_CFG[:cut], channel, norm,
                                     3 if channel == 1 else 1, False)
        self.layer2, _ = _vgg_layers(VGG11_CFG[cut:], c, norm, 1, True)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(x))
        return self.classifier(out.reshape(out.shape[0], -1))


def _vgg_imagenet_classifier(num_classes):
    return nn.Sequential(
        nn.Linear(2048, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, num_classes))


class VGG11ImageNet(nn.Module):
    """Reference ``VGG_ImageNet('VGG11')`` (64x64): ``layer``, ``classifier`` MLP."""

    def __init__(self, channel, num_classes, norm="instancenorm"):
        super().__init__()
        self.layer, _ = _vgg_layers(VGG11_CFG, channel, norm, 1, False)
        self.classifier = _vgg_imagenet_classifier(num_classes)

    def forward(self, x):
        out = self.layer(x)
        return self.classifier(out.reshape(out.shape[0], -1))


class VGG11ImageNetFeature(nn.Module):
    """Reference ``VGG_ImageNet_feature('VGG11', 6)`` (``VGG11ImageNet_L6``)."""

    def __init__(self, channel, num_classes, norm="instancenorm", feature_depth=6):
        super().__init__()
        cut = [i for i, v in enumerate(VGG11_CFG) if v != "M"][feature_depth]
        self.layer1, c = _vgg_layers(VGG11_CFG[:cut], channel, norm, 1, False)
        self.layer2, _ = _vgg_layers(VGG11_CFG[cut:], c, norm, 1, False)
        self.classifier = _vgg_imagenet_classifier(num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(x))
        return self.classifier(out.reshape(out.shape[0], -1))


# --------------------------------------------------------------------------- ResNet


def _rnorm(norm, c):
    return nn.GroupNorm(c, c, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    """Reference BasicBlock; ``ap=True`` gives BasicBlock_AP (stride-1 convs + avgpool)."""

    def __init__(self, cin, cout, stride=1, norm="instancenorm", ap=False):
        super().__init__()
        self.stride, self.ap = stride, ap
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=1 if ap else stride, padding=1, bias=False)
        self.bn1 = _rnorm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = _rnorm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            if ap:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=1, bias=False),
                    nn.AvgPool2d(kernel_size=2, stride=2), _rnorm(norm, cout))
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _rnorm(norm, cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.ap and self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Reference ``ResNet`` / ``ResNet_AP`` / ``ResNetImageNet`` with BasicBlock [2,2,2,2].

    ``layered``: the ELF split class names (``ResNet18_Layered``: layer2..layer4,
    layer5_befor, layer5_after; ``ResNet18ImageNet_L4``: layer2..layer5).
    """

    def __init__(self, channel, num_classes, norm="instancenorm", ap=False,
                 imagenet=False, layered=None):
        super().__init__()
        self.imagenet, self.ap, self.layered = imagenet, ap, layered
        if imagenet:
            self.conv1 = nn.Conv2d(channel, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _rnorm(norm, 64)
        if imagenet:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin, stages = 64, []
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks = [BasicBlock(cin, planes, stride, norm, ap),
                      BasicBlock(planes, planes, 1, norm, ap)]
            cin = planes
            stages.append(blocks)
        if layered == "resnet_layered":
            names = ["layer2", "layer3", "layer4"]
            for n, blocks in zip(names, stages[:3]):
                setattr(self, n, nn.Sequential(*blocks))
            self.layer5_befor = nn.Sequential(stages[3][0])
            self.layer5_after = nn.Sequential(stages[3][1])
            self._stage_names = names + ["layer5_befor", "layer5_after"]
        else:
            names = (["layer2", "layer3", "layer4", "layer5"] if layered == "imagenet_l4"
                     else ["layer1", "layer2", "layer3", "layer4"])
            for n, blocks in zip(names, stages):
                setattr(self, n, nn.Sequential(*blocks))
            self._stage_names = names
        if ap:
            self.classifier = nn.Linear(512 * (3 * 3 if channel == 1 else 4 * 4), num_classes)
        else:
            self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.imagenet:
            out = self.maxpool(out)
        for n in self._stage_names:
            out = getattr(self, n)(out)
        if self.imagenet:
            out = F.adaptive_avg_pool2d(out, (1, 1))
        elif not self.ap:
            out = F.avg_pool2d(out, 4)
        return self.classifier(out.reshape(out.shape[0], -1))


# --------------------------------------------------------------------------- MLP, LeNet


class MLP(nn.Module):
    def __init__(self, channel, num_classes):
        super().__init__()
        self.fc_1 = nn.Linear(28 * 28 * 1 if channel == 1 else 32 * 32 * 3, 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def forward(self, x):
        out = F.relu(self.fc_1(x.reshape(x.shape[0], -1)))
        return self.fc_3(F.relu(self.fc_2(out)))


class LeNet(nn.Module):
    def __init__(self, channel, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=2 if channel == 1 else 0),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2))
        self.fc_1 = nn.Linear(16 * 5 * 5, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def forward(self, x):
        out = self.features(x)
        out = F.relu(self.fc_1(out.reshape(out.shape[0], -1)))
        return self.fc_3(F.relu(self.fc_2(out)))


# --------------------------------------------------------------------------- registry

_CONVNET_NORMS = {"BN": "batchnorm", "LN": "layernorm", "IN": "instancenorm",
                  "GN": "groupnorm", "NN": "none"}
_CONVNET_POOLS = {"AP": "avgpooling", "MP": "maxpooling", "NP": "none"}


def _convnet_kwargs(name: str):
    """ConvNet / ConvNetD4 / ConvNetW512 / ConvNetBN / ConvNetD4W256 ... -> kwargs."""
    rest = name[len("ConvNet"):]
    kw = {}
    import re
    while rest:
        m = re.match(r"D(\d+)", rest)
        if m:
            kw["net_depth"] = int(m.group(1))
            rest = rest[m.end():]
            continue
        m = re.match(r"W(\d+)", rest)
        if m:
            kw["net_width"] = int(m.group(1))
            rest = rest[m.end():]
            continue
        if rest[:2] in _CONVNET_NORMS:
            kw["net_norm"] = _CONVNET_NORMS[rest[:2]]
            rest = rest[2:]
            continue
        if rest[:2] in _CONVNET_POOLS:
            kw["net_pooling"] = _CONVNET_POOLS[rest[:2]]
            rest = rest[2:]
            continue
        raise ValueError(f"unknown ConvNet variant {name!r}")
    return kw


REFERENCE_NAMES = [
    "ConvNet", "ConvNetBN", "ConvNetD4", "ConvNetW512", "ConvNet_L3", "ConvNetW512_L3",
    "ConvNetD4_L4", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "VGG11_L5", "VGG11BN_L5",
    "ResNet18", "ResNet18BN", "ResNet18_AP", "ResNet18BN_AP", "ResNet18_Layered",
    "ResNet18BN_Layered", "ResNet18ImageNet", "ResNet18BNImageNet", "ResNet18ImageNet_L4",
    "VGG11ImageNet", "VGG11BNImageNet", "VGG11ImageNet_L6", "MLP", "LeNet",
]


def get_reference_network(name: str, channel: int, num_classes: int, im_size=(32, 32)):
    """Build the reference PyTorch network for ``name`` (reference ``get_network`` names)."""
    if name == "MLP":
        return MLP(channel, num_classes)
    if name == "LeNet":
        return LeNet(channel, num_classes)
    if name == "AlexNet":
        return AlexNet(channel, num_classes)
    if name == "AlexNetBN":
        return AlexNet(channel, num_classes, bn=True)
    if name in ("VGG11", "VGG11BN"):
        return VGG11(channel, num_classes, "batchnorm" if "BN" in name else "instancenorm")
    if name in ("VGG11_L5", "VGG11BN_L5"):
        return VGG11Feature(channel, num_classes,
                            "batchnorm" if "BN" in name else "instancenorm")
    if name in ("VGG11ImageNet", "VGG11BNImageNet"):
        return VGG11ImageNet(channel, num_classes,
                             "batchnorm" if "BN" in name else "instancenorm")
    if name in ("VGG11ImageNet_L6", "VGG11BNImageNet_L6"):
        return VGG11ImageNetFeature(channel, num_classes,
                                    "batchnorm" if "BN" in name else "instancenorm")
    if name.startswith("ResNet18"):
        norm = "batchnorm" if name.startswith("ResNet18BN") else "instancenorm"
        layered = None
        if name.endswith("_Layered"):
            layered = "resnet_layered"
        elif name.endswith("ImageNet_L4"):
            layered = "imagenet_l4"
        return ResNet18(channel, num_classes, norm=norm, ap=name.endswith("_AP"),
                        imagenet="ImageNet" in name, layered=layered)
    if name.startswith("ConvNet"):
        base, _, split = name.partition("_L")
        kw = _convnet_kwargs(base)
        if split:
            # reference ConvNet_feature: ConvNetD4W256_L4 keeps net_depth=3 (so layer2
            # is empty); ConvNetD4_L4 / ConvNetD4BN_L4 use depth 4.
            fd = int(split)
            depth = kw.pop("net_depth", 3)
            return ConvNetFeature(channel, num_classes, net_depth=depth, feature_depth=fd,
                                  im_size=im_size, **kw)
        return ConvNet(channel, num_classes, im_size=im_size, **kw)
    raise ValueError(f"no test reference network for {name!r}")
