# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates/updates the virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-avx2 test-slow bench install clean

install: $(STAMP)

# pip byte-compiles every file of every wheel (torch: 10 of its 15 s); --no-compile leaves
# that to the first import, which compiles only the modules a run imports, and an empty
# PYTHONDONTWRITEBYTECODE (off) keeps that bytecode for the later processes: pytest's
# workers and the tests' subprocesses (docs/benchmarks_notes.md, "Install time").
PIP := $(PY) -m pip install -q --no-compile
export PYTHONDONTWRITEBYTECODE =

# What the demo needs: the package alone (no torch: it is for tests, interop and benchmarks).
$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e .
	touch $(BASE)

# What the tests need on top: the CPU build of torch from this exact pin, and pytest.
$(STAMP): $(BASE)
	$(PIP) "torch==2.13.0" || echo "torch not installed: interop tests will skip"
	$(PIP) -e ".[test]"
	touch $(STAMP)

demo: $(BASE)
	$(VENV)/bin/elf-jax demo --workdir $(WORKDIR)

# worksteal: a worker that runs out of tests takes queued ones from the other (with the
# longest tests first, tests/conftest.py, both finish together)
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist worksteal $(PYTEST_ARGS)

# The rounding-sensitive tests (marker `numerics`) as an AVX2-only CPU (AMD EPYC) compiles
# them, on a CPU with AVX-512: XLA's instruction-set cap (tests/_xla.py). CI runs it after
# `make test` (.ci/run); on a CPU without AVX-512 there is nothing to add.
test-avx2: $(STAMP)
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then \
	ELF_JAX_TEST_MAX_ISA=AVX2 $(PY) -m pytest -q -m "numerics and not slow" -n 2 --dist worksteal $(PYTEST_ARGS); \
	else echo "make test-avx2: this CPU has no AVX-512; make test already ran as AVX2 compiles"; fi

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) runs .pytest_cache
