# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the main job on the embedded default
#   make test   installs everything into .venv and runs the whole test suite (but the `cluster` tests)
#   make test-cluster   the tests that start a Ray of their own: a fake autoscaling cluster, moto S3
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megaray-installed

.PHONY: demo test test-cluster lint install sysdeps bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (3.10+)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Debian packages: espeak-ng renders the embedded speech corpus.
sysdeps:
	@command -v espeak-ng >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng >/dev/null; }

demo: install sysdeps
	$(VENV)/bin/megaray demo

# ruff lint + format check (configured in pyproject.toml); `.ci/run` runs it before the tests
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install sysdeps
	$(PY) -m pytest -q --timeout=900 --durations=30 -m "not cluster"

# A separate pytest process: these start their own Ray (with the S3 environment, or a fake
# autoscaling cluster), which the in-process session cluster of `make test` would stand in for.
test-cluster: install
	$(PY) -m pytest -q --timeout=900 --durations=10 -m cluster

bench: install
	$(PY) benchmarks/gpt_throughput.py --preset debug
	$(PY) benchmarks/ingest_text.py

clean:
	rm -rf $(VENV) runs data mlflow.db mlartifacts .pytest_cache
