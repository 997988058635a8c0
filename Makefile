# Set-up is part of every target: a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all test-mergekit demo bench bench-smollm2 bench-scale clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this machine serves its CPU build from a local file,
	# and nothing after it may pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

# mergekit's own test suite (from its sdist on PyPI) with this package installed
test-mergekit: $(STAMP)
	$(PY) tests/mergekit_suite/run_suite.py

demo: $(STAMP)
	$(PY) -m mergekit_com.demo

bench: $(STAMP)
	$(PY) -m mergekit_com.bench --preset tiny

bench-smollm2: $(STAMP)
	$(PY) -m mergekit_com.bench --preset smollm2 --out bench_out/smollm2

bench-scale: $(STAMP)
	$(PY) -m mergekit_com.bench scale

clean:
	rm -rf demo_out bench_out .pytest_cache .mergekit-suite
