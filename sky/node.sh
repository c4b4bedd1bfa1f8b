#!/usr/bin/env bash
# What a SkyPilot node runs (sky/*.yaml call this; the local-node test runs it the same way):
#   bash sky/node.sh setup         the pipeline's environment (requirements.txt, as everywhere) and, on a GPU,
#                                  vLLM's beside it (requirements-vllm.txt), which the stages' vllm engine (what
#                                  auto picks on a GPU) starts its server from: make node-env
#   bash sky/node.sh setup-serve   vLLM's environment alone (make vllm-env)
#   bash sky/node.sh serve         make serve on MODEL_DIR, listening on 0.0.0.0:8000 (sky/serve.yaml)
#   bash sky/node.sh run           the DVC experiment: dvc exp run --pull --allow-missing with $OVERRIDES (the data
#                                  stages come from the remote's run-cache), then dvc exp push origin
# Environment: OVERRIDES ("train.lora_r=16 train.epochs=2", shell-quoted: "'identity.creator=The Lab'"),
# EXP_NAME (default: from SKYPILOT_TASK_ID, which stays the same across a managed job's recoveries, so a restarted
# job resumes into the same experiment), GIT_REMOTE (the https URL the experiment is pushed to, with no token in it;
# default: GIT_URL, the repository SkyPilot cloned the workdir from; an SSH URL would make SkyPilot ship your SSH
# key), GIT_TOKEN (secret: read by sky/git-askpass.sh when git or DVC asks, never written to disk), AWS_ENDPOINT_URL
# and DVC_REMOTE_REGION (the DVC remote's S3-compatible endpoint and region, written to .dvc/config.local),
# SKYTUNE_CHECKPOINT_DIR (default: $CHECKPOINT_MOUNT/<experiment>, the bucket mount), VENV (default: the Makefile's).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$(make --no-print-directory -s venv-path)}
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
    date +%s > "$(git rev-parse --git-dir 2>/dev/null || echo /tmp)/skytune-node-started"  # this VM's start (the job ledger)
    make node-env VENV="$VENV"
    ;;
  setup-serve)
    make vllm-env   # serving needs none of the pipeline's environment
    ;;
  serve)
    # The model's name for clients (export.adapter_name) and its context (vllm.max_model_len) come from params.yaml.
    exec make --no-print-directory serve SERVE_MODEL="$MODEL_DIR" SERVE_HOST=0.0.0.0 SERVE_PORT=8000
    ;;
  run)
    if [[ $VENV == /* ]]; then export PATH="$VENV/bin:$PATH"; else export PATH="$PWD/$VENV/bin:$PATH"; fi
    if ! git rev-parse --git-dir >/dev/null 2>&1; then
      echo "$0: $PWD is not a git repository, and dvc exp run needs one: give the task a git workdir" \
           "(workdir: {url: \${GIT_REMOTE}, ref: \${GIT_REF}}, as the training YAMLs do)" >&2
      exit 2
    fi
    name=$(experiment_name)
    export SKYTUNE_CHECKPOINT_DIR=${SKYTUNE_CHECKPOINT_DIR:-${CHECKPOINT_MOUNT:?the training YAML sets CHECKPOINT_MOUNT}/$name}
    remote=${GIT_REMOTE:-${GIT_URL:-}}
    if [ -n "$remote" ]; then
      # Token-free: SkyPilot's clone wrote https://<token>@host into origin; the token comes from the askpass.
      git remote set-url origin "$remote" 2>/dev/null || git remote add origin "$remote"
    fi
    if [ -n "${GIT_TOKEN:-}" ]; then export GIT_ASKPASS="$PWD/sky/git-askpass.sh" GIT_TERMINAL_PROMPT=0; fi
    if [ -f "$(git rev-parse --git-dir)/shallow" ]; then git fetch --quiet --unshallow origin; fi  # a branch ref
    if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
      dvc remote modify --local "$(dvc remote default)" endpointurl "$AWS_ENDPOINT_URL"
    fi
    if [ -n "${DVC_REMOTE_REGION:-}" ]; then
      dvc remote modify --local "$(dvc remote default)" region "$DVC_REMOTE_REGION"
    fi
    python -m skytune.face.cloud.overrides >/dev/null || exit 2   # a malformed OVERRIDES stops here, named
    sets=()
    while IFS= read -r -d '' kv; do sets+=(-S "$kv"); done < <(python -m skytune.face.cloud.overrides)
    rank=${SKYPILOT_NODE_RANK:-0}
    pushed=$(dvc exp list origin --rev "$(git rev-parse HEAD)" --name-only) || {
      echo "$0: cannot list the experiments on origin (${remote:-origin}): check GIT_REMOTE" \
           "and the GIT_TOKEN secret" >&2
      exit 3
    }
    if grep -qx "$name" <<<"$pushed"; then
      # A recovery (or a worker of one) after the experiment was pushed: nothing left to do on any node.
      echo "experiment $name is already on origin: nothing to run (dvc exp pull origin $name)"
      exit 0
    fi
    if [ "$rank" != 0 ]; then
      # A worker node: the same data stages (deterministic) with the same overrides, then the train stage's
      # workers, which join the head node's run through skytune.core.processes (SKYPILOT_* variables).
      # (dvc exp run in the workspace leaves params.yaml and the data as the head node has them; never pushed)
      # --pull without --allow-missing: the data stages' outputs must be here (restored, or pulled by the hashes of a
      # committed dvc.lock) before the train workers read them.
      dvc exp run --pull -n "$name-node$rank" "${sets[@]}" merge_data
      exec python -m skytune.core.processes skytune.stages.train
    fi
    # The job ledger (skytune.core.job_ledger): this VM's attempt, when its setup and run started, a heartbeat, and
    # when it finished, beside the checkpoints, so that the job's hours count every attempt and the work lost.
    SKYTUNE_NODE_STARTED=$(cat "$(git rev-parse --git-dir)/skytune-node-started" 2>/dev/null || date +%s)
    export SKYTUNE_NODE_STARTED SKYTUNE_RUN_STARTED=${SKYTUNE_RUN_STARTED:-$(date +%s)}
    export SKYTUNE_ATTEMPT="attempt-$SKYTUNE_NODE_STARTED-$(hostname)"
    python -m skytune.core.job_ledger begin
    beat="$SKYTUNE_CHECKPOINT_DIR/job/$SKYTUNE_ATTEMPT.beat"
    (while :; do date +%s.%N > "$beat.tmp" && mv -f "$beat.tmp" "$beat"; sleep "${SKYTUNE_HEARTBEAT_S:-30}"; done) &
    heartbeat=$!
    trap 'kill "$heartbeat" 2>/dev/null || true' EXIT  # (gone already after a SIGTERM to the group)
    if dvc exp list --name-only | grep -qx "$name"; then
      # Only where the workdir outlives a run (sky launch on a kept cluster); a managed job's recovery is a new VM.
      echo "experiment $name already ran here (a restart after it finished): pushing it"
    else
      # exit 75 when training was preempted (checkpoint saved): SkyPilot's recover_on_exit_codes relaunches.
      # A SIGTERM to this script is passed on and waited for, so its exit code is the run's (75), not bash's 143.
      # --pull --allow-missing: a stage whose inputs match the remote's run-cache is restored, not run (make launch
      # pushed the data stages' outputs; a data stage that still runs warns in the log), and only the inputs the
      # stages that do run need are pulled.
      python -m skytune.face.cli preemptible -- dvc exp run --pull --allow-missing -n "$name" "${sets[@]}" &
      child=$!
      trap 'kill -TERM "$child" 2>/dev/null; signalled=1' TERM
      signalled=0
      status=0
      wait "$child" || status=$?
      # A trapped signal ends `wait` early (status 143): wait again for the run's own code; bash keeps the status
      # of a child it has already reaped, so this holds even when the run ended in between.
      while [ "$signalled" = 1 ]; do signalled=0; status=0; wait "$child" || status=$?; done
      trap - TERM
      [ "$status" = 0 ] || exit "$status"
    fi
    dvc exp push origin "$name"
    python -m skytune.core.job_ledger finish
    echo "pushed experiment $name: dvc exp pull origin $name && dvc exp show"
    ;;
  *)
    echo "usage: bash $0 setup|setup-serve|serve|run" >&2
    exit 2
    ;;
esac
