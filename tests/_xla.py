"""The XLA settings of the test session (applied by conftest.py): compile fast.

On the tests' tiny shapes compiling is most of the time, and three XLA:CPU settings cut it
(``pytest -n 2 tests/test_train.py tests/test_evaluate.py`` on the project's 2-core Intel
machine, 2026-12-02; BENCHMARKS.md, "The test suite's time"):

- backend optimization level 0, LLVM without its optimizations: 86 -> 58 s;
- XLA:CPU's classic elemental emitters instead of its MLIR fusion emitters, which build an
  MLIR pipeline per fused kernel: 43 -> 25 s on top of level 0;
- LLVM code generation in one piece, not split over threads that two test workers on two
  cores only contend for: 38 -> 36 s with tests/test_models.py added (two A/B pairs).

They change how fast the generated code runs, not what it computes, but may round
differently: a test that compares two different programs bit for bit runs in a child at
XLA's default code generation (``default_codegen_flags``). Child processes inherit the
settings through the environment; the demo, the CLI and the benchmarks keep XLA's defaults.
``ELF_JAX_TEST_FAST_COMPILE=0 make test`` runs the tests with XLA's defaults.
"""

import os

from elf_jax.xla_cpu import add_flag, env_switch

FAST_COMPILE = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
    "--xla_cpu_parallel_codegen_split_count": "1",
}


def apply_fast_compile() -> None:
    """Adds :data:`FAST_COMPILE` to ``XLA_FLAGS`` (each unless already set there)."""
    if env_switch("ELF_JAX_TEST_FAST_COMPILE", "compile fast", "XLA's default code generation"):
        for name, value in FAST_COMPILE.items():
            add_flag(name, value)


def default_codegen_flags() -> str:
    """This process's ``XLA_FLAGS`` without :data:`FAST_COMPILE`'s settings: XLA's default
    code generation, for a child process."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if f.split("=")[0] not in FAST_COMPILE)


def fast_compile_on() -> bool:
    """Whether this process compiles with :data:`FAST_COMPILE` (as ``XLA_FLAGS`` says)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return all(f"{name}={value}" in flags for name, value in FAST_COMPILE.items())


def run_at_default_codegen(nodeid: str, rootdir: str) -> None:
    """Runs the test ``nodeid`` in a child pytest at XLA's default code generation; raises
    ``AssertionError`` with the child's report if it does not pass."""
    import subprocess
    import sys

    env = dict(os.environ, ELF_JAX_TEST_FAST_COMPILE="0", XLA_FLAGS=default_codegen_flags())
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid],
                           cwd=rootdir, env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, f"at XLA's default code generation:\n{child.stdout[-6000:]}"
