# The two commands of the README:
#   make run    set up a virtualenv and run the whole pipeline (dvc exp run) on params.yaml's default
#   make test   install what the tests need and run them
#   make report an HTML page of the current (or compared) experiments' plots, metrics and answers
#   make gguf-tools  llama.cpp's converter in its own environment, for export.formats: gguf
#   make launcher    SkyPilot in its own environment (SKY_VENV), for the sky/ YAMLs
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip picks the torch build: on a CPU-only Linux laptop `make run PIP_EXTRA="--extra-index-url
# https://download.pytorch.org/whl/cpu"` takes the small CPU wheel instead of the CUDA one.
PIP_EXTRA ?=
PYTEST_ARGS ?=
GGUF_VENV ?= .venv-gguf
SKY_VENV ?= .venv-sky
# The SkyPilot CLI that skytune.face.cloud's tools run.
export SKY := $(abspath $(SKY_VENV))/bin/sky
# A path from params.yaml `paths:`, where every path is written once: $(call param_path,merged_dir)
param_path = $(shell sed -n 's/^  $(1): *\([^ #]*\).*/\1/p' params.yaml)
SKY_EXTRAS ?=

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export SKYPILOT_DISABLE_USAGE_COLLECTION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv-path run install install-test test show report merged gguf-tools launcher validate-sky serve publish-model preflight launch sweep sweep-pull


$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The pins: requirements.txt here, in CI and on CPU nodes; where nvidia-smi lists a GPU, requirements-node.txt (the
# same pipeline with vLLM). An environment built from one set is not rebuilt from the other: a new VENV is.
REQUIREMENTS ?= $(if $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),requirements-node.txt,requirements.txt)
$(VENV)/.installed: $(REQUIREMENTS) requirements-common.txt $(call param_path,lm_eval_pin) requirements-models.txt \
		pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(PIP_EXTRA) -r $(REQUIREMENTS)
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

venv-path:  # for sky/node.sh
	@echo $(VENV)

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed $(GGUF_VENV)/.installed $(SKY_VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

# llama.cpp's converter for `export.formats: [..., gguf]`, in its own environment. The export stage finds it through
# LLAMA_CPP_DIR and LLAMA_CPP_PYTHON, which this Makefile sets once it is built. The same sdist carries real
# tokenizers of 17 model families (models/ggml-vocab-*.gguf, vocabulary only), which the tests use.
LLAMA_CPP_SDIST := llama-cpp-python==0.3.16
$(GGUF_VENV)/.installed: requirements-gguf.txt
	$(PYTHON) -m venv $(GGUF_VENV)
	$(GGUF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GGUF_VENV)/bin/pip install --quiet $(PIP_EXTRA) -r requirements-gguf.txt
	rm -rf $(GGUF_VENV)/src && mkdir -p $(GGUF_VENV)/src
	$(GGUF_VENV)/bin/pip download --quiet --no-deps --no-binary :all: -d $(GGUF_VENV)/src $(LLAMA_CPP_SDIST)
	tar xzf $(GGUF_VENV)/src/*.tar.gz -C $(GGUF_VENV)/src --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/gguf-py/*' \
		'*/vendor/llama.cpp/models/ggml-vocab-*.gguf'
	rm $(GGUF_VENV)/src/*.tar.gz
	$(GGUF_VENV)/bin/pip install --quiet --no-deps $(GGUF_VENV)/src/gguf-py
	touch $@

gguf-tools: $(GGUF_VENV)/.installed

# SkyPilot, for `sky jobs launch sky/train.yaml` from this machine, in its own environment (see
# requirements-launcher.txt). Then: $(SKY_VENV)/bin/sky check
$(SKY_VENV)/.installed: requirements-launcher.txt
	$(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SKY_VENV)/bin/pip install --quiet -r requirements-launcher.txt $(if $(SKY_EXTRAS),"skypilot[$(SKY_EXTRAS)]==0.14.1")
	touch $@

launcher: $(SKY_VENV)/.installed
	$(if $(SKY_EXTRAS),$(SKY_VENV)/bin/pip install --quiet "skypilot[$(SKY_EXTRAS)]==0.14.1")
	@echo "SkyPilot installed: $(abspath $(SKY_VENV))/bin/sky  (next: $(SKY_VENV)/bin/sky check)"

# Before a cloud run: params, SkyPilot and `sky check`, the DVC bucket with the AWS_* credentials, the base model with
# HF_TOKEN, the git remote. Seconds, and no money spent.
preflight: install $(SKY_VENV)/.installed
	$(BIN)/python -m skytune.face.cloud.preflight

# One managed spot job (sky/train.yaml) at the pushed HEAD; the secrets the YAML names that are set here go along:
#   make launch OVERRIDES="train.lora_r=16" [EXP=name] [YAML=sky/train-multinode.yaml] [SKY_ARGS="--env K=V"]
OVERRIDES ?=
EXP ?=
YAML ?=
SKY_ARGS ?=
launch: install $(SKY_VENV)/.installed
	$(BIN)/python -m skytune.face.cloud.jobs launch --overrides "$(OVERRIDES)" $(if $(YAML),--yaml $(YAML)) $(if $(EXP),--name $(EXP)) -- $(SKY_ARGS)

# A grid fanned out to parallel managed jobs, one DVC experiment each; then pulled and compared:
#   make sweep NAME=rank GRID="train.lora_r=4,8,16,32" [SKY_ARGS=...]
#   make sweep-pull NAME=rank
NAME ?= sweep
GRID ?= train.lora_r=4,8,16,32
sweep: install $(SKY_VENV)/.installed
	$(BIN)/python -m skytune.face.cloud.sweep launch $(NAME) $(GRID) -- $(SKY_ARGS)

sweep-pull: install
	$(BIN)/python -m skytune.face.cloud.sweep pull $(NAME)

# The exported model to the bucket sky/serve.yaml serves from (AWS_* credentials; AWS_ENDPOINT_URL for OCI/MinIO):
#   make publish-model MODEL_URL=s3://<bucket>/<experiment>/merged
MODEL_URL ?=
publish-model: install
	$(BIN)/python -m skytune.face.cloud.buckets publish $(MODEL_URL) --source $(SERVE_MODEL)

# Every sky/*.yaml through SkyPilot's own parser, offline.
validate-sky: $(SKY_VENV)/.installed
	$(SKY_VENV)/bin/python sky/validate.py sky/*.yaml

ifneq ($(wildcard $(GGUF_VENV)/.installed),)
export LLAMA_CPP_DIR ?= $(abspath $(GGUF_VENV)/src)
export LLAMA_CPP_PYTHON ?= $(abspath $(GGUF_VENV)/bin/python)
endif

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/dvc exp run
	@$(MAKE) --no-print-directory show

show:
	@$(BIN)/python -m skytune.face.cli summary

# The merged model of the experiment in the workspace (after `dvc exp apply <exp>`), rebuilt from the base and the
# adapter: DVC does not cache it, to keep experiments small. It comes out byte-identical to the one the experiment
# built (dvc.lock records its hash: `dvc status` stays clean).
merged: install
	$(BIN)/dvc repro --pull merge_adapters

# The exported model behind an OpenAI-compatible endpoint (http://localhost:$(SERVE_PORT)/v1): vLLM where it is
# installed (a GPU node), else `transformers serve` on the CPU. Clients ask for model "$(SERVE_NAME)" (for
# transformers serve, which names a model by its path, .serve/$(SERVE_NAME) links to the model).
SERVE_MODEL ?= $(call param_path,merged_dir)
SERVE_PORT ?= 8000
SERVE_NAME ?= skytune
serve: install
	@mkdir -p "$${HF_HUB_CACHE:-$$HOME/.cache/huggingface/hub}"
	@if command -v vllm >/dev/null 2>&1; then \
		exec vllm serve $(SERVE_MODEL) --served-model-name $(SERVE_NAME) --port $(SERVE_PORT); \
	else \
		mkdir -p .serve && ln -sfn "$(abspath $(SERVE_MODEL))" .serve/$(SERVE_NAME) && cd .serve && \
		exec $(abspath $(BIN))/transformers serve $(SERVE_NAME) --host 127.0.0.1 --port $(SERVE_PORT); \
	fi

# One HTML page (report/index.html): plots, metrics and side-by-side answers of the workspace, or of the
# experiments/commits in REVS compared:  make report REVS="exp-a exp-b"
REVS ?=
report: install
	$(BIN)/python -m skytune.face.report $(REVS)

# The environments it builds are passed on explicitly: the conditional export below is decided when make reads
# this file, before a fresh clone has built them.
test: install-test
	LLAMA_CPP_DIR=$(abspath $(GGUF_VENV)/src) LLAMA_CPP_PYTHON=$(abspath $(GGUF_VENV)/bin/python) \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

