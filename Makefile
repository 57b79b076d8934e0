# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use and install, with pinned dependencies, the library
# (the repository root, package ghoststep) and the experiments (experiments/, package
# ghoststep_lab, which provides `ghoststep run|list|report|demo`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,all
LAB_EXTRAS ?= baselines,text
LAB := experiments

.PHONY: demo test lint docs clean

$(STAMP): pyproject.toml $(LAB)/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]" -e "./$(LAB)[$(LAB_EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ghoststep run spike --preset quick

# `make test` runs everything: the library's tests (tests/), the experiments' tests
# (experiments/tests/), each including those marked slow, and the docstring examples of
# both packages. For a quick local loop skip the slow ones (over ~5 s each):
#   .venv/bin/pytest -n 2 -m "not slow" tests
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks examples $(LAB)
	$(BIN)/ruff check --select C901 --config 'lint.mccabe.max-complexity=12' src/ghoststep
	$(BIN)/python -m pytest -q -n 2 tests
	$(BIN)/python -m pytest -q -n 2 $(LAB)/tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --doctest-modules src/ghoststep $(LAB)/src/ghoststep_lab

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks examples $(LAB)

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info $(LAB)/build $(LAB)/src/*.egg-info
