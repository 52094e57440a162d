"""The XLA settings of the test session (applied by conftest.py).

XLA compiles the tests' programs without LLVM's backend optimizations: on the tests' tiny
shapes compiling is most of the time, and level 0 takes a third of it off (tests/test_train.py
and tests/test_evaluate.py: 86 -> 58 s on 2 cores, 2026-12-02). It changes how fast the
generated code runs, and may round differently (a test that compares two different programs
bit for bit runs in a child at the default level: ``without_test_opt_level``). Child
processes inherit it through the environment; the demo, the CLI and the benchmarks keep
XLA's default (level 3). ``ELF_JAX_TEST_XLA_OPT`` sets another level for a test run.
"""

import os

from elf_jax.xla_cpu import add_flag

OPT_FLAG = "--xla_backend_optimization_level"


def apply_test_opt_level() -> None:
    """Adds the tests' optimization level to ``XLA_FLAGS`` unless one is already set there."""
    add_flag(OPT_FLAG, os.environ.get("ELF_JAX_TEST_XLA_OPT", "0"))


def without_test_opt_level(flags: str) -> str:
    """``flags`` without an optimization level: XLA's default code generation."""
    return " ".join(f for f in flags.split() if not f.startswith(OPT_FLAG))
