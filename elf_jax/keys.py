"""PRNG key helpers: the one place that converts keys and derives a stage's random stream.

Every stage derives its keys from its own tag (``stage_key(seed, "teacher")``), so two stages
never share an initialization by accident: with one seed, the teacher, the MTT experts, the
distillation and the evaluation networks all start from different weights, while the
baseline and ELF repeats of an evaluation stay paired (same tag, same repeat index).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

__all__ = ["STAGES", "is_typed", "raw_key", "typed_key", "stage_key"]

STAGES = ("teacher", "expert", "distill", "evaluate")


def is_typed(key) -> bool:
    return jnp.issubdtype(getattr(key, "dtype", jnp.uint32), jax.dtypes.prng_key)


def raw_key(key) -> jax.Array:
    """Raw ``uint32`` key data of a typed key, a raw key or an int seed."""
    if isinstance(key, int):
        key = jax.random.key(key)
    key = key if hasattr(key, "dtype") else jnp.asarray(key)
    return jax.random.key_data(key) if is_typed(key) else jnp.asarray(key, jnp.uint32)


def typed_key(key) -> jax.Array:
    """A typed key from a typed key, a raw key or an int seed."""
    if isinstance(key, int):
        return jax.random.key(key)
    key = key if hasattr(key, "dtype") else jnp.asarray(key)
    return key if is_typed(key) else jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def stage_key(key, stage: str) -> jax.Array:
    """The typed base key of ``stage`` (one of :data:`STAGES`) under ``key`` (or a seed)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    # a stable 31-bit tag per name: fold_in takes a uint32 and Python's hash() is salted
    return jax.random.fold_in(typed_key(key), zlib.crc32(stage.encode()) & 0x7FFFFFFF)
