"""Interop with the PyTorch reference repositories (DC/DSA/DM, MTT, ELF).

Weights
    ``from_torch_state_dict(name, state_dict, num_classes, input_shape)`` -> Flax variables
    ``to_torch_state_dict(name, variables, num_classes, input_shape)`` -> torch state_dict

    Key names are those of the reference ``networks.py`` (``features.0.weight``,
    ``classifier.weight``, ``layer1.0.shortcut.1.running_mean`` ...); the reference's split
    class names (``ConvNet_L3``, ``VGG11_L5``, ``ResNet18_Layered``,
    ``ResNet18ImageNet_L4``, ...) resolve to the same networks as their plain names but keep
    their own key scheme (``layer1.N``, ``layer5_befor.0`` ...). ``from_torch_state_dict``
    accepts either scheme for either name; ``to_torch_state_dict`` writes the scheme of the
    name it is given (``style=`` overrides). A ``module.`` prefix (DataParallel) is stripped.

    Conversion: conv kernels OIHW -> HWIO; dense ``[out, in]`` -> ``[in, out]``, and the
    first dense layer after a conv trunk has its input axis permuted from the reference's
    NCHW flatten order (C, H, W) to ours (H, W, C); LayerNorm ``[C, H, W]`` -> ``[H, W, C]``;
    BatchNorm ``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``.
    ``num_batches_tracked`` is not used by our BatchNorm (momentum 0.1) and is dropped;
    ``to_torch_state_dict`` writes ``num_batches_tracked`` (default 0).

Flat parameter vectors (MTT expert buffers, ``ReparamModule``)
    ``flat_param_shapes``, ``flat_params_to_variables``, ``variables_to_flat_params``: the
    order is the reference ``net.parameters()`` order (BatchNorm statistics are buffers,
    not parameters, so they are not in the vector). Pure ``jax.numpy``: jit/vmap-able.
    ``load_replay_buffer(path, name, ...)`` reads ``replay_buffer_<n>.pt``;
    ``replay_buffer_files`` lists several in the reference's order and
    ``load_reference_teacher`` reads one snapshot (the reference's feature model).

Synthetic sets
    ``load_reference_synset(dir_or_files, zca=...)`` reads ``images_best.pt`` (NCHW ->
    NHWC), ``labels_best.pt`` and, if present, ``lr_best.pt``; ``export_reference_synset``
    writes them back.

torch is optional: functions that read or write ``.pt`` files or return torch tensors
raise ``ImportError`` with the install command when it is missing.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from elf_jax.interop import _refspec
from elf_jax.interop._flaxmap import flax_path

__all__ = [
    "from_torch_state_dict",
    "to_torch_state_dict",
    "reference_state_dict_keys",
    "flat_param_shapes",
    "flat_params_to_variables",
    "variables_to_flat_params",
    "load_replay_buffer",
    "load_reference_teacher",
    "replay_buffer_files",
    "export_replay_buffer",
    "load_reference_synset",
    "export_reference_synset",
    "require_torch",
]

INSTALL_HINT = ("pip install 'elf_jax[torch]' (or pip install torch==2.13.0 for the CPU "
                "build)")


class TorchNotInstalled(ImportError):
    """A reference file needs torch to be read and it is not installed (bad setup, not a
    bug: the CLI prints it as one line)."""


def require_torch():
    """Import torch or raise `TorchNotInstalled` (an ImportError) saying how to install it."""
    try:
        import torch  # noqa: WPS433 (absolute import of the real package)
    except ImportError as err:  # pragma: no cover - exercised only without torch
        raise TorchNotInstalled(
            f"PyTorch interop needs torch, which is not installed: {INSTALL_HINT}") from err
    return torch


# ============================================================================ helpers


def _to_numpy(v) -> np.ndarray:
    """torch tensor / jax array / numpy / python scalar -> numpy (float32 kept as is)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch.Tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _fmt_shape(input_shape):
    return "x".join(str(int(d)) for d in input_shape)


def _describe(name, num_classes, input_shape):
    return f"{name} (num_classes={num_classes}, input {_fmt_shape(input_shape)})"


def _norm_input_shape(input_shape, name=None):
    if input_shape is None:
        try:
            from elf_jax.models import model_info
            input_shape = model_info(name)["input_shape"]
        except (ImportError, ValueError, KeyError):
            raise ValueError(f"pass input_shape=(H, W, C) for {name!r}") from None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:  # allow a full NHWC batch shape
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)!r}")
    h, w, c = shape
    if c > 4 and h <= 4:
        raise ValueError(f"input_shape {shape} looks like (C, H, W); pass (H, W, C)")
    return shape


_CONVNET_OVERRIDES = {"width": "width", "depth": "depth", "norm": "norm", "pool": "pooling"}
_NORM_CANON = {"instancenorm": "instancenorm", "instance": "instancenorm", "in": "instancenorm",
               "batchnorm": "batchnorm", "batch": "batchnorm", "bn": "batchnorm",
               "layernorm": "layernorm", "layer": "layernorm", "ln": "layernorm",
               "groupnorm": "groupnorm", "group": "groupnorm", "gn": "groupnorm",
               "none": "none", "nn": "none"}
_POOL_CANON = {"avgpooling": "avgpooling", "avg": "avgpooling", "ap": "avgpooling",
               "maxpooling": "maxpooling", "max": "maxpooling", "mp": "maxpooling",
               "none": "none", "np": "none"}


def _spec(name, num_classes, input_shape, style=None, overrides=None):
    """Reference layout, with ConvNet-family overrides (width/depth/norm/pool) applied."""
    overrides = dict(overrides or {})
    layout_ov = {k: overrides[k] for k in _CONVNET_OVERRIDES if k in overrides}
    if layout_ov:
        if not name.startswith("ConvNet"):
            raise ValueError(f"overrides {sorted(layout_ov)} only apply to the ConvNet family")
        cfg, fd = _refspec.parse_convnet(name)
        for k, v in layout_ov.items():
            if k == "norm":
                v = _NORM_CANON.get(str(v).lower(), v)
            if k == "pool":
                v = _POOL_CANON.get(str(v).lower(), v)
            cfg[_CONVNET_OVERRIDES[k]] = v
        split = "split" if (style or _refspec.split_style_of(name)) == "split" else None
        layers = _refspec._convnet(name, num_classes, input_shape, cfg["width"],
                                   cfg["depth"], cfg["norm"], cfg["pooling"],
                                   (fd or cfg["depth"]) if split else None)
        return _refspec.RefSpec(name=name, family="convnet", style=split or "plain",
                                layers=tuple(layers), config=cfg)
    return _refspec.reference_spec(name, num_classes, input_shape, style=style)


@functools.lru_cache(maxsize=64)
def _expected_vars_cached(name, num_classes, input_shape, ov_items):
    import jax
    import jax.numpy as jnp

    from elf_jax.models import get_model

    model = get_model(name, num_classes, **dict(ov_items))
    x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return _flatten_tree(jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes,
                                                is_leaf=lambda s: hasattr(s, "shape")))


def _expected_vars(name, num_classes, input_shape, overrides):
    """{(collection, *path): shape} of the Flax model's variables (no FLOPs: eval_shape)."""
    ov = tuple(sorted((k, v) for k, v in (overrides or {}).items()
                      if k not in ("dtype",)))
    try:
        return _expected_vars_cached(name, int(num_classes), tuple(input_shape), ov)
    except TypeError:  # unhashable override value
        return _expected_vars_cached.__wrapped__(name, int(num_classes), tuple(input_shape),
                                                 ov)


def _flatten_tree(tree, prefix=()):
    out = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flatten_tree(v, prefix + (k,)))
    else:
        out[prefix] = tree
    return out


def _unflatten(flat):
    root: dict = {}
    for path, v in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return root


def _list_keys(keys, limit=12):
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more


# ---------------------------------------------------------------- per-layer conversion


def _torch_to_flax_layer(family, layer, t, xp):
    """{torch tensor name: array} -> {(collection, *path): array} for one layer."""
    path = tuple(flax_path(family, layer.cid))
    out = {}
    if layer.kind == "conv":
        out[("params",) + path + ("kernel",)] = xp.transpose(t["weight"], (2, 3, 1, 0))
        if "bias" in t:
            out[("params",) + path + ("bias",)] = t["bias"]
    elif layer.kind == "dense":
        w = t["weight"]
        if layer.chw is not None:
            c, h, wd = layer.chw
            fout = w.shape[0]
            w = xp.reshape(xp.transpose(xp.reshape(w, (fout, c, h, wd)), (2, 3, 1, 0)),
                           (h * wd * c, fout))
        else:
            w = xp.transpose(w, (1, 0))
        out[("params",) + path + ("kernel",)] = w
        out[("params",) + path + ("bias",)] = t["bias"]
    elif layer.kind == "ln":
        out[("params",) + path + ("scale",)] = xp.transpose(t["weight"], (1, 2, 0))
        out[("params",) + path + ("bias",)] = xp.transpose(t["bias"], (1, 2, 0))
    else:  # affine, bn
        out[("params",) + path + ("scale",)] = t["weight"]
        out[("params",) + path + ("bias",)] = t["bias"]
        if layer.kind == "bn" and "running_mean" in t:
            out[("batch_stats",) + path + ("mean",)] = t["running_mean"]
            out[("batch_stats",) + path + ("var",)] = t["running_var"]
    return out


def _flax_to_torch_layer(family, layer, get, xp, with_buffers=True):
    """Inverse of ``_torch_to_flax_layer``; ``get((collection, *path))`` -> array."""
    path = tuple(flax_path(family, layer.cid))
    p = ("params",) + path
    out = {}
    if layer.kind == "conv":
        out["weight"] = xp.transpose(get(p + ("kernel",)), (3, 2, 0, 1))
        if any(n == "bias" for n, _ in layer.shapes):
            out["bias"] = get(p + ("bias",))
    elif layer.kind == "dense":
        k = get(p + ("kernel",))
        if layer.chw is not None:
            c, h, wd = layer.chw
            fout = k.shape[-1]
            k = xp.reshape(xp.transpose(xp.reshape(k, (h, wd, c, fout)), (3, 2, 0, 1)),
                           (fout, c * h * wd))
        else:
            k = xp.transpose(k, (1, 0))
        out["weight"] = k
        out["bias"] = get(p + ("bias",))
    elif layer.kind == "ln":
        out["weight"] = xp.transpose(get(p + ("scale",)), (2, 0, 1))
        out["bias"] = xp.transpose(get(p + ("bias",)), (2, 0, 1))
    else:
        out["weight"] = get(p + ("scale",))
        out["bias"] = get(p + ("bias",))
        if layer.kind == "bn" and with_buffers:
            out["running_mean"] = get(("batch_stats",) + path + ("mean",))
            out["running_var"] = get(("batch_stats",) + path + ("var",))
    return out


def _get_spec(name, num_classes, input_shape, style=None, overrides=None):
    return _spec(name, num_classes, input_shape, style, overrides)


def _check_against_model(produced, name, num_classes, input_shape, overrides, what):
    """Compare {(collection, *path): shape} with the Flax model's variables."""
    try:
        expected = _expected_vars(name, num_classes, input_shape, overrides)
    except ImportError:  # model zoo not importable: nothing to compare against
        return None
    missing = [k for k in expected if k not in produced]
    extra = [k for k in produced if k not in expected]
    if missing or extra:
        msg = [f"{what}: the parameter layout does not match the Flax model "
               f"{_describe(name, num_classes, input_shape)}."]
        if missing:
            msg.append(f" Flax variables not filled: {_list_keys('/'.join(k) for k in missing)}.")
        if extra:
            msg.append(f" Unknown Flax paths: {_list_keys('/'.join(k) for k in extra)}.")
        msg.append(" (If the model zoo renamed a module, update "
                   "elf_jax/interop/_flaxmap.py.)")
        raise ValueError("".join(msg))
    bad = [(k, produced[k], expected[k]) for k in produced
           if tuple(produced[k]) != tuple(expected[k])]
    if bad:
        raise ValueError(
            f"{what}: shape mismatch against the Flax model "
            f"{_describe(name, num_classes, input_shape)}: "
            + "; ".join(f"{'/'.join(k)}: converted {tuple(a)}, model {tuple(b)}"
                        for k, a, b in bad[:8]))
    return expected


# ============================================================================ weights


def reference_state_dict_keys(name, num_classes, input_shape, *, style=None, **overrides):
    """The reference state_dict keys (in order) for ``name``; ``style`` plain/split."""
    spec = _get_spec(name, num_classes, _norm_input_shape(input_shape, name), style, overrides)
    return spec.keys()


def _strip_module_prefix(keys):
    keys = list(keys)
    if keys and all(k.startswith("module.") for k in keys):
        return {k: k[len("module."):] for k in keys}
    return {k: k for k in keys}


def _match_state_dict(name, sd_keys, num_classes, input_shape, style, overrides):
    """Pick the reference key scheme that ``sd_keys`` follows; ValueError otherwise."""
    own = style or _refspec.split_style_of(name)
    styles = [own]
    if style is None:
        styles.append("split" if own == "plain" else "plain")
    first_err = None
    for st in styles:
        try:
            spec = _get_spec(name, num_classes, input_shape, st, overrides)
        except ValueError as err:
            if st == own:
                raise
            continue
        allowed = set(spec.keys())
        required = {k for k in allowed if not k.endswith(".num_batches_tracked")}
        missing = [k for k in spec.keys() if k in required and k not in sd_keys]
        extra = [k for k in sd_keys if k not in allowed]
        if not missing and not extra:
            return spec
        if first_err is None:
            msg = [f"state_dict does not match the reference "
                   f"{_describe(name, num_classes, input_shape)} ({st} key names)."]
            if missing:
                msg.append(f" Missing keys ({len(missing)}): {_list_keys(missing)}.")
            if extra:
                msg.append(f" Unexpected keys ({len(extra)}): {_list_keys(extra)}.")
            if missing and extra:
                msg.append(" Is this a state_dict of another architecture?")
            first_err = "".join(msg)
    raise ValueError(first_err)


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], num_classes: int,
                          input_shape: Optional[Sequence[int]] = None, *,
                          style: Optional[str] = None,
                          **overrides):
    """Reference PyTorch ``state_dict`` -> Flax variables of ``get_model(name, ...)``.

    ``state_dict``: torch tensors or arrays, keys of the reference ``networks.py`` (either
    the plain or the split-class scheme; ``style`` forces one). ``input_shape``: (H, W, C);
    None = the size the registry lists for ``name``. ``overrides``: as for ``get_model``
    (ConvNet ``width``/``depth``/``norm``/``pool``
    change the layout too). Returns ``{"params": ...}`` plus ``{"batch_stats": ...}`` for
    BatchNorm models, as ``jax.numpy`` float32 arrays. Missing/extra keys or shape
    mismatches raise ``ValueError`` naming them.
    """
    import jax.numpy as jnp

    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of key -> tensor, got "
                         f"{type(state_dict).__name__} (did you pass the module? use "
                         "net.state_dict())")
    input_shape = _norm_input_shape(input_shape, name)
    rename = _strip_module_prefix(state_dict.keys())
    sd = {rename[k]: v for k, v in state_dict.items()}
    spec = _match_state_dict(name, sd, num_classes, input_shape, style, overrides)
    want = spec.torch_shapes()
    bad = []
    arrays = {}
    for key, shape in want.items():
        if key not in sd:  # optional num_batches_tracked
            continue
        a = _to_numpy(sd[key])
        if key.endswith(".num_batches_tracked"):
            continue
        if tuple(a.shape) != tuple(shape):
            bad.append(f"{key}: state_dict {tuple(a.shape)}, expected {tuple(shape)}")
        arrays[key] = a
    if bad:
        raise ValueError(
            f"state_dict shapes do not match {_describe(name, num_classes, input_shape)}: "
            + "; ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""))
    for key, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{key}: expected a floating-point tensor, got {a.dtype}")
    flat = {}
    for layer in spec.layers:
        t = {n: arrays[f"{layer.key}.{n}"].astype(np.float32)
             for n, _ in layer.shapes}
        flat.update(_torch_to_flax_layer(spec.family, layer, t, np))
    _check_against_model({k: v.shape for k, v in flat.items()}, name, num_classes,
                         input_shape, overrides, "from_torch_state_dict")
    return _unflatten({k: jnp.asarray(np.ascontiguousarray(v)) for k, v in flat.items()})


def to_torch_state_dict(name: str, variables: Mapping[str, Any], num_classes: int,
                        input_shape: Optional[Sequence[int]] = None, *,
                        style: Optional[str] = None, num_batches_tracked: int = 0,
                        as_numpy: bool = False,
                        **overrides):
    """Flax variables -> reference PyTorch ``state_dict`` (ordered as torch orders it).

    Key scheme: the reference class that ``name`` names (split aliases give their split
    keys) unless ``style`` (``"plain"``/``"split"``) says otherwise. BatchNorm
    ``num_batches_tracked`` is written as ``num_batches_tracked``. ``as_numpy=True`` returns
    numpy arrays (no torch needed); otherwise float32 torch tensors (int64 counters).
    """
    input_shape = _norm_input_shape(input_shape, name)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection (and "
                         "'batch_stats' for BatchNorm models), as returned by model.init")
    spec = _get_spec(name, num_classes, input_shape, style, overrides)
    flat_in = _flatten_tree({k: variables[k] for k in variables
                             if k in ("params", "batch_stats")})
    need = {}
    for layer in spec.layers:
        need.update(_torch_to_flax_layer(
            spec.family, layer, {n: np.zeros(s, np.float32) for n, s in layer.shapes}, np))
    need = {k: v.shape for k, v in need.items()}
    missing = [k for k in need if k not in flat_in]
    extra = [k for k in flat_in if k not in need]
    if missing or extra:
        msg = [f"variables do not match {_describe(name, num_classes, input_shape)}."]
        if missing:
            msg.append(f" Missing: {_list_keys('/'.join(k) for k in missing)}.")
        if extra:
            msg.append(f" Unexpected: {_list_keys('/'.join(k) for k in extra)}.")
        raise ValueError("".join(msg))
    bad = [f"{'/'.join(k)}: {tuple(np.shape(flat_in[k]))}, expected {tuple(s)}"
           for k, s in need.items() if tuple(np.shape(flat_in[k])) != tuple(s)]
    if bad:
        raise ValueError(f"variable shapes do not match "
                         f"{_describe(name, num_classes, input_shape)}: " + "; ".join(bad[:8]))

    def get(k):
        return np.asarray(flat_in[k], dtype=np.float32)

    out = {}
    for layer in spec.layers:
        t = _flax_to_torch_layer(spec.family, layer, get, np)
        for n, _ in layer.shapes:
            out[f"{layer.key}.{n}"] = np.ascontiguousarray(t[n], dtype=np.float32)
        if layer.kind == "bn":
            out[f"{layer.key}.num_batches_tracked"] = np.asarray(num_batches_tracked,
                                                                 dtype=np.int64)
    if as_numpy:
        return out
    torch = require_torch()
    return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


# ============================================================================ flat vectors


def flat_param_shapes(name: str, num_classes: int,
                      input_shape: Optional[Sequence[int]] = None, *,
                      style: Optional[str] = None, **overrides):
    """[(torch key, torch shape)] in the reference ``net.parameters()`` order."""
    return _get_spec(name, num_classes, _norm_input_shape(input_shape, name), style,
                     overrides).param_list()


def _is_vector(flat):
    if isinstance(flat, (list, tuple)):
        return False
    return True


def flat_params_to_variables(name: str, flat, num_classes: int,
                             input_shape: Optional[Sequence[int]] = None, *, batch_stats=None,
                             params_only: bool = False, **overrides):
    """Reference flat parameters -> Flax variables.

    ``flat``: a list of tensors in ``net.parameters()`` order (one epoch of an MTT expert
    buffer) or their concatenation (1-D, the ``ReparamModule`` flat vector). torch
    tensors, numpy or jax arrays; jax input stays traceable (jit/vmap-able).
    BatchNorm statistics are not parameters: ``batch_stats`` (a Flax ``batch_stats``
    tree) is used when given, else the initial values (mean 0, var 1).
    Returns ``{"params": ...}`` (+ ``"batch_stats"``), or just the params tree with
    ``params_only=True``.
    """
    import jax.numpy as jnp

    input_shape = _norm_input_shape(input_shape, name)
    spec = _get_spec(name, num_classes, input_shape, None, overrides)
    plist = spec.param_list()
    desc = _describe(name, num_classes, input_shape)
    if _is_vector(flat):
        vec = flat if hasattr(flat, "shape") and not hasattr(flat, "detach") else _to_numpy(flat)
        vec = jnp.asarray(vec)
        total = spec.num_params()
        if vec.ndim != 1 or vec.shape[0] != total:
            raise ValueError(
                f"flat parameter vector has shape {tuple(vec.shape)}, but {desc} has "
                f"{total} parameters (a 1-D vector of that length, or a list of "
                f"{len(plist)} tensors, is expected)")
        tensors, off = [], 0
        for _, shape in plist:
            n = int(np.prod(shape))
            tensors.append(jnp.reshape(vec[off:off + n], shape))
            off += n
    else:
        tensors = [t if (hasattr(t, "shape") and not hasattr(t, "detach")) else _to_numpy(t)
                   for t in flat]
        _check_param_list([tuple(t.shape) for t in tensors], plist, desc, "flat parameter list")
        tensors = [jnp.asarray(t, dtype=jnp.float32) for t in tensors]
    it = iter(tensors)
    flat_vars = {}
    for layer in spec.layers:
        t = {n: next(it) for n, _ in layer.param_shapes}
        flat_vars.update(_torch_to_flax_layer(spec.family, layer, t, jnp))
    if any(layer.kind == "bn" for layer in spec.layers):
        if batch_stats is not None:
            for k, v in _flatten_tree(batch_stats).items():
                flat_vars[("batch_stats",) + k] = jnp.asarray(v)
        else:
            for layer in spec.layers:
                if layer.kind == "bn":
                    c = layer.shapes[0][1][0]
                    p = ("batch_stats",) + tuple(flax_path(spec.family, layer.cid))
                    flat_vars[p + ("mean",)] = jnp.zeros((c,), jnp.float32)
                    flat_vars[p + ("var",)] = jnp.ones((c,), jnp.float32)
    _check_against_model({k: tuple(v.shape) for k, v in flat_vars.items()}, name,
                         num_classes, input_shape, overrides, "flat_params_to_variables")
    tree = _unflatten(flat_vars)
    return tree["params"] if params_only else tree


def _check_param_list(got_shapes, plist, desc, what):
    want = [s for _, s in plist]
    if got_shapes == [tuple(s) for s in want]:
        return
    n_got = sum(int(np.prod(s)) for s in got_shapes)
    n_want = sum(int(np.prod(s)) for s in want)
    first = None
    for i, (k, s) in enumerate(plist):
        if i >= len(got_shapes) or tuple(got_shapes[i]) != tuple(s):
            got = tuple(got_shapes[i]) if i < len(got_shapes) else "nothing"
            first = f"tensor {i} is {got}, {desc} expects {k} {tuple(s)}"
            break
    if first is None:
        first = f"{len(got_shapes) - len(plist)} extra tensor(s) at the end"
    raise ValueError(
        f"{what} does not fit {desc}: it holds {len(got_shapes)} tensors / {n_got} values, "
        f"the model has {len(plist)} / {n_want}; {first}.")


def variables_to_flat_params(name: str, variables, num_classes: int,
                             input_shape: Optional[Sequence[int]] = None, *,
                             as_list: bool = False,
                             **overrides):
    """Flax variables (or a bare params tree) -> reference flat parameters.

    Returns the 1-D ``jax.numpy`` vector (``torch.cat([p.reshape(-1) for p in
    net.parameters()])``), or with ``as_list=True`` the list of torch-shaped arrays.
    Traceable (jit/vmap-able).
    """
    import jax.numpy as jnp

    input_shape = _norm_input_shape(input_shape, name)
    spec = _get_spec(name, num_classes, input_shape, None, overrides)
    params = variables["params"] if (isinstance(variables, Mapping)
                                     and "params" in variables) else variables
    flat_in = _flatten_tree({"params": params})

    def get(k):
        if k not in flat_in:
            raise ValueError(f"params tree has no {'/'.join(k[1:])} "
                             f"(expected for {_describe(name, num_classes, input_shape)})")
        return jnp.asarray(flat_in[k])

    out = []
    for layer in spec.layers:
        t = _flax_to_torch_layer(spec.family, layer, get, jnp, with_buffers=False)
        for n, s in layer.param_shapes:
            if tuple(t[n].shape) != tuple(s):
                raise ValueError(f"{layer.key}.{n}: converted shape {tuple(t[n].shape)}, "
                                 f"expected {tuple(s)} for "
                                 f"{_describe(name, num_classes, input_shape)}")
            out.append(t[n])
    if as_list:
        return out
    return jnp.concatenate([jnp.reshape(t, (-1,)) for t in out])


# ============================================================================ replay buffers

_GUESS_NAMES = ("ConvNet", "ConvNetW32", "ConvNetW64", "ConvNetD4", "ConvNetD5",
                "ConvNetW256", "ConvNetW512",
                "ConvNetD4W256", "ConvNetD4W512", "ConvNetLN", "ConvNetNN", "ConvNetNP",
                "AlexNet", "AlexNetBN", "VGG11", "VGG11ImageNet", "ResNet18", "ResNet18_AP",
                "ResNet18ImageNet", "MLP", "LeNet")


def _guess_architecture(shapes, input_shape):
    """Reference names whose parameter layout equals ``shapes`` (for error messages)."""
    if not shapes or len(shapes[-1]) != 1:
        return []
    k = shapes[-1][0]
    hits = []
    for cand in _GUESS_NAMES:
        for shp in {tuple(input_shape), (32, 32, 3), (28, 28, 1), (64, 64, 3)}:
            try:
                spec = _refspec.reference_spec(cand, k, shp)
            except ValueError:
                continue
            if [tuple(s) for _, s in spec.param_list()] == [tuple(s) for s in shapes]:
                hits.append(f"{cand} ({k} classes, input {_fmt_shape(shp)})")
                break
    return hits


def _epoch_arrays(ep, spec, desc, input_shape, where: str) -> list:
    """One epoch of a buffer (a list of tensors in ``net.parameters()`` order, or their
    concatenation) as float32 numpy arrays; ``ValueError`` naming what the buffer fits."""
    plist = spec.param_list()
    if hasattr(ep, "detach"):  # already a flat vector
        ep = [ep]
        if ep[0].ndim == 1 and ep[0].numel() == spec.num_params():
            off, parts = 0, []
            for _, s in plist:
                n = int(np.prod(s))
                parts.append(ep[0][off:off + n].reshape(s))
                off += n
            ep = parts
    if not isinstance(ep, (list, tuple)):
        raise ValueError(f"{where} is {type(ep).__name__}, expected a list of tensors")
    shapes = [tuple(t.shape) for t in ep]
    try:
        _check_param_list(shapes, plist, desc, where)
    except ValueError as err:
        guess = _guess_architecture(shapes, input_shape)
        hint = f" The buffer's layout matches: {', '.join(guess)}." if guess else ""
        raise ValueError(str(err) + hint) from None
    return [_to_numpy(t).astype(np.float32) for t in ep]


def load_replay_buffer(path, name: str, num_classes: int,
                       input_shape: Optional[Sequence[int]] = None, *,
                       stack: bool = False, max_trajectories: Optional[int] = None,
                       params_only: bool = False, max_epochs: Optional[int] = None,
                       **overrides):
    """Read an MTT/ELF expert buffer ``replay_buffer_<n>.pt`` into our trajectory format.

    The file is ``torch.save``-d ``list[trajectory]``, ``trajectory = list[epoch]``,
    ``epoch = [p.detach().cpu() for p in net.parameters()]``. Returns a list of
    trajectories; each is a list of per-epoch variable dicts, as
    ``elf_jax.teacher.load_trajectory`` gives (``stack=False``), or one variable dict whose
    leaves have a leading epoch axis (``stack=True``). The buffers hold no BatchNorm
    statistics: BN models get the initial ``batch_stats`` (mean 0, var 1).
    ``params_only=True`` returns bare params trees instead of variable dicts;
    ``max_epochs`` keeps each trajectory's first snapshots only (less memory).
    A buffer written for another architecture raises ``ValueError`` naming both (and
    what the buffer fits).
    """
    import jax
    import jax.numpy as jnp

    torch = require_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert buffer {path} does not exist")
    input_shape = _norm_input_shape(input_shape, name)
    buf = _torch_load(torch, path, "expert buffer")
    if not isinstance(buf, (list, tuple)) or not buf:
        raise ValueError(f"expert buffer {path}: expected a non-empty list of trajectories, "
                         f"got {type(buf).__name__}")
    spec = _get_spec(name, num_classes, input_shape, None, overrides)
    plist = spec.param_list()
    desc = _describe(name, num_classes, input_shape)
    if max_trajectories is not None:
        buf = buf[:max_trajectories]
    trajectories = []
    for ti, traj in enumerate(buf):
        if not isinstance(traj, (list, tuple)) or not traj:
            raise ValueError(f"expert buffer {path}: trajectory {ti} is not a non-empty list "
                             "of epochs")
        if max_epochs is not None:
            traj = traj[:max_epochs]
        epochs = [_epoch_arrays(ep, spec, desc, input_shape,
                                f"expert buffer {path} (trajectory {ti}, epoch {ei})")
                  for ei, ep in enumerate(traj)]
        if stack:
            stacked = [jnp.asarray(np.stack([e[i] for e in epochs]))
                       for i in range(len(plist))]
            conv = jax.vmap(lambda lst: flat_params_to_variables(
                name, list(lst), num_classes, input_shape, params_only=params_only,
                **overrides))
            trajectories.append(conv(stacked))
        else:
            trajectories.append([flat_params_to_variables(name, e, num_classes, input_shape,
                                                          params_only=params_only,
                                                          **overrides)
                                 for e in epochs])
    return trajectories



def load_reference_teacher(path, name: str, num_classes: int,
                           input_shape: Optional[Sequence[int]] = None, *, epoch: int,
                           trajectory: int = -1, **overrides) -> dict:
    """The Flax variables of one snapshot of a reference teacher buffer: what the
    reference's ``ELF_eval.py`` loads as its feature model,
    ``torch.load(replay_buffer_0.pt)[-1][feature_epochs]`` (``trajectory=-1``: the last;
    snapshot ``e`` is the net after epoch ``e``, 0 the initialization). No BatchNorm
    statistics are stored: BN nets get the initial ones (mean 0, var 1), as the reference's
    fresh ``ReparamModule``. ``ValueError`` naming the buffer's extent for a missing
    trajectory or epoch, or what the buffer fits for another architecture."""
    torch = require_torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference teacher buffer {path} does not exist")
    input_shape = _norm_input_shape(input_shape, name)
    buf = _torch_load(torch, path, "reference teacher buffer", mmap=True)
    if not isinstance(buf, (list, tuple)) or not buf:
        raise ValueError(f"reference teacher buffer {path}: expected a non-empty list of "
                         f"trajectories, got {type(buf).__name__}")
    if not -len(buf) <= int(trajectory) < len(buf):
        raise ValueError(f"reference teacher buffer {path} holds {len(buf)} trajectories, "
                         f"so trajectory {trajectory} does not exist; choose one in "
                         f"[{-len(buf)}, {len(buf) - 1}] (-1 = the last, the reference's)")
    traj = buf[int(trajectory)]
    if not isinstance(traj, (list, tuple)) or not 0 <= int(epoch) < len(traj):
        n = len(traj) if isinstance(traj, (list, tuple)) else 0
        raise ValueError(f"reference teacher buffer {path}: trajectory {trajectory} has "
                         f"snapshots 0..{n - 1}, so epoch {epoch} does not exist; lower "
                         "teacher.feature_epoch")
    spec = _get_spec(name, num_classes, input_shape, None, overrides)
    arrays = _epoch_arrays(traj[int(epoch)], spec, _describe(name, num_classes, input_shape),
                           input_shape, f"reference teacher buffer {path} (trajectory "
                                        f"{trajectory}, epoch {epoch})")
    return flat_params_to_variables(name, arrays, num_classes, input_shape, **overrides)


_BUFFER_RE = re.compile(r"replay_buffer_(\d+)\.pt$")


def replay_buffer_files(source) -> list:
    """The reference expert buffer files ``source`` names, in the reference's order.

    ``source``: a directory (``replay_buffer_0.pt``, ``replay_buffer_1.pt``, ... until the
    first missing one: the reference's ``--load_all`` loop), a glob pattern (matches ordered
    by their buffer number ``n``, other names after them by name), one ``.pt`` file, or a
    comma-separated list (or a Python list) of these, concatenated in the order given.
    ``FileNotFoundError`` naming what was looked for when a part finds nothing."""
    import glob

    if isinstance(source, (list, tuple)):
        parts = [str(p) for p in source]
    else:
        parts = [p.strip() for p in str(source).split(",") if p.strip()]
    if not parts:
        raise FileNotFoundError("no expert buffer files given")
    out = []
    for part in parts:
        p = Path(part)
        if p.is_dir():
            n, found = 0, []
            while (p / f"replay_buffer_{n}.pt").is_file():
                found.append(p / f"replay_buffer_{n}.pt")
                n += 1
            if not found:
                raise FileNotFoundError(f"no replay_buffer_0.pt in {p} (the reference reads "
                                        "replay_buffer_<n>.pt for n = 0, 1, ... until one is "
                                        "missing)")
        elif any(ch in part for ch in "*?["):
            def order(f):
                m = _BUFFER_RE.search(f)
                return (0, int(m.group(1)), f) if m else (1, 0, f)

            found = [Path(f) for f in sorted(glob.glob(part), key=order) if Path(f).is_file()]
            if not found:
                raise FileNotFoundError(f"no expert buffer file matches {part!r}")
        elif p.is_file():
            found = [p]
        else:
            raise FileNotFoundError(f"expert buffer {p} does not exist (pass a "
                                    "replay_buffer_<n>.pt, a directory of them, a glob or a "
                                    "comma-separated list)")
        out.extend(found)
    return out


def export_replay_buffer(path, name: str, trajectories, num_classes: int,
                         input_shape: Optional[Sequence[int]] = None, **overrides):
    """Write trajectories as a reference ``replay_buffer_<n>.pt`` (inverse of
    ``load_replay_buffer``).

    ``trajectories``: a list of trajectories, each a list of per-epoch variable dicts or
    params trees (e.g. ``elf_jax.teacher.load_trajectory(workdir, expert)``) or one
    stacked tree with a leading epoch axis. Each epoch is written as the list of tensors
    in ``net.parameters()`` order (BatchNorm statistics are not part of the format).
    """
    import jax

    torch = require_torch()
    input_shape = _norm_input_shape(input_shape, name)
    out = []
    for traj in trajectories:
        if isinstance(traj, Mapping):  # stacked: split the leading epoch axis
            leaves = jax.tree_util.tree_leaves(traj)
            n = int(np.shape(leaves[0])[0])
            traj = [jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], traj)
                    for i in range(n)]
        epochs = []
        for ep in traj:
            lst = variables_to_flat_params(name, ep, num_classes, input_shape, as_list=True,
                                           **overrides)
            epochs.append([torch.from_numpy(np.array(a, dtype=np.float32)) for a in lst])
        out.append(epochs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(torch, out, path)
    return path


# ============================================================================ synthetic sets


def _resolve_synset_files(source, suffix):
    """-> (images_path, labels_path, lr_path or None)."""
    if isinstance(source, Mapping):
        imgs = source.get("images")
        labs = source.get("labels")
        lr = source.get("lr")
        if imgs is None or labs is None:
            raise ValueError("a mapping source needs 'images' and 'labels' paths "
                             "(and optionally 'lr')")
        return Path(imgs), Path(labs), (Path(lr) if lr is not None else None)
    if isinstance(source, (list, tuple)):
        if len(source) not in (2, 3):
            raise ValueError("a sequence source is (images.pt, labels.pt[, lr.pt])")
        return (Path(source[0]), Path(source[1]),
                Path(source[2]) if len(source) == 3 and source[2] is not None else None)
    p = Path(source)
    if p.is_dir():
        lr = p / f"lr_{suffix}.pt"
        return p / f"images_{suffix}.pt", p / f"labels_{suffix}.pt", (lr if lr.exists()
                                                                      else None)
    if p.suffix == ".pt" and p.name.startswith("images"):
        labs = p.with_name("labels" + p.name[len("images"):])
        lr = p.with_name("lr" + p.name[len("images"):])
        return p, labs, (lr if lr.exists() else None)
    if not p.exists():
        raise FileNotFoundError(f"synthetic set source {p} does not exist")
    raise ValueError(f"{p}: pass a directory holding images_{suffix}.pt / "
                     f"labels_{suffix}.pt [/ lr_{suffix}.pt], an images_*.pt file, or a "
                     "mapping {'images':..., 'labels':..., 'lr':...}")


def _torch_load(torch, path, what: str, mmap: bool = False):
    """``torch.load`` of tensors only; a damaged file is one ``ValueError`` line that never
    repeats torch's advice to load with ``weights_only=False`` (unsafe: runs pickled code).
    ``mmap=True`` maps the file instead of reading it (one snapshot of a large buffer) where
    the file's format allows; otherwise it is read as usual."""
    if mmap:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an old-format file: read it (errors reported below)
            pass
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, ...
        raise ValueError(
            f"{what} {path} is not a valid .pt tensor file (truncated, corrupt, or holding "
            f"Python objects besides tensors; {type(err).__name__}): re-export it and copy it "
            "again") from None


def load_reference_synset(source, *, zca: bool = False, num_classes: Optional[int] = None,
                          metadata: Optional[Mapping[str, Any]] = None,
                          suffix: str = "best", as_dict: bool = False,
                          normalization: Optional[Mapping[str, Any]] = None):
    """Import a synthetic set saved by the reference repositories.

    ``source``: a directory with ``images_best.pt``, ``labels_best.pt`` and optionally
    ``lr_best.pt`` (``suffix`` picks e.g. ``images_5000.pt``), an ``images_*.pt`` path
    (siblings found by name), or a mapping ``{"images", "labels", "lr"}`` of paths.
    Images NCHW -> NHWC float32; hard labels int32, soft labels float32 ``[N, K]``; lr a
    float (0-d tensor or python number) or None.

    ``zca``: the images are in ZCA-whitened space (the reference saves them so when run
    with ``--zca``); stored in ``metadata["zca"]`` so our pipeline applies the same
    whitening to real data. No transform is applied to the images.

    ``normalization``: the space the images are in (``elf_jax.synset.normalization_record``:
    per-channel mean/std, zca), recorded as ``metadata["normalization"]``; the ``.pt`` files do
    not say it. The reference's MTT/ELF ``utils.py`` normalizes CIFAR-100 with CIFAR-10's
    mean/std, its DC/DSA/DM ``utils.py`` with CIFAR-100's (``dataset_info(..., stats=...)``).
    None: not recorded (the importing pipeline decides, ``config.synset.import_stats``).

    Returns an ``elf_jax.synset.SyntheticSet`` (validated: NaN/Inf, label range, lr > 0)
    or, with ``as_dict=True`` or when that module is unavailable, a dict with
    ``images``, ``labels``, ``lr``, ``metadata``.
    """
    torch = require_torch()
    imgs_p, labs_p, lr_p = _resolve_synset_files(source, suffix)
    for p in (imgs_p, labs_p):
        if not p.is_file():
            raise FileNotFoundError(f"reference synthetic set file {p} does not exist")

    def load(p):
        return _torch_load(torch, p, "synthetic set file")

    images = _to_numpy(load(imgs_p))
    if images.ndim != 4:
        raise ValueError(f"{imgs_p}: expected NCHW images [N, C, H, W], got shape "
                         f"{images.shape}")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        raise ValueError(f"{imgs_p}: shape {images.shape} looks NHWC already; the reference "
                         "saves NCHW")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{imgs_p}: expected floating-point images, got {images.dtype}")
    images = np.ascontiguousarray(images.astype(np.float32).transpose(0, 2, 3, 1))
    labels = _to_numpy(load(labs_p))
    if labels.dtype == np.bool_:
        raise ValueError(f"{labs_p}: labels are booleans, not class indices; save them as an "
                         "integer tensor (or [N, K] probabilities)")
    if labels.ndim == 1:
        if np.issubdtype(labels.dtype, np.floating):
            if not np.all(labels == np.round(labels)):
                raise ValueError(f"{labs_p}: 1-D labels must be integers")
        labels = labels.astype(np.int32)
    elif labels.ndim == 2:
        labels = labels.astype(np.float32)
    else:
        raise ValueError(f"{labs_p}: labels must be [N] or [N, K], got {labels.shape}")
    lr = None
    if lr_p is not None:
        if not lr_p.is_file():
            raise FileNotFoundError(f"reference lr file {lr_p} does not exist")
        raw = load(lr_p)
        arr = _to_numpy(raw)
        if arr.size != 1:
            raise ValueError(f"{lr_p}: expected a scalar learning rate, got shape {arr.shape}")
        lr = float(arr.reshape(()))
        if not np.isfinite(lr):
            raise ValueError(f"{lr_p}: learned lr is {lr} (the distillation diverged)")
    meta = {"method": "reference_import", "zca": bool(zca),
            "source": str(imgs_p.parent), **dict(metadata or {})}
    if normalization is not None:
        meta["normalization"] = {"mean": [float(v) for v in normalization["mean"]],
                                 "std": [float(v) for v in normalization["std"]],
                                 "zca": bool(normalization.get("zca", zca))}
    if not np.isfinite(images).all():
        raise ValueError(f"{imgs_p}: images hold NaN/Inf values")
    if as_dict:
        return {"images": images, "labels": labels, "lr": lr, "metadata": meta}
    try:
        from elf_jax.synset import SyntheticSet
    except ImportError:
        return {"images": images, "labels": labels, "lr": lr, "metadata": meta}
    return SyntheticSet(images=images, labels=labels, lr=lr, metadata=meta,
                        num_classes=num_classes)


def _atomic_torch_save(torch, obj, path: Path):
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_reference_synset(synset, out_dir, labels=None, lr=None, *, suffix: str = "best",
                            lr_as_float: bool = False):
    """Write a synthetic set as the reference repositories do.

    ``synset``: a ``SyntheticSet`` / dict with ``images``/``labels``/``lr``, or NHWC images
    (then pass ``labels`` and optionally ``lr``). Writes ``images_best.pt`` (NCHW float32),
    ``labels_best.pt`` (int64 hard or float32 soft labels) and, when there is an lr,
    ``lr_best.pt`` (0-d float32 tensor; ``lr_as_float=True`` writes a python float as some
    reference scripts do). Returns ``{"images": path, "labels": path, "lr": path|None}``.
    """
    torch = require_torch()
    if isinstance(synset, Mapping):
        images, labs, lr_v = synset["images"], synset["labels"], synset.get("lr")
    elif hasattr(synset, "images") and hasattr(synset, "labels"):
        images, labs, lr_v = synset.images, synset.labels, getattr(synset, "lr", None)
    else:
        images, labs, lr_v = synset, labels, None
        if labs is None:
            raise ValueError("pass labels= when exporting raw images")
    if lr is not None:
        lr_v = lr
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [N, H, W, C], got shape {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("refusing to export images holding NaN/Inf values")
    labs = np.asarray(labs)
    if labs.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labs.shape[0]} labels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    if labs.ndim == 1:
        lab_t = torch.from_numpy(labs.astype(np.int64))
    else:
        lab_t = torch.from_numpy(np.ascontiguousarray(labs.astype(np.float32)))
    paths = {"images": out / f"images_{suffix}.pt", "labels": out / f"labels_{suffix}.pt",
             "lr": None}
    _atomic_torch_save(torch, nchw, paths["images"])
    _atomic_torch_save(torch, lab_t, paths["labels"])
    if lr_v is not None:
        lr_f = float(np.asarray(lr_v).reshape(()))
        if not np.isfinite(lr_f):
            raise ValueError(f"refusing to export a non-finite lr ({lr_f})")
        paths["lr"] = out / f"lr_{suffix}.pt"
        _atomic_torch_save(torch, lr_f if lr_as_float else torch.tensor(lr_f,
                                                                        dtype=torch.float32),
                           paths["lr"])
    return paths

