#!/usr/bin/env bash
# The README's recipe table: each candidate recipe a DVC experiment on the embedded default, scored on the dev halves
# (what the default was picked on) and on the held-out halves (what the README reports), then the table and the pick.
#
#   bash bench/recipe_runs.sh [DIR]      (after make install; DIR: a scratch clone made here, /tmp/skytune-recipes)
#
# The clone's baseline is the recipe before replay (learning rate 1e-3, rank 8, alpha 32, every linear layer, no
# self_replay rows) with evaluate.tasks naming both halves; every candidate is that baseline with -S overrides, so
# the table does not depend on what params.yaml's default is now. ~6 min a candidate on 2 cores (8 candidates, plus
# the data stages and evaluate_base once: ~55 min).
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
dir=${1:-/tmp/skytune-recipes}
rm -rf "$dir"
git clone -q "$repo" "$dir"
cd "$dir"
export PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$dir/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python - <<'EOF'
import yaml
params = yaml.safe_load(open("params.yaml"))
params["evaluate"]["tasks"] = ["skytune_knowledge_dev", "skytune_choice_dev", "skytune_knowledge", "skytune_choice"]
params["train"].update(learning_rate=0.001, lora_r=8, lora_alpha=32, target_modules="all-linear")
params["self_replay"]["max_new_tokens"] = 128
params["merge_data"]["mixture"]["self_replay"] = {"fraction": 0.0}
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF
git -c user.name=bench -c user.email=bench@localhost commit -qam "recipe baseline: no replay, both halves scored"
run() { name=$1; shift; echo "== $name"; dvc exp run -n "$name" "$@" > "log_$name.txt" 2>&1 || { tail -20 "log_$name.txt"; exit 1; }; }
replay="merge_data.mixture.self_replay.fraction"
run r0-none
run r1-replay -S "$replay=1.0"
run r2-lr5e-4 -S train.learning_rate=0.0005
run r3-rank4 -S train.lora_r=4 -S train.lora_alpha=16
run r4-attn -S "train.target_modules=[q_proj,k_proj,v_proj,o_proj]"
run r5-replay-half -S "$replay=0.5"
run r6-replay-short -S "$replay=1.0" -S self_replay.max_new_tokens=64
run r7-replay-lr5e-4 -S "$replay=1.0" -S train.learning_rate=0.0005
python "$repo/bench/recipe_table.py" "$dir" r0-none r1-replay r2-lr5e-4 r3-rank4 r4-attn r5-replay-half \
    r6-replay-short r7-replay-lr5e-4
