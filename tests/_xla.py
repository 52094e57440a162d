"""The XLA settings of the test session (applied by conftest.py): compile fast.

On the tests' tiny shapes compiling is most of the time, and three XLA:CPU settings cut it
(``pytest -n 2 tests/test_train.py tests/test_evaluate.py`` on the project's 2-core Intel
machine, 2026-12-02; docs/benchmarks_notes.md, "The test suite's time"):

- backend optimization level 0, LLVM without its optimizations: 86 -> 58 s;
- XLA:CPU's classic elemental emitters instead of its MLIR fusion emitters, which build an
  MLIR pipeline per fused kernel: 43 -> 25 s on top of level 0;
- LLVM code generation in one piece, not split over threads that two test workers on two
  cores only contend for: 38 -> 36 s with tests/test_models.py added (two A/B pairs).

They change how fast the generated code runs, not what it computes, but may round
differently, as another CPU does: no test compares two different programs bit for bit
(``_float32.py``). Child processes inherit the settings through the environment (the
memory-cap child takes XLA's defaults, ``default_codegen_flags``: its claim is about the
memory of what users run); the demo, the CLI and the benchmarks keep XLA's defaults.
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


#: ``ELF_JAX_TEST_MAX_ISA``'s values: XLA:CPU's instruction-set caps (``--xla_cpu_max_isa``).
MAX_ISAS = ("SSE4_2", "AVX", "AVX2", "AVX512")


def apply_max_isa() -> str:
    """``ELF_JAX_TEST_MAX_ISA=AVX2`` (``make test-avx2``): XLA:CPU generates no instruction
    newer than AVX2, as it compiles on an AVX2-only CPU (AMD EPYC), so that a developer on
    an AVX-512 machine sees the rounding of the other machines. It reaches XLA's generated
    code (fusions, reductions, its own convolutions), not the kernels a library picks at run
    time by the CPU it finds. Returns the cap ('' for none)."""
    isa = os.environ.get("ELF_JAX_TEST_MAX_ISA", "")
    if isa and isa not in MAX_ISAS:
        raise ValueError(f"ELF_JAX_TEST_MAX_ISA={isa!r}: use one of {', '.join(MAX_ISAS)}")
    if isa:
        add_flag("--xla_cpu_max_isa", isa)
    return isa


def default_codegen_flags() -> str:
    """This process's ``XLA_FLAGS`` without :data:`FAST_COMPILE`'s settings: XLA's default
    code generation, for a child process."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if f.split("=")[0] not in FAST_COMPILE)
