# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install the package with pinned dependencies on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,all

.PHONY: demo test lint docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ghoststep run spike --preset quick

# `make test` runs everything: the tests (including those marked slow) and the docstring
# examples of the package. For a quick local loop skip the slow ones (over ~5 s each):
#   .venv/bin/pytest -n 2 -m "not slow" tests
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/ruff check --select C901 --config 'lint.mccabe.max-complexity=12' src/ghoststep
	$(BIN)/python -m pytest -q -n 2 tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --doctest-modules src/ghoststep

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
