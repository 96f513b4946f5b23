# Tuneline — every target has a `##` help line; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install test test-slow demo bench faults schemas docs api-docs screenshots up down status clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: the CPU wheel on this machine, no CUDA downloads.
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) ## create .venv and install the project with its test tools

test: install ## run the test suite (unit, contract, connected, e2e) against servers the tests start
	$(PY) -m pytest

test-slow: install ## the slower suites (real all-MiniLM-L6-v2 training)
	$(PY) -m pytest -m slow

demo: install ## start the embedded stack, run the skeleton on a generated dataset, print the timeline
	$(VENV)/bin/tuneline up
	$(VENV)/bin/tuneline sample-data .tuneline/sample.jsonl
	$(VENV)/bin/tuneline run --locator jsonl:.tuneline/sample.jsonl --target support-tickets
	@echo; echo "the stack is still up: try 'tuneline status', 'tuneline events --run RUN', 'make down'"

bench: install ## benchmarks: print a table, write bench/results/*.json
	$(PY) -m bench.recorder
	$(PY) -m bench.ingest
	$(PY) -m bench.trainer
	$(PY) -m bench.nlbse
	$(PY) -m bench.export
	$(PY) -m bench.gate
	$(PY) -m bench.evaluation
	$(PY) -m bench.triage
	$(PY) -m bench.registry
	$(PY) -m bench.api
	$(PY) -m bench.replay

faults: install ## the fault suite (20+ runs on a real stack under kills, outages, poison); bench/results/faults.json
	nice -n 5 $(PY) -m bench.faults $(FAULTS_ARGS)

schemas: install ## write JSON Schema snapshots for new contract versions, and infra/nats/auth.conf (who may publish what)
	$(PY) -m contracts.snapshots
	$(PY) -m services.common.nats_auth

docs: install ## regenerate docs/reason-codes.md from the taxonomy
	$(PY) -m contracts.reason_codes > docs/reason-codes.md

api-docs: install ## regenerate docs/openapi.json and docs/asyncapi.json from the code
	$(PY) -m services.api.docs

screenshots: install ## drive the web page in headless Chromium against a real stack; writes docs/screenshots/*.png
	TUNELINE_SCREENSHOTS=1 $(PY) -m pytest -m e2e tests/e2e/test_web.py -p no:randomly

up: install ## start the embedded stack (or use NATS_URL / DATABASE_URL)
	$(VENV)/bin/tuneline up

down: ## stop the stack started by `make up` / `make demo`
	$(VENV)/bin/tuneline down

status: ## services, stream, recorder lag, projection
	$(VENV)/bin/tuneline status

clean: down ## stop the stack and delete .tuneline
	rm -rf .tuneline
