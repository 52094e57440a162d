"""Test-session settings, before any test imports jax: XLA settings that compile the tests
fast (tests/_xla.py), the instruction-set cap of ``make test-avx2`` (``ELF_JAX_TEST_MAX_ISA``)
and elf_jax's XLA:CPU setting (elf_jax/xla_cpu.py, applied by importing elf_jax), so that no
test module's import order decides which convolutions a worker runs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _xla  # noqa: E402

_xla.apply_fast_compile()
_xla.apply_max_isa()
import elf_jax  # noqa: E402,F401
