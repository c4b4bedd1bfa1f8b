#!/usr/bin/env bash
# The GPU check, one prepared command for a short loan of one H100/H200 (target: 10 minutes from a bare machine that
# reaches PyPI):
#   bash bench/gpu_check.sh            1. a GPU node's two environments, as sky/node.sh setup builds them: the
#                                         pipeline's (requirements.txt, the same pins as everywhere) and vLLM's beside
#                                         it (requirements-vllm.txt), and pytest;
#                                      2. nvidia-smi;
#                                      3. the tests marked gpu (tests/test_gpu.py): the train stage's real 4-bit QLoRA
#                                         with bf16 compute on a 1B-shaped Llama (tokens/s, peak memory, MFU), merged
#                                         and exported; then vLLM on it in bf16: the export stage's train/serve parity,
#                                         the exported adapter served with --enable-lora, lm-eval on both engines;
#                                      4. the figures, to $OUT (the device tool's folder; default bench/gpu_check/).
#   bash bench/gpu_check.sh --dry-run  on a machine without a GPU (CI): step 1's vLLM set through pip's resolver only
#                                      (PyPI's CUDA wheels' metadata, nothing downloaded), step 3 collected, not run.
# Environment: PYTHON (default python3), VENV (default .venv-node; the dry run collects with .venv),
# VLLM_REQUIREMENTS (default requirements-vllm.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash $0 [--dry-run]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/gpu_check}
VENV=${VENV:-.venv-node}
VLLM_REQUIREMENTS=${VLLM_REQUIREMENTS:-requirements-vllm.txt}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
start=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

# 1. The node's environments.
if [ "$DRY" = 1 ]; then
  say "resolving $VLLM_REQUIREMENTS with pip's resolver (no download)"
  resolver=$(mktemp -d)
  "$PYTHON" -m venv "$resolver/venv"
  "$resolver/venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true  # a newer resolver
  status=0
  "$resolver/venv/bin/python" -m pip install --dry-run --ignore-installed --quiet --report "$OUT/vllm-resolve.json" \
    -r "$VLLM_REQUIREMENTS" > "$resolver/pip.txt" 2>&1 || status=$?
  sed '/^WARNING: Location/d' "$resolver/pip.txt" | tail -20 | tee -a "$LOG"
  rm -rf "$resolver"
  if [ "$status" != 0 ]; then say "FAILED: $VLLM_REQUIREMENTS does not resolve (pip exit $status)"; exit 1; fi
  "$PYTHON" bench/resolve_summary.py "$OUT/vllm-resolve.json" "$VLLM_REQUIREMENTS" | tee -a "$LOG" \
    || { say "FAILED: the resolution does not honour $VLLM_REQUIREMENTS's pins"; exit 1; }
else
  say "installing requirements.txt into $VENV and $VLLM_REQUIREMENTS into vLLM's environment"
  make --no-print-directory node-env VENV="$VENV" VLLM_REQUIREMENTS="$VLLM_REQUIREMENTS" 2>&1 \
    | sed '/^WARNING: Location/d' | tee -a "$LOG"
  "$VENV/bin/pip" install --quiet -r requirements-test.txt 2>&1 | sed '/^WARNING: Location/d' | tee -a "$LOG"
  "$VENV/bin/python" -m pip freeze > "$OUT/node-freeze.txt"
  "$(make --no-print-directory -s vllm-path)/bin/python" -m pip freeze > "$OUT/vllm-freeze.txt"
  say "pipeline: $(grep -E '^(torch|transformers|bitsandbytes)==' "$OUT/node-freeze.txt" | tr '\n' ' ')"
  say "vLLM: $(grep -E '^(vllm|torch|transformers)==' "$OUT/vllm-freeze.txt" | tr '\n' ' ')"
fi

# 2. The GPU.
if [ "$DRY" = 1 ]; then
  say "no GPU in a dry run: nvidia-smi skipped"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
fi

# 3. The tests marked gpu, figures to $OUT/gpu_figures.json (tests/test_gpu.py writes them there).
if [ "$DRY" = 1 ]; then
  say "collecting the tests marked gpu"
  .venv/bin/python -m pytest -m gpu --collect-only -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$LOG"
else
  say "running the tests marked gpu"
  SKYTUNE_GPU_FIGURES="$OUT/gpu_figures.json" "$VENV/bin/python" -m pytest -m gpu -s -q -p no:cacheprovider \
    -o addopts="" tests/test_gpu.py 2>&1 | tee -a "$LOG"
  [ -f "$OUT/gpu_figures.json" ] && cat "$OUT/gpu_figures.json" | tee -a "$LOG"
fi
say "done in $(( $(date +%s) - start )) s; log: $LOG"
