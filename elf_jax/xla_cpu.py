"""XLA:CPU settings elf_jax applies when it is imported, before jax starts its CPU backend.

XLA:CPU (jax 0.10) hands each convolution to YNNPACK, which runs it on ONE thread here: on
the project's 2-core Intel machine a 32x32 64->64 convolution's forward took 84 ms on one
core and 82 on two, while PyTorch went from 99 to 56 ms. Without YNNPACK's convolutions
(``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``) XLA runs its own
multi-threaded convolutions: forward 53 ms (72 with YNNPACK), input gradient 39 (80),
filter gradient 95 (291) (BENCHMARKS.md, "XLA:CPU's convolutions on every core"). Only the
CPU backend reads the flag; the values are the same up to float reassociation.

The flag is added to ``XLA_FLAGS`` unless that already names a YNN fusion setting (the
user's choice wins) or ``ELF_JAX_XLA_CPU_DEFAULTS=0``. XLA reads ``XLA_FLAGS`` once, when
its first backend starts: a program that ran jax computations before importing elf_jax
keeps XLA's defaults (slower convolutions on the CPU, the same results).

Huge pages (:func:`reexec_with_hugepages`, applied by the ``elf-jax`` command and
``benchmarks/bench_vs_torch.py``): each execution of a jitted program maps a fresh
temporary buffer (about 1 GB for ResNet18's gradient at batch 100) and the kernel faults
every 4 KB page of it in, zeroed: 245,800 page faults per ResNet18 step; 18.8 M in a
six-step DM benchmark run, 48 s of its 63 s spent in the kernel. glibc's
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` asks for transparent huge pages on its large
allocations (where the kernel's THP mode is ``madvise`` or ``always``), 512x fewer faults: a
DM iteration 4.4 -> 2.6 s, ResNet18's gradient ~8% (BENCHMARKS.md, "Page faults"). glibc
reads it only when a process starts, so the command re-executes itself with it once; a
program that imports elf_jax sets it in its own environment. ``ELF_JAX_HUGEPAGES=0`` or a
``glibc.malloc.hugetlb`` already in ``GLIBC_TUNABLES`` leaves the environment as it is.
"""

from __future__ import annotations

import os
import platform
import sys

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


HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_environ(environ) -> dict | None:
    """``environ`` with :data:`HUGEPAGES_TUNABLE` added to ``GLIBC_TUNABLES``, or None where
    there is nothing to add: not Linux with glibc, ``ELF_JAX_HUGEPAGES=0``, or the tunable
    already set (to any value: the user's choice wins)."""
    value = environ.get("ELF_JAX_HUGEPAGES", "1")
    if value not in ("0", "1"):
        raise ValueError(f"ELF_JAX_HUGEPAGES={value!r}: use 1 (huge pages for large "
                         f"allocations, the default) or 0 (the system's setting)")
    if value == "0" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    joined = f"{tunables}:{HUGEPAGES_TUNABLE}" if tunables else HUGEPAGES_TUNABLE
    return {**environ, "GLIBC_TUNABLES": joined}


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with :func:`hugepage_environ`'s environment
    (same PID, arguments and interpreter options); returns where there is nothing to add.
    Call it first thing in a program's entry point: it does not come back."""
    environ = hugepage_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
