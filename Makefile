# The README's two commands: `make run` (installs the runtime, starts the embedded service) and
# `make test` (installs everything, runs the test suite). CI (.ci/run): make install, lint, test.
SHELL := /bin/bash
VENV ?= .venv
# The interpreter .venv is made with (3.11 or newer): `make run PYTHON=python3.12`.
PYTHON ?= python3
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

# Which torch build goes into $(VENV): `cpu` where no NVIDIA driver answers (`nvidia-smi -L`),
# else `cuda`. Chosen once per make run; `make run TORCH=cuda` (or cpu) overrides it.
#   cpu:  2.13.0+cpu, from a wheel pip already finds without an index (its find-links: CI's machine
#         has one on disk), else from PyTorch's CPU index (about 200 MB instead of several GB).
#   cuda: PyPI's torch==2.13.0, which on Linux x86_64 is the CUDA build (with its nvidia-* wheels);
#         TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ picks another CUDA build.
# A bare `torch` requirement would pull the CUDA build everywhere, so torch goes in first, pinned.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
ifeq ($(origin TORCH),undefined)
TORCH := $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU '),cuda,cpu)
endif
PIP := $(PY) -m pip install -q
ifeq ($(TORCH),cpu)
TORCH_INSTALL = $(PIP) --no-index --no-deps 'torch==$(TORCH_VERSION)+cpu' 2>/dev/null \
  || $(PIP) 'torch==$(TORCH_VERSION)' --index-url $(TORCH_CPU_INDEX)
else ifeq ($(TORCH),cuda)
TORCH_INSTALL = $(PIP) 'torch==$(TORCH_VERSION)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
else
$(error TORCH must be cpu or cuda, not "$(TORCH)")
endif
# Whether $(VENV) already has torch $(TORCH_VERSION) of that build (a switch replaces it: pip would
# take an installed 2.13.0+cpu for 2.13.0 and keep it).
HAS_TORCH = $(PY) -c 'import sys, torch; v = torch.__version__.split("+")[0]; \
  sys.exit(v != "$(TORCH_VERSION)" or (torch.version.cuda is None) != ("$(TORCH)" == "cpu"))' 2>/dev/null
TORCH_STAMP := $(VENV)/.torch-$(TORCH)
# The runtime (`make run`): the server and worker extras, no test tooling. Everything (`make
# install`, `make test`, `make lint`): the dev extra, which holds the runtime too.
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed

.PHONY: install runtime run test test-unit lint tools

$(TORCH_STAMP):
	@test -x $(PY) || { echo "make: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@rm -f $(VENV)/.torch-*
	@$(HAS_TORCH) || { echo "make: installing torch $(TORCH_VERSION), the $(TORCH) build (TORCH=cpu or cuda picks it)"; \
	  $(PY) -m pip uninstall -q -y torch 2>/dev/null; $(TORCH_INSTALL); }
	@touch $@

# Every other package at the version CI tested (constraints.txt). A dev install already holds the
# runtime: `make run` after `make install` installs nothing more.
$(RUNTIME_STAMP): pyproject.toml constraints.txt $(TORCH_STAMP)
	@if [ ! $(DEV_STAMP) -nt $(TORCH_STAMP) ] || [ pyproject.toml -nt $(DEV_STAMP) ] \
	  || [ constraints.txt -nt $(DEV_STAMP) ]; then \
	  echo "make: installing modelpress with its server and workers (.[worker]) into $(VENV): a few minutes"; \
	  $(PIP) -e '.[worker]' -c constraints.txt; fi
	@touch $@

$(DEV_STAMP): pyproject.toml constraints.txt $(TORCH_STAMP)
	@echo "make: installing modelpress with everything, test tools included (.[dev]) into $(VENV)"
	$(PIP) -e '.[dev]' -c constraints.txt
	@touch $@

runtime: $(RUNTIME_STAMP)
install: $(DEV_STAMP)

# Debian's docker-compose validates docker-compose.yml without an engine (tests/test_containers.py);
# Debian's chromium opens the HTML reports headless (tests/browser.py, driven by playwright).
TOOLS := $(if $(shell command -v docker-compose),,docker-compose) $(if $(shell command -v chromium),,chromium)
tools:
	@if [ -n "$(strip $(TOOLS))" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TOOLS) >/dev/null; fi

# The README's quickstart runs in a second terminal: the line printed first puts `modelpress`,
# `python` and `hf` of $(VENV) on its PATH and says where the service is.
run: runtime
	@echo "make: starting the service. In another terminal, in this folder:"
	@echo '  export PATH="$$PWD/$(VENV)/bin:$$PATH" MODELPRESS_URL=http://$(HOST):$(PORT) MODELPRESS_API_KEY=$$(cat var/api-key)'
	@$(VENV)/bin/modelpress serve --host $(HOST) --port $(PORT)

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
