# The two commands a new user needs:  make demo  and  make test.
# Each creates .venv when missing and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test check lint format typecheck imports docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs are keyed on pyproject.toml: edit it and the next make re-installs.
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[server,agent]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/edgefleet demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(MAKE) --no-print-directory check
	$(BIN)/python -m pytest

check: lint typecheck imports

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

imports: $(VENV)/.installed-dev
	$(BIN)/lint-imports

docs: $(VENV)/.installed-dev
	$(BIN)/python docs/generate_protocol.py > docs/protocol.md

# Every bench/*.py in its own process, one table in bench/RESULTS.md;
# BENCH_ARGS=--quick runs each one's quick mode (what CI proves still works).
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
