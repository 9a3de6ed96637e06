# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA := scripts/kafka-local
DURATION ?= 0
SHOW ?= incidents

.PHONY: venv lint test test-tools unit integration demo bench eval-nab kafka-start kafka-stop clean

# Reinstalled only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) (3.11+) is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The integration tests start the local Kafka themselves (tests/conftest.py) unless
# KAFKA_BOOTSTRAP_SERVERS names one, and stop it again if they started it. Prometheus,
# promtool and docker-compose come from Debian's packages (installed once if missing).
test: lint test-tools
	$(BIN)/pytest

test-tools:
	scripts/install-test-tools

unit: venv
	$(BIN)/pytest -m "not integration"

integration: venv test-tools
	$(BIN)/pytest -m integration

demo: venv
	$(BIN)/python scripts/demo.py --duration $(DURATION) $(if $(filter anomalies,$(SHOW)),--show-anomalies)

bench: venv
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run

# NAB through the detector (producer_sim/nab.py): MODE=offline (its pure parts, about
# 4 min, mostly NAB's scorer), live (the service on the local Kafka, events paced at
# RATE/s) or backlog. NAB_DIR is a NAB-layout corpus (the dev subset or a full clone);
# results, pictures and scores.md go to OUT. Service options: ARGS="--seed 1".
NAB_DIR ?= ../shared/nab
MODE ?= offline
OUT ?= nab-out/$(MODE)
RATE ?= 2000
ARGS ?=
eval-nab: venv
	$(BIN)/pip install --quiet -e '.[dev,eval]'
	$(BIN)/python -m producer_sim.nab $(MODE) --nab-dir $(NAB_DIR) --out $(OUT) --rate $(RATE) -- $(ARGS)

kafka-start:
	$(KAFKA) start

kafka-stop:
	$(KAFKA) stop

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info nab-out
