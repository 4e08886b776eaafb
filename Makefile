# Two commands on a fresh clone: `make demo` and `make test`.
# torch is pinned here so that pip takes the CPU build on disk instead of
# downloading several GB of CUDA packages.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/velcro demo

# Every bench with --quick: a short run that proves it works (a minute or two each; files go to
# runs/bench/). The full runs and their figures: benchmarks/README.md and RESULTS.md.
bench: $(STAMP)
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev,bench]"
	for b in benchmarks/bench_*.py; do echo "== $$b --quick"; $(PY) $$b --quick || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
