#!/usr/bin/env bash
# The README's preference figures: the embedded default (SmolLM2-135M-Instruct) as `make run` trains it, then the same
# with DPO on its 48 one-sentence pairs, as two DVC experiments in a scratch clone.
#
#   bash bench/preference_run.sh [DIR] [METHOD]   (after make install; DIR: /tmp/skytune-preference; METHOD: dpo)
#
# Prints the stages each run ran, the preference stage's seconds, metrics/preference.json (the val pairs before and
# after) and the sanity check's answer lengths and stopping, base vs tuned, for both experiments. ~12 min on 2 cores.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
dir=${1:-/tmp/skytune-preference}
method=${2:-dpo}
rm -rf "$dir"
git clone -q "$repo" "$dir"
cd "$dir"
export PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$dir/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
run() {
    name=$1; shift
    local start=$SECONDS
    dvc exp run -n "$name" "$@" > "log_$name.txt" 2>&1 || { tail -30 "log_$name.txt"; exit 1; }
    echo "== $name: $(( SECONDS - start )) s; stages run: $(grep -o "Running stage '[a-z_]*'" "log_$name.txt" \
        | cut -d"'" -f2 | tr '\n' ' ')"
    python - <<'EOF'
import json
from pathlib import Path
m = json.loads(Path("metrics/preference.json").read_text())
print("preference:", {k: v for k, v in m.items() if k.startswith(("val_", "train_", "method", "steps", "skipped"))})
s = json.loads(Path("sanity_check_result/metrics.json").read_text())
print("sanity:", {k: s[k] for k in sorted(s) if k.startswith(("ends_with_eot", "identity_exact", "retained",
                                                                "mean_answer"))})
EOF
}
run default
run "$method" -S "preference.method=$method"
grep -E "preference training|val pairs|train_runtime" "log_$method.txt" | tail -4
