"""XLA:CPU settings elf_jax applies when it is imported, before jax starts its CPU backend.

XLA:CPU (jax 0.10) hands each convolution to YNNPACK, which runs it on ONE thread here: on
the project's 2-core Intel machine a 32x32 64->64 convolution's forward took 84 ms on one
core and 82 on two, while PyTorch went from 99 to 56 ms. Without YNNPACK's convolutions
(``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``) XLA runs its own
multi-threaded convolutions: forward 53 ms (72 with YNNPACK), input gradient 39 (80),
filter gradient 95 (291) (docs/benchmarks_notes.md, "XLA:CPU's convolutions on every core"). Only
the CPU backend reads the flag; the values are the same up to float reassociation, and closer
to float64 on the Intel machine: YNNPACK's filter gradients are ~10x further from float64
than XLA's, VGG11's whole gradient 1.1e-3 against 2.2e-5 (docs/benchmarks_notes.md, "float32
gradients against float64 on the Intel machine").

The flag is added to ``XLA_FLAGS`` unless that already names a YNN fusion setting (the
user's choice wins) or ``ELF_JAX_XLA_CPU_DEFAULTS=0``. XLA reads ``XLA_FLAGS`` once, when
its first backend starts: a program that ran jax computations before importing elf_jax
keeps XLA's defaults (slower convolutions on the CPU, the same results).
"""

from __future__ import annotations

import os

YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type"
MULTI_THREADED_CONVS = f"{YNN_FUSION}=-individual_convolution"


def add_flag(name: str, value: str) -> None:
    """Appends ``name=value`` to ``XLA_FLAGS`` unless ``XLA_FLAGS`` already sets ``name``."""
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {name}={value}".strip()


def env_switch(name: str, on: str, off: str) -> bool:
    """The environment variable ``name``: 1 (``on``, the default) or 0 (``off``); any other
    value is a ``ValueError`` that says both."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: use 1 ({on}, the default) or 0 ({off})")
    return value == "1"


def apply_defaults() -> None:
    """Adds :data:`MULTI_THREADED_CONVS` to ``XLA_FLAGS`` (see the module docstring)."""
    if env_switch("ELF_JAX_XLA_CPU_DEFAULTS", "elf_jax's XLA:CPU setting", "XLA's own defaults"):
        add_flag(*MULTI_THREADED_CONVS.split("="))


def ynn_convolutions() -> bool:
    """Whether XLA:CPU's convolutions go to YNNPACK (one thread) in this process, as far as
    ``XLA_FLAGS`` says."""
    return MULTI_THREADED_CONVS not in os.environ.get("XLA_FLAGS", "")
