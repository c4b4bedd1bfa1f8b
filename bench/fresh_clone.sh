#!/usr/bin/env bash
# Times the README's two commands on a fresh clone, as a newcomer runs them, and measures what an experiment costs
# in storage:
#   bench/fresh_clone.sh [REPO]        (REPO defaults to this checkout; its committed HEAD is cloned)
# Prints: `make run` including the virtualenv and installs; the pipeline alone (a forced re-run of the whole DAG
# with `dvc exp run -f` in the same clone); a second experiment (`dvc exp run -S train.lora_r=16`) and how much it
# adds to the DVC cache and to a DVC remote (a local directory) against its adapter and metrics; the workspace's
# disk use and how many copies of the merged model it holds; the README's base-vs-tuned tables of the first run
# (bench/readme_tables.py); then `make test`. SKIP_TESTS=1 leaves out make test.
# Figures vary up to ~4x on shared machines.
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"  # as CI has it, beside the clone
cd "$work/clone"
export HF_HUB_OFFLINE=1 SKYTUNE_CACHE="$work/skytune-cache"   # the GGUF base is converted inside the timed run

seconds() { local start=$SECONDS; "$@" >"$work/log" 2>&1 || { tail -50 "$work/log"; exit 1; }; echo $((SECONDS - start)); }
bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
mb() { awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; }

run=$(seconds make run)
export PATH="$PWD/.venv/bin:$PATH"
evaluate=$(python -c 'import json; from skytune.core.params import load_params
m = json.load(open(load_params().paths.eval_metrics))
print("base %s s and its quantization control %s s (once per base), tuned %s s (every experiment); "
      "flagged as forgetting: %d" % (m["seconds_base"], m["seconds_control"], m["seconds_tuned"], m["regressions"]))')
replay=$(python -c 'import json; from skytune.core.params import load_params
m = json.load(open(load_params().paths.replay_metrics))
print("%s s, answers kept %s" % (m["seconds"], {k: "%d of %d" % (v["answers"], v["prompts"]) for k, v in m["sources"].items()}))')
tables=$(python bench/readme_tables.py .)  # the README's base-vs-tuned tables, from this run
pipeline=$(seconds dvc exp run -f)

dvc remote add -q --local -d bench "$work/remote"
seconds dvc push -q >/dev/null
cache0=$(bytes .dvc/cache); remote0=$(bytes "$work/remote")
experiment=$(seconds dvc exp run -S train.lora_r=16)
seconds dvc push -q >/dev/null
cache1=$(bytes .dvc/cache); remote1=$(bytes "$work/remote")
record=$(bytes models/adapter metrics sanity_check_result dvclive)
workspace=$(bytes models data metrics sanity_check_result dvclive)
copies=$(find . -path ./.venv -prune -o -path './.venv-*' -prune -o -type f -size +100M -print | wc -l)

printf 'make run (fresh clone, installs included): %4d s   (target 600)\n' "$run"
printf 'the evaluate stages in make run: %s\n' "$evaluate"
printf 'the self_replay stage in make run: %s\n' "$replay"
printf '%s\n' "$tables"
printf 'pipeline alone (dvc exp run -f):           %4d s\n' "$pipeline"
printf 'a second experiment (-S train.lora_r=16):  %4d s\n' "$experiment"
printf 'per extra experiment: cache +%s, remote +%s; its adapter + metrics %s (target <= 1.2x)\n' \
  "$(mb $((cache1 - cache0)))" "$(mb $((remote1 - remote0)))" "$(mb "$record")"
printf 'workspace (models, data, metrics): %s; files over 100 MB in the clone, DVC cache included: %d (target 1, the merged model)\n' \
  "$(mb "$workspace")" "$copies"
if [ -z "${SKIP_TESTS:-}" ]; then
  tests=$(seconds make test)
  printf 'make test:                                 %4d s   (target 1200)\n' "$tests"
fi
