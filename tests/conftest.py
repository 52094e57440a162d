"""Test-session settings, before any test imports jax: XLA's optimization level for the tests
(tests/_xla.py) and elf_jax's XLA:CPU setting (elf_jax/xla_cpu.py, applied by importing
elf_jax), so that no test module's import order decides which convolutions a worker runs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _xla  # noqa: E402

_xla.apply_test_opt_level()
import elf_jax  # noqa: E402,F401
