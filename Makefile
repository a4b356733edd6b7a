# One entry point for set-up, the local stack, the pipeline, tests and benchmarks.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE ?= .stack/sample.zip
SAMPLE_PRODUCTS ?= 1500
# A new seed gives a new batch (a re-run of the same sample is, by design, a no-op).
SAMPLE_SEED ?= 0
PYTEST_ARGS ?=

.PHONY: system-deps install up down status logs demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

system-deps:  ## system packages (make, Chromium, ssh, rsync) when missing: idempotent, fast when present
	@bash scripts/system_deps.sh

install: system-deps $(STAMP)  ## the system packages and a venv with every pinned dependency

up: install  ## start S3, MLflow, Ray, the dashboard, Serve and the watcher on 127.0.0.1 (idempotent)
	$(PY) -m lib.ops.stack up
	$(PY) -m serve.deploy
	$(PY) -m jobs.watch --ensure

down:  ## stop what `make up` started; data stays in .stack/
	$(PY) -m lib.ops.stack down

status:  ## each service, its PID, memory and URL
	$(PY) -m lib.ops.stack status

logs:  ## last lines of every service log
	$(PY) -m lib.ops.stack logs

demo: up  ## the whole story on a generated sample: pipeline, promotion, a prediction, URLs
	$(PY) -m jobs.make_sample --out $(SAMPLE) --products $(SAMPLE_PRODUCTS) --seed $(SAMPLE_SEED)
	$(PY) -m jobs.demo $(SAMPLE)

test: install  ## the full test suite against a real stack of its own
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install  ## speed/memory benchmarks on a stack of their own (RAKUTEN_REAL_DATA adds the real sample)
	@for script in benchmarks/bench_*.py; do name=$$(basename $$script .py); echo "== $$name"; $(PY) -m benchmarks.$$name || exit 1; done

clean: down
	rm -rf .stack
