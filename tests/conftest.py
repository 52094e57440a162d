"""Test-session settings, before any test imports jax: XLA settings that compile the tests
fast (tests/_xla.py) and elf_jax's XLA:CPU setting (elf_jax/xla_cpu.py, applied by importing
elf_jax), so that no test module's import order decides which convolutions a worker runs.

A test marked ``default_codegen`` (two different programs compared bit for bit: a claim about
XLA's default code generation, which the fast-compile settings round differently) runs in a
child pytest at XLA's default code generation."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _xla  # noqa: E402

_xla.apply_fast_compile()
import elf_jax  # noqa: E402,F401


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("default_codegen") and _xla.fast_compile_on():
        _xla.run_at_default_codegen(pyfuncitem.nodeid, str(pyfuncitem.config.rootpath))
        return True
    return None
