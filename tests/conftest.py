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

# The longest tests (subprocesses: the CLI, simulated devices, SIGKILL, the memory cap), started
# first so that two workers finish together: with one of them last, the other worker idled
# for its whole length. Order only; each test is independent of the others.
LONGEST_FIRST = (
    "test_memory_cap.py::test_streamed_pipeline_runs_under_a_cap",
    "test_pipeline.py::test_all_stages_then_report_again",
    "test_multihost.py::", "test_parallel_e2e.py::", "test_parallel.py::test_equivalence",
    "test_pipeline.py::test_stages_refuse", "test_pipeline.py::test_an_imported_sets",
    "test_sweep.py::test_the_sweep_command", "test_resume.py::", "test_stream_engine.py::test_teacher_killed",
    "test_reference_settings.py::test_cpu_sized", "test_distill.py::test_cpu_unrolled",
    "test_data_tfds_any.py::test_elf_jax_all", "test_data_folder.py::test_the_pipeline",
    "test_parallel.py::test_adapter_and_kd", "test_pipeline.py::test_imports_are_checked",
    "test_pipeline.py::test_the_references", "test_validation.py::test_the_best_set",
    "test_validation.py::test_each_architecture", "test_validation.py::test_a_teacher",
)


def _rank(item) -> int:
    nodeid = item.nodeid.split("/")[-1]
    return next((i for i, p in enumerate(LONGEST_FIRST) if nodeid.startswith(p)),
                len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)  # stable: the rest keep their order
