"""The one XLA:CPU loop policy.

On the CPU, XLA does not canonicalise the backward convolutions inside a ``while`` loop body
and falls onto a naive emitter (10-30x slower; docs/benchmarks_notes.md, "Evaluation training"). So
on the CPU, code whose loop bodies hold convolutions keeps them out of loops: the training
engine dispatches one jitted step per minibatch (:func:`default_engine`), and the
distillation methods unroll their short scans (:func:`scan`) or drive their rounds from
the host (``elf_jax.distill.gradient_matching``, when :func:`cpu_loops`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["CPU_UNROLL_MAX", "cpu_loops", "default_engine", "loop_unroll", "scan", "map_"]

#: Longest ``lax.scan`` with convolutions in its body that :func:`scan` fully unrolls on
#: XLA:CPU. On the CPU a convolution inside a ``while`` loop body (a rolled scan) falls to a
#: naive path, 10-30x slower in the backward pass (docs/benchmarks_notes.md, "Evaluation training");
#: a full unroll (no while loop) keeps the fast path, for compile time that grows with the
#: length (docs/benchmarks_notes.md, "Distillation"); a partial unroll does not help.
CPU_UNROLL_MAX = 24


def cpu_loops() -> bool:
    """Whether the default backend is XLA:CPU (loops with convolutions want unrolling)."""
    return jax.default_backend() == "cpu"


def loop_unroll(length: int, max_length: Optional[int] = None):
    """The ``unroll`` argument for a ``lax.scan`` of ``length`` steps whose body holds
    convolutions: ``True`` (full unroll) on XLA:CPU when ``0 < length <= max_length``
    (default :data:`CPU_UNROLL_MAX`), else ``1`` (a rolled loop: GPU/TPU, long loops)."""
    bound = CPU_UNROLL_MAX if max_length is None else int(max_length)
    return True if cpu_loops() and 0 < int(length) <= bound else 1


def scan(f, init, xs=None, length: Optional[int] = None, *, max_length: Optional[int] = None):
    """``lax.scan(f, init, xs, length)`` fully unrolled (traced step by step) when
    :func:`loop_unroll` says so (bodies with convolutions on the CPU), else the rolled
    ``lax.scan``. The same results as the rolled scan up to float reassociation."""
    n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
    if loop_unroll(n, max_length) is not True:
        return jax.lax.scan(f, init, xs, length=length)
    # a Python loop, as lax.scan(unroll=True) but with no while loop even for length 1
    # (lax.scan keeps a one-trip while loop there)
    carry, ys = init, []
    for i in range(n):
        carry, y = f(carry, jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def map_(f, xs, *, max_length: Optional[int] = None):
    """``lax.map(f, xs)`` unrolled per :func:`loop_unroll`."""
    return scan(lambda c, x: (c, f(x)), (), xs, max_length=max_length)[1]


def default_engine(backend: Optional[str] = None) -> str:
    """The training engine: ``host`` (one dispatch per step) on the CPU, ``scan`` elsewhere."""
    return "host" if (backend or jax.default_backend()) == "cpu" else "scan"
