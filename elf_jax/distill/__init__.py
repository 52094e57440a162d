"""Dataset distillation in JAX: DC, DSA, DM, MTT, TESLA.

    from elf_jax.distill import distill, get_method
    s = distill("dm", "mnist5k", ipc=10, iterations=200, workdir="runs/dm")   # SyntheticSet
    run = get_method("dsa")          # the driver run_dsa(dataset, *, arch, ipc, ...)

Each method has a pure jitted step ``(state, key, real data) -> (state, metrics)``
(``make_<method>_step``) and a driver ``run_<method>`` (checkpoint/resume, NaN stop,
periodic evaluation keeping the best set; see :mod:`elf_jax.distill.common`).
``distill_from_config(config, workdir)`` is the CLI hook (``elf-jax distill``).
"""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Callable

__all__ = ["METHODS", "list_methods", "get_method", "distill", "distill_from_config"]

# method -> (module, driver)
METHODS = {
    "dc": ("elf_jax.distill.gradient_matching", "run_dc"),
    "dsa": ("elf_jax.distill.gradient_matching", "run_dsa"),
    "dm": ("elf_jax.distill.dm", "run_dm"),
    "mtt": ("elf_jax.distill.mtt", "run_mtt"),
    "tesla": ("elf_jax.distill.mtt", "run_tesla"),
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Callable[..., Any]:
    """The driver ``run_<name>``; ``ValueError`` listing the known methods otherwise."""
    key = str(name).lower()
    if key not in METHODS:
        near = difflib.get_close_matches(key, list(METHODS), n=2)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"unknown distillation method {name!r}{hint}; known methods: "
                         f"{', '.join(list_methods())}")
    module, fn = METHODS[key]
    return getattr(importlib.import_module(module), fn)


def distill(method: str, dataset, **kwargs):
    """``get_method(method)(dataset, **kwargs)`` -> ``SyntheticSet``."""
    return get_method(method)(dataset, **kwargs)


# config fields (config.synset.<name>) forwarded to the drivers when present
_COMMON_FIELDS = ("init", "lr_img", "momentum", "dsa_strategy", "checkpoint_every", "eval_every")
_METHOD_FIELDS = {
    "dc": ("batch_real", "outer_loop", "inner_loop", "lr_net", "dis_metric", "batch_train"),
    "dsa": ("batch_real", "outer_loop", "inner_loop", "lr_net", "dis_metric", "batch_train"),
    "dm": ("batch_real",),
    "mtt": ("syn_steps", "expert_epochs", "max_start_epoch", "lr_lr", "lr_teacher",
            "batch_syn", "num_experts", "expert_train_epochs", "remat"),
    "tesla": ("syn_steps", "expert_epochs", "max_start_epoch", "lr_lr", "lr_teacher",
              "batch_syn", "num_experts", "expert_train_epochs", "soft_labels",
              "learn_labels", "lr_label", "gradient"),
}


def _get(section, name, default=None):
    if section is None:
        return default
    try:
        return section.get(name, default)
    except AttributeError:
        return getattr(section, name, default)


def distill_from_config(config, workdir, *, train=None, test=None):
    """Runs the distillation a config describes and returns the ``SyntheticSet``.

    Reads ``config.dataset``, ``config.data_dir``, ``config.zca``, ``config.seed`` and
    ``config.synset`` (``method``, ``ipc``, ``iterations``, ``arch``, plus the optional
    method fields: see ``_COMMON_FIELDS``/``_METHOD_FIELDS``; ``model_kwargs`` a dict of
    ``get_model`` overrides; ``experts`` a teacher workdir or ``replay_buffer_<n>.pt`` for
    MTT/TESLA (default: train experts into ``<workdir>/experts``); ``eval_epochs``,
    ``eval_repeats`` for the periodic evaluation). Checkpoints, ``synset_best`` and
    ``synset_final`` are written under ``workdir`` (the pipeline passes
    ``<run>/distill``); a killed run resumes there. ``train``/``test``: the config's
    splits when the caller has loaded them already.
    """
    import jax

    from elf_jax.distill.common import EvalSettings
    from elf_jax.data import load

    s = config.synset
    method = str(_get(s, "method", "dm")).lower()
    run = get_method(method)
    data_kw = {}
    if _get(config, "data_dir"):
        data_kw["data_dir"] = _get(config, "data_dir")
    zca = bool(_get(config, "zca", False))
    if train is None:
        train = load(config.dataset, "train", zca=zca, **data_kw)
    kwargs = dict(arch=_get(s, "arch", "ConvNet"), ipc=int(_get(s, "ipc", 10)),
                  iterations=int(_get(s, "iterations", 1000)),
                  key=jax.random.key(int(_get(config, "seed", 0))),
                  workdir=Path(workdir))
    for name in _COMMON_FIELDS + _METHOD_FIELDS[method]:
        v = _get(s, name)
        if v is not None:
            kwargs[name] = v
    mk = _get(s, "model_kwargs")
    if mk:
        kwargs["model_kwargs"] = dict(mk)
    if int(kwargs.get("eval_every", 0) or 0) > 0:
        kwargs["evaluation"] = EvalSettings(
            every=int(kwargs.pop("eval_every")), epochs=int(_get(s, "eval_epochs", 300)),
            repeats=int(_get(s, "eval_repeats", 1)))
        kwargs["test_dataset"] = test if test is not None else load(
            config.dataset, "test", zca=zca, **data_kw)
    else:
        kwargs.pop("eval_every", None)
    if method in ("mtt", "tesla"):
        experts = _get(s, "experts")
        kwargs["experts"] = str(experts) if experts else None
    return run(train, **kwargs)
