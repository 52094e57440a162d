"""Dataset distillation in JAX: DC, DSA, DM, MTT, TESLA.

    from elf_jax.distill import distill, get_method
    s = distill("dm", "mnist5k", ipc=10, iterations=200, workdir="runs/dm")   # SyntheticSet
    s = distill("dsa", "mnist5k", GradientMatchingSettings(ipc=1, iterations=10))
    run = get_method("dsa")          # run_dsa(dataset, **fields): distill("dsa", ...)

Each method has a pure jitted step ``(state, key, real data) -> (state, metrics)``
(``make_<method>_step``), a settings dataclass (:mod:`elf_jax.distill.settings`) and a
``setup`` hook for the one driver :func:`elf_jax.distill.common.distill` (checkpoint/resume,
NaN stop, periodic evaluation keeping the best set).
``distill_from_config(config, workdir)`` is the CLI hook (``elf-jax distill``).
"""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Callable

__all__ = ["METHODS", "list_methods", "method_name", "get_method", "distill",
           "distill_from_config"]

# method -> its module (``setup`` hook for the driver, ``run_<method>`` entry point)
METHODS = {
    "dc": "elf_jax.distill.gradient_matching",
    "dsa": "elf_jax.distill.gradient_matching",
    "dm": "elf_jax.distill.dm",
    "mtt": "elf_jax.distill.mtt",
    "tesla": "elf_jax.distill.mtt",
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def method_name(name: str) -> str:
    """``name`` lower-cased; ``ValueError`` listing the known methods if it is not one."""
    key = str(name).lower()
    if key not in METHODS:
        near = difflib.get_close_matches(key, list(METHODS), n=2)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ValueError(f"unknown distillation method {name!r}{hint}; known methods: "
                         f"{', '.join(list_methods())}")
    return key


def get_method(name: str) -> Callable[..., Any]:
    """The entry point ``run_<name>``; ``ValueError`` listing the known methods otherwise."""
    key = method_name(name)
    return getattr(importlib.import_module(METHODS[key]), f"run_{key}")


def distill(method: str, dataset, settings=None, **kwargs):
    """The driver, :func:`elf_jax.distill.common.distill` -> ``SyntheticSet``."""
    from elf_jax.distill.common import distill as driver

    return driver(method, dataset, settings, **kwargs)


def distill_from_config(config, workdir, *, train=None, choose_on=None, callback=None):
    """Runs the distillation a config describes and returns the ``SyntheticSet``.

    Reads ``config.dataset``, ``config.data_dir``, ``config.zca``, ``config.stats``, ``config.seed``,
    ``config.validation``, ``config.synset.method`` and the method's settings from
    ``config.synset`` (:func:`elf_jax.distill.settings.from_config`; unset fields keep the
    method's defaults). Checkpoints, ``synset_best`` and ``synset_final`` are written under
    ``workdir`` (the pipeline passes ``<run>/distill``); a killed run resumes there. With
    ``synset.eval_every`` the best set is chosen on the validation split held out of the
    training split (:mod:`elf_jax.data.validation`), or on the test split when
    ``validation.fraction`` is 0 (the reference's way).
    ``train``/``choose_on``: those splits when the caller has made them already.
    """
    import jax

    from elf_jax.data.stream import STREAM_ABOVE_GB, open_split
    from elf_jax.data.validation import hold_out, validation_settings
    from elf_jax.distill.settings import from_config

    method = method_name(config.synset.method)
    settings = from_config(method, config.synset)
    data_kw = {"zca": bool(config.get("zca", False)), "stats": config.get("stats", "dc") or "dc"}
    if config.get("data_dir"):
        data_kw["data_dir"] = config.data_dir
    data_kw["mode"] = config.get("data_mode", "auto")
    data_kw["stream_above_gb"] = float(config.get("stream_above_gb", STREAM_ABOVE_GB))
    if train is None:
        held = hold_out(open_split(config.dataset, "train", **data_kw),
                        *validation_settings(config))
        train = held.train
        choose_on = held.validation if choose_on is None else choose_on
    if settings.eval_every > 0 and choose_on is None:
        choose_on = open_split(config.dataset, "test", **data_kw)
    return distill(method, train, settings, workdir=Path(workdir),
                   key=jax.random.key(int(config.get("seed", 0))),
                   test_dataset=choose_on if settings.eval_every > 0 else None, callback=callback)
