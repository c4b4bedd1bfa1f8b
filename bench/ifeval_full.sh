#!/usr/bin/env bash
# IFEval's 541 prompts, offline, through lm-eval's own task, prompts and scorers at its own 1280-token cap, on the
# embedded default's base, control and tuned model: the README's IFEval figures.
#
#   bash bench/ifeval_full.sh [DIR]      (after make install; DIR: a scratch clone made here, /tmp/skytune-ifeval)
#
# The prompts are read where CI has them (../shared/data/ifeval/input_data.jsonl, or IFEVAL_DATA), through a task
# YAML that includes lm-eval's own ifeval.yaml and points its dataset at that file (see evaluate/tasks/README.md):
# nothing is copied into the project. The whole default pipeline runs once in the clone (`dvc exp run`) with
# evaluate.tasks naming ifeval_local beside the default's two tasks, and evaluate.engine vllm: vLLM's CPU build
# (paths.vllm_env, make vllm-env), lm-eval's local-completions against its server. The table comes from
# bench/readme_tables.py. On 2 cores, lm-eval's transformers engine needed ~3 h per model (batches of 32 decoded to
# 1280 tokens; 33 of 579 requests in 26 min, 2026-12-07); vLLM's CPU server about 35 min per model, almost all of the
# run: base, control and tuned.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
dir=${1:-/tmp/skytune-ifeval}
data=$(realpath "${IFEVAL_DATA:-$repo/../shared/data/ifeval/input_data.jsonl}")
rm -rf "$dir"
git clone -q "$repo" "$dir"
cd "$dir"
export PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$dir/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
own=$(python -c 'import lm_eval, pathlib; print(pathlib.Path(lm_eval.__file__).parent / "tasks/ifeval/ifeval.yaml")')
mkdir -p evaluate/tasks/ifeval_local
printf 'include: %s\ntask: ifeval_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: %s\n' \
    "$own" "$data" > evaluate/tasks/ifeval_local/ifeval_local.yaml
git add evaluate/tasks/ifeval_local
git -c user.name=bench -c user.email=bench@localhost commit -qm "IFEval's prompts from $data"
start=$(date +%s)
ln -s "$repo/.venv-vllm" .venv-vllm && echo .venv-vllm >> .git/info/exclude  # paths.vllm_env, in the clone
dvc exp run -n ifeval-full -S 'evaluate.tasks=[skytune_knowledge,skytune_choice,ifeval_local]' \
    -S evaluate.engine=vllm > log_ifeval.txt 2>&1 \
    || { tail -30 log_ifeval.txt; exit 1; }
echo "dvc exp run: $(( $(date +%s) - start )) s"
python "$repo/bench/readme_tables.py" "$dir"
