# Two commands do all set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit integration bench package clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

## run: set up, then harvest the built-in simulator on this machine (`harvest local`)
run: $(STAMP)
	$(BIN)/harvest local $(ARGS)

## test: set up, then lint, type-check and run every test (unit and integration)
test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

## bench: throughput benchmarks against the simulator (not part of CI)
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

## package: build the Lambda zip (build/lambda.zip)
package: $(STAMP)
	$(BIN)/python scripts/package.py

clean:
	rm -rf $(VENV) build harvest-out bench-out .pytest_cache .mypy_cache .ruff_cache
