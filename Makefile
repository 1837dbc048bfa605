# The README's two commands: `make run` (install + embedded service) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test test-unit lint tools

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build. Then the
# project with every other package at the version CI tested (constraints.txt).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' -c constraints.txt
	touch $@

install: $(VENV)/.installed

# Debian's docker-compose validates docker-compose.yml without an engine (tests/test_containers.py);
# Debian's chromium opens the HTML reports headless (tests/browser.py, driven by playwright).
TOOLS := $(if $(shell command -v docker-compose),,docker-compose) $(if $(shell command -v chromium),,chromium)
tools:
	@if [ -n "$(strip $(TOOLS))" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TOOLS) >/dev/null; fi

run: install
	$(VENV)/bin/modelpress serve --host $(HOST) --port $(PORT)

# Everything, on every core (pytest-xdist; tests/conftest.py keeps each xdist worker's servers,
# databases and Redis keys apart). Tiers: -m unit (no server, no subprocess: <= 60 s),
# integration (real PostgreSQL/Redis/Celery/API processes), e2e (whole flows through the CLI,
# a browser or the images), slow (a test over ~20 s).
test: install tools
	$(PY) -m pytest -q -n auto --dist loadgroup --no-loadscope-reorder

test-unit: install
	$(PY) -m pytest -q -m unit -n auto

# ruff (lint and format), mypy (strict on core and the SDK), the import contracts (.importlinter).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core modelpress
	$(VENV)/bin/lint-imports
