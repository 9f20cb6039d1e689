# Every target bootstraps .venv from nothing; requirements.lock pins every version.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit demo bench protos clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

lint: venv
	$(BIN)/ruff check authz tests bench
	$(BIN)/lint-imports --no-cache

typecheck: venv
	$(BIN)/mypy authz

unit: venv
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test: lint typecheck unit

demo: venv
	$(BIN)/egress-authz demo $(ARGS)

bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

protos: venv
	$(BIN)/python -m authz.envoy.protogen

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
