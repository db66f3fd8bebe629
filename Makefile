# Two commands do all set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint checkov unit bench package clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

## run: set up, then harvest the built-in simulator on this machine (`harvest local`)
run: $(STAMP)
	$(BIN)/harvest local $(ARGS)

## test: set up, then lint, type-check, scan terraform/ and run every test (unit and integration);
## the Terraform apply module runs on a second worker beside the rest (tests/conftest.py)
test: lint checkov
	$(BIN)/pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# checkov pins many packages of its own: it gets a venv of its own.
CHECKOV := .venv-checkov/.installed
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q --upgrade pip
	.venv-checkov/bin/pip install -q 'checkov>=3.2'
	touch $(CHECKOV)

checkov: $(CHECKOV)
	.venv-checkov/bin/checkov --config-file .checkov.yaml

unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

## bench: throughput benchmarks against the simulator (not part of CI)
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

## package: build the Lambda zip and the profile.json Terraform reads (build/); PROFILE=name or path/to/vendor.toml
PROFILE ?= hermes-v1
package: $(STAMP)
	$(BIN)/python scripts/package.py --profile $(PROFILE)

clean:
	rm -rf $(VENV) .venv-checkov build harvest-out bench-out .pytest_cache .mypy_cache .ruff_cache
