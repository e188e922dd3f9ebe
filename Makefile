# The two commands of the README: `make run` and `make test`. Both work from a fresh clone
# with nothing installed but Python >= 3.11: they create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint typecheck unit integration bench bench-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.dev-installed

run: $(VENV)/.dev-installed
	$(BIN)/hatched-mirror dev

lint: $(VENV)/.test-installed
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

unit: $(VENV)/.test-installed
	$(BIN)/pytest tests/unit

integration: $(VENV)/.test-installed
	$(BIN)/pytest tests/integration

# The benchmark suite (bench/BENCHMARKS.md says what it measures); the smoke run keeps it working.
$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.test-installed $(VENV)/.dev-installed

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run

bench-smoke: $(VENV)/.test-installed
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) .hatched-mirror .mypy_cache .pytest_cache .ruff_cache
