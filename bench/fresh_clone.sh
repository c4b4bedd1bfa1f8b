#!/usr/bin/env bash
# Times the README's two commands on a fresh clone, as a newcomer runs them:
#   bench/fresh_clone.sh [REPO]        (REPO defaults to this checkout; its committed HEAD is cloned)
# Prints: `make run` including the virtualenv and installs, the pipeline alone (a forced re-run of the whole
# DAG with `dvc exp run -f` in the same clone), and `make test`. Figures vary up to ~4x on shared machines.
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
export HF_HUB_OFFLINE=1

seconds() { local start=$SECONDS; "$@" >"$work/log" 2>&1 || { tail -50 "$work/log"; exit 1; }; echo $((SECONDS - start)); }

run=$(seconds make run)
pipeline=$(seconds env PATH="$PWD/.venv/bin:$PATH" dvc exp run -f)
tests=$(seconds make test)
printf 'make run (fresh clone, installs included): %4d s   (target 600)\n' "$run"
printf 'pipeline alone (dvc exp run -f):           %4d s   (target 180)\n' "$pipeline"
printf 'make test:                                 %4d s   (target 900)\n' "$tests"
