from elf_jax import xla_cpu as _xla_cpu
from elf_jax.version import __version__  # noqa: F401

_xla_cpu.apply_defaults()  # before jax's CPU backend starts (elf_jax/xla_cpu.py)
