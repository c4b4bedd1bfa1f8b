#!/usr/bin/env bash
# What a SkyPilot node runs (sky/*.yaml call this; the local-node test runs it the same way):
#   bash sky/node.sh setup         the pipeline's environment from the pinned requirements (make install)
#   bash sky/node.sh setup-serve   vLLM's environment (CUDA only)
#   bash sky/node.sh run           the DVC experiment: dvc exp run with $OVERRIDES, then dvc exp push origin
# Environment: OVERRIDES ("train.lora_r=16 train.epochs=2"), EXP_NAME (default: from SKYPILOT_TASK_ID, which stays
# the same across a managed job's recoveries, so a restarted job resumes into the same experiment), GIT_REMOTE and
# GIT_TOKEN (where the experiment's git refs go), AWS_ENDPOINT_URL (the DVC remote's S3-compatible endpoint),
# SKYTUNE_CHECKPOINT_DIR (default: /checkpoints/<experiment>, the bucket mount), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
# boto3 >= 1.36 sends checksums that S3-compatible stores (OCI, rclone, older MinIO) refuse; AWS accepts either way.
export AWS_REQUEST_CHECKSUM_CALCULATION=${AWS_REQUEST_CHECKSUM_CALCULATION:-when_required}
export AWS_RESPONSE_CHECKSUM_VALIDATION=${AWS_RESPONSE_CHECKSUM_VALIDATION:-when_required}

experiment_name() {
  local raw=${EXP_NAME:-${SKYPILOT_TASK_ID:-local}}
  raw=${raw//[^A-Za-z0-9_-]/-}            # a git ref component: DVC stores experiments as refs
  echo "${raw:0:80}"
}

case "${1:-}" in
  setup)
    make install VENV="$VENV"
    ;;
  setup-serve)
    python3 -m venv .venv-serve
    .venv-serve/bin/pip install --quiet "vllm~=0.32.0"   # pins torch 2.13.0, as the pipeline does
    ;;
  run)
    if [[ $VENV == /* ]]; then export PATH="$VENV/bin:$PATH"; else export PATH="$PWD/$VENV/bin:$PATH"; fi
    name=$(experiment_name)
    export SKYTUNE_CHECKPOINT_DIR=${SKYTUNE_CHECKPOINT_DIR:-/checkpoints/$name}
    if [ -n "${GIT_REMOTE:-}" ]; then
      url=$GIT_REMOTE
      if [ -n "${GIT_TOKEN:-}" ] && [[ $url == https://* ]]; then url="https://x-access-token:${GIT_TOKEN}@${url#https://}"; fi
      git remote remove origin 2>/dev/null || true
      git remote add origin "$url"
    fi
    if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
      dvc remote modify --local "$(dvc remote default)" endpointurl "$AWS_ENDPOINT_URL"
    fi
    sets=()
    for kv in ${OVERRIDES:-}; do sets+=(-S "$kv"); done
    rank=${SKYPILOT_NODE_RANK:-0}
    if [ "$rank" != 0 ]; then
      # A worker node: the same data stages (deterministic) with the same overrides, then the train stage's
      # workers, which join the head node's run through skytune.launch (SKYPILOT_* variables).
      # (dvc exp run in the workspace leaves params.yaml and the data as the head node has them; never pushed)
      dvc exp run -n "$name-node$rank" "${sets[@]}" merge_data
      exec python -m skytune.launch skytune.stages.train
    fi
    if dvc exp list --name-only | grep -qx "$name"; then
      echo "experiment $name already ran (a recovery after it finished): pushing it"
    else
      # exit 75 when training was preempted (checkpoint saved): SkyPilot's recover_on_exit_codes relaunches.
      # A SIGTERM to this script is passed on and waited for, so its exit code is the run's (75), not bash's 143.
      python -m skytune.cli preemptible -- dvc exp run -n "$name" "${sets[@]}" &
      child=$!
      trap 'kill -TERM "$child" 2>/dev/null' TERM
      status=0
      wait "$child" || status=$?
      while kill -0 "$child" 2>/dev/null; do wait "$child" || status=$?; done  # wait again after a trapped signal
      trap - TERM
      [ "$status" = 0 ] || exit "$status"
    fi
    dvc exp push origin "$name"
    echo "pushed experiment $name: dvc exp pull origin $name && dvc exp show"
    ;;
  *)
    echo "usage: bash sky/node.sh setup|setup-serve|run" >&2
    exit 2
    ;;
esac
