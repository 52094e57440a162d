"""Test-session settings: XLA's optimization level for the tests (tests/_xla.py), set
before any test imports jax."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _xla  # noqa: E402

_xla.apply_test_opt_level()
