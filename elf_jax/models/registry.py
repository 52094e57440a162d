"""One registry for every architecture: ``get_model(name, num_classes, **overrides)``.

Names follow the reference ``utils.get_network``: ``ConvNet`` (width 128, depth 3, instance
norm, avg pooling, relu), its width/depth/norm/pool/activation variants, AlexNet(BN),
VGG11(BN), ResNet18(BN)(_AP), the 64x64 ImageNet variants, and the reference's split names
(``ConvNet_L3``, ``VGG11_L5``, ``ResNet18_Layered``, ...) as aliases of the same networks:
here every splittable network declares its split itself (``front``/``rear``).

Overrides every model accepts: ``dtype`` (compute dtype; parameters stay float32),
``init`` (``"torch"`` default, or ``"flax"``), ``bn_axis_name`` (sync-BN axis, BN models) and
``bn_chunks`` (ghost BatchNorm as ``nn.DataParallel`` on that many GPUs, ``layers.BatchNorm``;
accepted by every model, a no-op without BatchNorm layers, as DataParallel is).
ConvNet family: ``width``, ``depth``, ``norm``, ``pool``, ``act``. VGG ImageNet: ``dropout``.
ViT: ``patch``, ``dim``, ``depth``, ``heads``, ``mlp_dim``, ``split_block``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.models.alexnet import AlexNet
from elf_jax.models.convnet import ConvNet
from elf_jax.models.layers import bn_chunk_sizes
from elf_jax.models.lenet import LeNet
from elf_jax.models.mlp import MLP
from elf_jax.models.resnet import ResNet
from elf_jax.models.vgg import VGG
from elf_jax.models.vit import ViT
from elf_jax.models.vit import check_sizes as check_vit_sizes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: Any
    kwargs: Dict[str, Any] = field(default_factory=dict)
    input_shape: Tuple[int, int, int] = (32, 32, 3)  # the size the reference uses it at
    extra_overrides: Tuple[str, ...] = ()
    alias_of: str | None = None


_COMMON = ("dtype", "init", "bn_axis_name", "bn_chunks")
_CONVNET_OVR = ("width", "depth", "norm", "pool", "act")
_VIT_OVR = ("patch", "dim", "depth", "heads", "mlp_dim", "split_block")
_REGISTRY: Dict[str, ModelSpec] = {}


def _add(name, cls, input_shape=(32, 32, 3), extra=(), **kwargs):
    _REGISTRY[name] = ModelSpec(name, cls, kwargs, tuple(input_shape), tuple(extra))


def _alias(alias, target):
    spec = _REGISTRY[target]
    _REGISTRY[alias] = ModelSpec(alias, spec.cls, spec.kwargs, spec.input_shape,
                                 spec.extra_overrides, alias_of=target)


def _convnet(name, input_shape=(32, 32, 3), **kw):
    _add(name, ConvNet, input_shape, _CONVNET_OVR, **kw)


_IMNET = (64, 64, 3)

_add("MLP", MLP)
_add("LeNet", LeNet)
_convnet("ConvNet")
for _d in range(1, 9):
    # 2x2 pooling per block: depth d needs at least 2**d pixels (64x64 for D4/D6, ...)
    _side = 64 if _d == 4 else max(32, 2 ** _d)
    _convnet(f"ConvNetD{_d}", (_side, _side, 3), depth=_d)
_convnet("ConvNetD4BN", _IMNET, depth=4, norm="batchnorm")
for _w in (32, 64, 128, 256, 512, 1024):
    _convnet(f"ConvNetW{_w}", width=_w)
_convnet("ConvNetD4W256", _IMNET, depth=4, width=256)
_convnet("ConvNetD4W512", _IMNET, depth=4, width=512)
_convnet("ConvNetKIP", width=1024, norm="none")
for _suffix, _norm in (("BN", "batchnorm"), ("LN", "layernorm"), ("IN", "instancenorm"),
                       ("GN", "groupnorm"), ("NN", "none")):
    _convnet(f"ConvNet{_suffix}", norm=_norm)
for _suffix, _pool in (("AP", "avgpooling"), ("MP", "maxpooling"), ("NP", "none")):
    _convnet(f"ConvNet{_suffix}", pool=_pool)
for _suffix, _act in (("AS", "sigmoid"), ("AR", "relu"), ("AL", "leakyrelu")):
    _convnet(f"ConvNet{_suffix}", act=_act)

_add("AlexNet", AlexNet)
_add("AlexNetBN", AlexNet, norm="batchnorm")

_add("VGG11", VGG, split_block=5)
_add("VGG11BN", VGG, norm="batchnorm", split_block=5)
_add("VGG11ImageNet", VGG, _IMNET, ("dropout",), imagenet=True, split_block=6)
_add("VGG11BNImageNet", VGG, _IMNET, ("dropout",), imagenet=True, split_block=6,
     norm="batchnorm")

_add("ResNet18", ResNet)
_add("ResNet18BN", ResNet, norm="batchnorm")
_add("ResNet18_AP", ResNet, ap=True)
_add("ResNet18BN_AP", ResNet, ap=True, norm="batchnorm")
_add("ResNet18ImageNet", ResNet, _IMNET, imagenet=True)
_add("ResNet18BNImageNet", ResNet, _IMNET, imagenet=True, norm="batchnorm")

_add("ViT", ViT, extra=_VIT_OVR)

# The reference's split ("feature") network names: the same networks, split declared.
for _a, _t in (("ConvNet_L3", "ConvNet"), ("ConvNetNN_L3", "ConvNetNN"),
               ("ConvNetBN_L3", "ConvNetBN"), ("ConvNetLN_L3", "ConvNetLN"),
               ("ConvNetIN_L3", "ConvNetIN"), ("ConvNetGN_L3", "ConvNetGN"),
               ("ConvNetW256_L3", "ConvNetW256"), ("ConvNetW512_L3", "ConvNetW512"),
               ("ConvNetD3", "ConvNet"),
               ("ConvNetD4_L4", "ConvNetD4"), ("ConvNetD4BN_L4", "ConvNetD4BN"),
               ("ConvNetD4W256_L4", "ConvNetD4W256"), ("ConvNetD4W512_L4", "ConvNetD4W512"),
               ("VGG11_L5", "VGG11"), ("VGG11BN_L5", "VGG11BN"),
               ("VGG11ImageNet_L6", "VGG11ImageNet"),
               ("VGG11BNImageNet_L6", "VGG11BNImageNet"),
               ("ResNet18_Layered", "ResNet18"), ("ResNet18BN_Layered", "ResNet18BN"),
               ("ResNet18ImageNet_L4", "ResNet18ImageNet"),
               ("ResNet18BNImageNet_L4", "ResNet18BNImageNet"),
               ("ViT_L2", "ViT")):
    _alias(_a, _t)


def list_models(include_aliases: bool = True) -> list[str]:
    """All registry names (sorted); ``include_aliases=False`` drops the split aliases."""
    return sorted(n for n, s in _REGISTRY.items() if include_aliases or s.alias_of is None)


def _lookup(name: str) -> ModelSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        names = list(_REGISTRY)
        near = difflib.get_close_matches(str(name), names, n=5, cutoff=0.4)
        if not near:
            lower = {n.lower(): n for n in names}
            near = [lower[n] for n in difflib.get_close_matches(str(name).lower(), list(lower),
                                                                n=5, cutoff=0.3)]
        hint = f"nearest: {', '.join(near)}" if near else "see list_models()"
        raise ValueError(f"unknown model name {name!r}; {hint}")
    return _REGISTRY[name]


def model_info(name: str) -> dict:
    """``{"name", "canonical", "input_shape" (H, W, C), "has_split", "overrides"}``."""
    spec = _lookup(name)
    return {"name": name, "canonical": spec.alias_of or name,
            "input_shape": spec.input_shape, "has_split": bool(spec.cls.has_split),
            "overrides": _COMMON + spec.extra_overrides}


def canonical_name(name: str) -> str:
    """The network a (possibly alias) name resolves to, e.g. ``VGG11_L5 -> VGG11``."""
    spec = _lookup(name)
    return spec.alias_of or name


def _to_dtype(dtype):
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"invalid dtype override {dtype!r}: {e}") from None


def get_model(name: str, num_classes: int, **overrides):
    """Build the Flax module registered as ``name`` with ``num_classes`` outputs.

    Raises ``ValueError`` for an unknown name (listing the nearest names), a non-positive
    ``num_classes`` or an override the model does not take.
    """
    spec = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    allowed = _COMMON + spec.extra_overrides
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ValueError(f"{name}: unsupported override(s) {bad}; this model accepts "
                         f"{list(allowed)}")
    kwargs = dict(spec.kwargs)
    for key, val in overrides.items():
        if key == "init":
            if val not in ("torch", "flax"):
                raise ValueError(f"init must be 'torch' or 'flax', got {val!r}")
            kwargs["init_mode"] = val
        elif key == "dtype":
            kwargs["dtype"] = _to_dtype(val)
        elif key == "bn_axis_name":
            if spec.cls in (MLP, LeNet, ViT):
                if val is not None:
                    raise ValueError(f"{name} has no BatchNorm; bn_axis_name must be None")
            else:
                kwargs["bn_axis_name"] = val
        elif key == "bn_chunks":
            bn_chunk_sizes(1, val)  # validates: an int >= 1
            if spec.cls not in (MLP, LeNet, ViT):  # no BatchNorm: nothing to chunk
                kwargs["bn_chunks"] = int(val)
        else:
            kwargs[key] = val
    _check_sizes(name, spec, kwargs)
    return spec.cls(num_classes=int(num_classes), **kwargs)


# Size hyperparameters: ints >= 1 (split_block: >= 0), checked where the model is built, not
# when Flax first runs its setup (a ZeroDivisionError deep in a trace otherwise).
_SIZES = ("width", "depth", "patch", "dim", "heads", "mlp_dim")


def _check_sizes(name: str, spec: ModelSpec, kwargs: dict) -> None:
    for key in _SIZES + ("split_block",):
        if key in kwargs and key in spec.extra_overrides:
            val, low = kwargs[key], 0 if key == "split_block" else 1
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < low:
                raise ValueError(f"{name}: {key}={val!r} must be an int >= {low}")
    if spec.cls is ViT:
        check_vit_sizes(*(kwargs.get(k, getattr(ViT, k)) for k in ("dim", "heads", "depth",
                                                                    "split_block")), where=name)


def count_params(variables_or_params) -> int:
    """Number of scalars in ``params`` (``batch_stats`` excluded), like torch's
    ``sum(p.numel() for p in net.parameters())``."""
    tree = variables_or_params
    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def init_shapes(net, input_shape, batch: int = 1):
    """Shapes/dtypes of ``net.init`` on ``[batch, *input_shape]`` without computing."""
    x = jax.ShapeDtypeStruct((batch,) + tuple(input_shape), jnp.float32)
    return jax.eval_shape(lambda k, x: net.init(k, x), jax.random.key(0), x)


def front_shape(net, input_shape, batch: int = 1):
    """Shape of ``front`` (the ELF feature) for inputs ``[batch, *input_shape]``."""
    x = jax.ShapeDtypeStruct((batch,) + tuple(input_shape), jnp.float32)

    def f(k, x):
        v = net.init(k, x)
        return net.apply(v, x, method=net.front)

    return tuple(jax.eval_shape(f, jax.random.key(0), x).shape)
