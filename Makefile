# The two commands of the README:
#   make run    set up a virtualenv and run the whole pipeline (dvc exp run) on params.yaml's default
#   make test   install what the tests need and run them
#   make report an HTML page of the current (or compared) experiments' plots, metrics and answers
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip picks the torch build: on a CPU-only Linux laptop `make run PIP_EXTRA="--extra-index-url
# https://download.pytorch.org/whl/cpu"` takes the small CPU wheel instead of the CUDA one.
PIP_EXTRA ?=
PYTEST_ARGS ?=

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export SKYPILOT_DISABLE_USAGE_COLLECTION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run install install-test test show report

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(PIP_EXTRA) -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/dvc exp run
	@$(MAKE) --no-print-directory show

show:
	@$(BIN)/python -m skytune.cli summary

# One HTML page (report/index.html): plots, metrics and side-by-side answers of the workspace, or of the
# experiments/commits in REVS compared:  make report REVS="exp-a exp-b"
REVS ?=
report: install
	$(BIN)/python -m skytune.report $(REVS)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

