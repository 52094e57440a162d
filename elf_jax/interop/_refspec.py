"""The reference PyTorch networks' parameter layout, without importing torch.

For a reference model name (as the reference ``get_network`` spells it) this module lists
the layers that hold parameters, in ``net.parameters()`` / ``state_dict()`` order, with:

- the torch key prefix (``features.0``, ``layer1.0.shortcut.1``, ``classifier.6`` ...),
- the layer kind (conv, dense, affine norm, layer norm, batch norm),
- the torch shapes of its tensors,
- a *canonical* id, shared by a network and its ELF split alias (``ConvNet`` and
  ``ConvNet_L3`` hold the same layers under different torch keys), that
  :mod:`elf_jax.interop._flaxmap` turns into a path of our Flax parameter tree,
- for the first dense layer after a conv trunk, the ``(C, H, W)`` shape the reference
  flattens (NCHW flatten order), so the weight's input axis can be permuted to our NHWC
  flatten order.

Layouts were read from the ``networks.py`` / ``utils.py`` of VICO-UoE/DatasetCondensation,
GeorgeCazenavette/mtt-distillation and Lirui-Zhao/ELF.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

__all__ = ["Layer", "RefSpec", "reference_spec", "split_style_of", "REFERENCE_FAMILIES"]

# tensor names of each layer kind, in the order torch registers them
PARAM_NAMES = {
    "conv": ("weight", "bias"),
    "dense": ("weight", "bias"),
    "affine": ("weight", "bias"),  # GroupNorm (instance norm = groups == channels)
    "ln": ("weight", "bias"),  # LayerNorm over [C, H, W]
    "bn": ("weight", "bias"),
}
BUFFER_NAMES = {"bn": ("running_mean", "running_var", "num_batches_tracked")}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parameter-holding layer of a reference network."""

    key: str  # torch prefix, e.g. "features.0"
    kind: str  # conv | dense | affine | ln | bn
    cid: tuple  # canonical id, e.g. ("block", 0, "conv")
    shapes: tuple  # ((name, torch_shape), ...) for parameters, then buffers for bn
    chw: Optional[tuple] = None  # dense only: (C, H, W) flattened by the reference
    ln_chw: Optional[tuple] = None  # ln only: (C, H, W) of the normalized shape

    @property
    def param_shapes(self):
        names = [n for n in self.names(params_only=True)]
        return [(n, s) for n, s in self.shapes if n in names]

    def names(self, params_only=False):
        out = [n for n, _ in self.shapes if n in PARAM_NAMES[self.kind]]
        if not params_only and self.kind == "bn":
            out += list(BUFFER_NAMES["bn"])
        return out


@dataclasses.dataclass(frozen=True)
class RefSpec:
    name: str  # the name asked for
    family: str  # convnet | alexnet | vgg | vgg_imagenet | resnet | mlp | lenet
    style: str  # "plain" or "split" (which key scheme)
    layers: tuple
    config: dict

    def keys(self, params_only=False):
        out = []
        for layer in self.layers:
            for n in layer.names(params_only=params_only):
                out.append(f"{layer.key}.{n}")
        return out

    def torch_shapes(self, params_only=False):
        """{torch key: shape}; ``num_batches_tracked`` has shape ()."""
        out = {}
        for layer in self.layers:
            for n, s in layer.shapes:
                if params_only and n not in PARAM_NAMES[layer.kind]:
                    continue
                out[f"{layer.key}.{n}"] = tuple(s)
            if not params_only and layer.kind == "bn":
                out[f"{layer.key}.num_batches_tracked"] = ()
        return out

    def param_list(self):
        """[(torch key, shape)] in ``net.parameters()`` order."""
        return [(f"{layer.key}.{n}", tuple(s)) for layer in self.layers
                for n, s in layer.param_shapes]

    def num_params(self):
        total = 0
        for _, s in self.param_list():
            n = 1
            for d in s:
                n *= d
            total += n
        return total


# ----------------------------------------------------------------------- builders


def _conv(key, cid, cin, cout, k, bias=True):
    shapes = [("weight", (cout, cin, k, k))]
    if bias:
        shapes.append(("bias", (cout,)))
    return Layer(key, "conv", cid, tuple(shapes))


def _norm(key, cid, kind, c, h=None, w=None):
    if kind == "ln":
        return Layer(key, "ln", cid, (("weight", (c, h, w)), ("bias", (c, h, w))),
                     ln_chw=(c, h, w))
    shapes = (("weight", (c,)), ("bias", (c,)))
    if kind == "bn":
        shapes = shapes + (("running_mean", (c,)), ("running_var", (c,)))
    return Layer(key, kind, cid, shapes)


def _dense(key, cid, fin, fout, chw=None):
    if chw is not None and chw[1] * chw[2] == 1:
        chw = None  # 1x1 spatial: flatten orders agree
    return Layer(key, "dense", cid, (("weight", (fout, fin)), ("bias", (fout,))), chw=chw)


_NORM_KIND = {"instancenorm": "affine", "groupnorm": "affine", "batchnorm": "bn",
              "layernorm": "ln", "none": None}


def _convnet(name, num_classes, input_shape, width, depth, norm, pooling, split):
    h, w, c = input_shape
    layers = []
    nk = _NORM_KIND[norm]
    if split is None:
        prefix = ["features"] * depth
        idx = list(range(depth))
        first_pad = 3 if c == 1 else 1
    else:
        # ConvNet_feature: layer1 holds the first `split` blocks, layer2 the rest;
        # padding 1 everywhere (no 1-channel special case)
        prefix = ["layer1" if d < split else "layer2" for d in range(depth)]
        idx = list(range(depth))
        first_pad = 1
    pos = {}
    cin = c
    for d in range(depth):
        seq = prefix[d]
        i = pos.get(seq, 0)
        pad = first_pad if d == 0 else 1
        h, w = h + 2 * pad - 2, w + 2 * pad - 2
        layers.append(_conv(f"{seq}.{i}", ("block", idx[d], "conv"), cin, width, 3))
        i += 1
        if nk is not None:
            layers.append(_norm(f"{seq}.{i}", ("block", idx[d], "norm"), nk, width, h, w))
            i += 1
        i += 1  # activation
        if pooling != "none":
            i += 1
            h, w = h // 2, w // 2
        pos[seq] = i
        cin = width
    if h < 1 or w < 1:
        raise ValueError(f"{name}: input {input_shape} is too small for depth {depth}")
    layers.append(_dense("classifier", ("classifier",), cin * h * w, num_classes,
                         (cin, h, w)))
    return layers


def _alexnet(name, num_classes, input_shape, bn):
    h, w, c = input_shape
    spec = [(128, 5, 4 if c == 1 else 2, True), (192, 5, 2, True), (256, 3, 1, False),
            (192, 3, 1, False), (192, 3, 1, True)]
    layers, i, cin = [], 0, c
    for b, (cout, k, pad, pool) in enumerate(spec):
        layers.append(_conv(f"features.{i}", ("block", b, "conv"), cin, cout, k))
        i += 1
        h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
        if bn:
            layers.append(_norm(f"features.{i}", ("block", b, "norm"), "bn", cout))
            i += 1
        i += 1
        if pool:
            i += 1
            h, w = h // 2, w // 2
        cin = cout
    # the reference hard-codes 192*4*4 inputs
    layers.append(_dense("fc", ("classifier",), 192 * 4 * 4, num_classes, (192, 4, 4)))
    return layers


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _vgg(name, num_classes, input_shape, norm, imagenet, split):
    h, w, c = input_shape
    nk = _NORM_KIND[norm]
    cfg = VGG11_CFG
    conv_pos = [i for i, v in enumerate(cfg) if v != "M"]
    if split is None:
        seqs = [("layer" if imagenet else "features", cfg)]
    else:
        cut = conv_pos[split]
        seqs = [("layer1", cfg[:cut]), ("layer2", cfg[cut:])]
    layers, cin, conv_idx = [], c, 0
    for si, (seq, part) in enumerate(seqs):
        i = 0
        for j, v in enumerate(part):
            if v == "M":
                i += 1
                h, w = h // 2, w // 2
                continue
            pad = 3 if (c == 1 and si == 0 and j == 0 and not imagenet) else 1
            layers.append(_conv(f"{seq}.{i}", ("conv", conv_idx, "conv"), cin, v, 3))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            layers.append(_norm(f"{seq}.{i + 1}", ("conv", conv_idx, "norm"), nk, v))
            i += 3
            cin = v
            conv_idx += 1
    if imagenet:
        layers.append(_dense("classifier.0", ("mlp", 0), 2048, 4096, (cin, h, w)))
        layers.append(_dense("classifier.3", ("mlp", 1), 4096, 4096))
        layers.append(_dense("classifier.6", ("classifier",), 4096, num_classes))
    else:
        layers.append(_dense("classifier", ("classifier",), 512, num_classes, (cin, h, w)))
    return layers


def _resnet(name, num_classes, input_shape, norm, ap, imagenet, split):
    h, w, c = input_shape
    nk = _NORM_KIND[norm]
    layers = [_conv("conv1", ("stem", "conv"), c, 64, 7 if imagenet else 3, bias=False),
              _norm("bn1", ("stem", "norm"), nk, 64)]
    if split == "layered":
        stage_keys = [["layer2.0", "layer2.1"], ["layer3.0", "layer3.1"],
                      ["layer4.0", "layer4.1"], ["layer5_befor.0", "layer5_after.0"]]
    elif split == "l4":
        stage_keys = [[f"layer{s + 2}.{b}" for b in range(2)] for s in range(4)]
    else:
        stage_keys = [[f"layer{s + 1}.{b}" for b in range(2)] for s in range(4)]
    cin = 64
    for s, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            key = stage_keys[s][b]
            cid = ("stage", s, b)
            layers.append(_conv(f"{key}.conv1", cid + ("conv1",), cin, planes, 3, bias=False))
            layers.append(_norm(f"{key}.bn1", cid + ("norm1",), nk, planes))
            layers.append(_conv(f"{key}.conv2", cid + ("conv2",), planes, planes, 3,
                                bias=False))
            layers.append(_norm(f"{key}.bn2", cid + ("norm2",), nk, planes))
            if b == 0 and (s > 0 or cin != planes):
                layers.append(_conv(f"{key}.shortcut.0", cid + ("shortcut_conv",), cin,
                                    planes, 1, bias=False))
                layers.append(_norm(f"{key}.shortcut.{2 if ap else 1}",
                                    cid + ("shortcut_norm",), nk, planes))
            cin = planes
    if ap:
        sp = 3 if c == 1 else 4
        layers.append(_dense("classifier", ("classifier",), 512 * sp * sp, num_classes,
                             (512, sp, sp)))
    else:
        layers.append(_dense("classifier", ("classifier",), 512, num_classes))
    return layers


def _mlp(name, num_classes, input_shape):
    h, w, c = input_shape
    fin = 28 * 28 * 1 if c == 1 else 32 * 32 * 3
    return [_dense("fc_1", ("fc", 0), fin, 128, (c, h, w)),
            _dense("fc_2", ("fc", 1), 128, 128),
            _dense("fc_3", ("classifier",), 128, num_classes)]


def _lenet(name, num_classes, input_shape):
    h, w, c = input_shape
    return [_conv("features.0", ("block", 0, "conv"), c, 6, 5),
            _conv("features.3", ("block", 1, "conv"), 6, 16, 5),
            _dense("fc_1", ("fc", 0), 16 * 5 * 5, 120, (16, 5, 5)),
            _dense("fc_2", ("fc", 1), 120, 84),
            _dense("fc_3", ("classifier",), 84, num_classes)]


# ----------------------------------------------------------------------- names

_CN_NORM = {"BN": "batchnorm", "LN": "layernorm", "IN": "instancenorm", "GN": "groupnorm",
            "NN": "none"}
_CN_POOL = {"AP": "avgpooling", "MP": "maxpooling", "NP": "none"}

REFERENCE_FAMILIES = ("ConvNet*", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "VGG11_L5",
                      "VGG11BN_L5", "VGG11ImageNet", "VGG11BNImageNet", "VGG11ImageNet_L6",
                      "VGG11BNImageNet_L6", "ResNet18", "ResNet18BN", "ResNet18_AP",
                      "ResNet18BN_AP", "ResNet18_Layered", "ResNet18BN_Layered",
                      "ResNet18ImageNet", "ResNet18BNImageNet", "ResNet18ImageNet_L4",
                      "ResNet18BNImageNet_L4", "MLP", "LeNet")


def parse_convnet(name):
    """``ConvNetD4W256_L4`` -> (config dict, split or None). Raises ValueError."""
    base, sep, split = name.partition("_L")
    if not base.startswith("ConvNet"):
        raise ValueError(name)
    cfg = dict(width=128, depth=3, norm="instancenorm", pooling="avgpooling")
    rest = base[len("ConvNet"):]
    if rest == "KIP":
        cfg.update(width=1024, norm="none")
        rest = ""
    depth_given = False
    while rest:
        m = re.match(r"([DW])(\d+)", rest)
        if m:
            cfg["depth" if m.group(1) == "D" else "width"] = int(m.group(2))
            depth_given = depth_given or m.group(1) == "D"
            rest = rest[m.end():]
        elif rest[:2] in _CN_NORM:
            cfg["norm"] = _CN_NORM[rest[:2]]
            rest = rest[2:]
        elif rest[:2] in _CN_POOL:
            cfg["pooling"] = _CN_POOL[rest[:2]]
            rest = rest[2:]
        elif rest[:2] in ("AS", "AR", "AL"):  # activations hold no parameters
            rest = rest[2:]
        else:
            raise ValueError(name)
    fd = None
    if sep:
        if not split.isdigit():
            raise ValueError(name)
        fd = int(split)
        # reference ConvNet_feature: layer1 = fd blocks, layer2 = depth - fd (>= 0)
        cfg["depth"] = max(cfg["depth"], fd)
    return cfg, fd


def split_style_of(name):
    """"split" when ``name`` is one of the reference's split (feature) class names."""
    return "split" if (re.search(r"_L\d+$", name) or name.endswith("_Layered")) else "plain"


def _canonical_base(name):
    """The plain name of a split alias (``ResNet18BN_Layered`` -> ``ResNet18BN``)."""
    if name.endswith("_Layered"):
        return name[: -len("_Layered")]
    return re.sub(r"_L\d+$", "", name)


def reference_spec(name, num_classes, input_shape, style=None):
    """Layer list of the reference network ``name`` for ``input_shape`` = (H, W, C).

    ``style``: ``"plain"`` (``features.N`` / ``layer1..4`` keys), ``"split"`` (the split
    classes' keys: ``layer1``/``layer2``, ``layer5_befor``...), or None = as the name
    says. The plain network of a split alias is the same architecture.
    """
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape!r}")
    input_shape = tuple(int(v) for v in input_shape)
    num_classes = int(num_classes)
    own_style = split_style_of(name)
    style = style or own_style
    if style not in ("plain", "split"):
        raise ValueError(f"style must be 'plain' or 'split', got {style!r}")
    base = _canonical_base(name)
    split_arg = None
    if name.startswith("ConvNet"):
        try:
            cfg, fd = parse_convnet(name)
        except ValueError:
            raise ValueError(_unknown(name)) from None
        if style == "split":
            split_arg = fd if fd is not None else cfg["depth"]
        layers = _convnet(name, num_classes, input_shape, cfg["width"], cfg["depth"],
                          cfg["norm"], cfg["pooling"], split_arg)
        family = "convnet"
        config = dict(cfg)
    elif base in ("AlexNet", "AlexNetBN"):
        if style == "split":
            raise ValueError(f"{name}: the reference has no split AlexNet")
        layers = _alexnet(name, num_classes, input_shape, bn=base == "AlexNetBN")
        family, config = "alexnet", {"bn": base == "AlexNetBN"}
    elif base in ("VGG11", "VGG11BN", "VGG11ImageNet", "VGG11BNImageNet"):
        imagenet = "ImageNet" in base
        norm = "batchnorm" if "BN" in base else "instancenorm"
        if style == "split":
            split_arg = 6 if imagenet else 5
        layers = _vgg(name, num_classes, input_shape, norm, imagenet, split_arg)
        family = "vgg_imagenet" if imagenet else "vgg"
        config = {"norm": norm}
    elif base in ("ResNet18", "ResNet18BN", "ResNet18_AP", "ResNet18BN_AP",
                  "ResNet18ImageNet", "ResNet18BNImageNet"):
        imagenet = "ImageNet" in base
        ap = base.endswith("_AP")
        norm = "batchnorm" if base.startswith("ResNet18BN") else "instancenorm"
        if style == "split":
            if ap:
                raise ValueError(f"{name}: the reference has no split ResNet18_AP")
            split_arg = "l4" if imagenet else "layered"
        layers = _resnet(name, num_classes, input_shape, norm, ap, imagenet, split_arg)
        family = "resnet"
        config = {"norm": norm, "ap": ap, "imagenet": imagenet}
    elif base == "MLP" and style == "plain":
        layers, family, config = _mlp(name, num_classes, input_shape), "mlp", {}
    elif base == "LeNet" and style == "plain":
        layers, family, config = _lenet(name, num_classes, input_shape), "lenet", {}
    else:
        raise ValueError(_unknown(name))
    return RefSpec(name=name, family=family, style=style, layers=tuple(layers),
                   config=config)


def _unknown(name):
    return (f"no PyTorch reference layout for model {name!r}; interop covers "
            + ", ".join(REFERENCE_FAMILIES))
