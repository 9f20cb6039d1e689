# Every target bootstraps .venv from nothing; requirements.lock pins every version.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit browser demo bench protos clean

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

# The browser tests (tests/test_ui_browser.py) drive Debian's chromium through
# Playwright (its own browser download is not reachable). Installed here when
# missing and we are root with apt; otherwise those tests skip saying why
# (and fail under CI=true, where they must run).
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x "$(CHROMIUM)" ] && [ -z "$$EGRESS_AUTHZ_CHROMIUM" ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -q chromium >/dev/null; } \
	  || echo "could not install chromium: the browser tests will skip (fail under CI=true)"; \
	fi

unit: venv browser
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
