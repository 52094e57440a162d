# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates/updates the virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench install clean

install: $(STAMP)

# What the demo needs: the package alone (no torch: it is for tests, interop and benchmarks).
$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(BASE)

# What the tests need on top: the CPU build of torch from this exact pin, and pytest.
$(STAMP): $(BASE)
	$(PY) -m pip install -q "torch==2.13.0" || echo "torch not installed: interop tests will skip"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(BASE)
	$(VENV)/bin/elf-jax demo --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) runs .pytest_cache
