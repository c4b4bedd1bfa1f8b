"""How much the embedded default's scores move with the seed: the spread the real-model test's thresholds are set
from (tests/test_pipeline_e2e.py), measured, not guessed.

    .venv/bin/python bench/seed_spread.py [--seeds 42 1 2 3] [--project DIR]

In a project where `make run` ran (default: a fresh clone of HEAD, where the first seed runs the whole DAG), one
`dvc exp run -S base.seed=N` per seed; printed per seed: identity exact match, ends_with_eot, retained (and of how
many probes), and each benchmark's base -> tuned delta; then the range of each over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from skytune.core.params import load_params

REPO = Path(__file__).resolve().parents[1]


def dvc(*args: str, cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, check=True, capture_output=True)


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    return dest


def scores(project: Path) -> dict[str, float]:
    paths = load_params(project / "params.yaml").paths
    sanity = json.loads((project / paths.sanity_metrics).read_text())
    evaluated = json.loads((project / paths.eval_metrics).read_text())
    out = {k: sanity[k] for k in ("identity_exact_match_tuned", "ends_with_eot_tuned", "retained",
                                  "retained_probes_base_correct")}
    out |= {f"{task}.{metric} delta": e["delta"] for task, metrics in evaluated["tasks"].items()
            for metric, e in metrics.items()}
    out["general_text perplexity tuned"] = evaluated["general_text"]["perplexity"]["tuned"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--project", type=Path, help="a project where make run ran (default: a fresh clone)")
    args = parser.parse_args()
    project = args.project or clone(Path(tempfile.mkdtemp(prefix="skytune-seeds-")) / "project")
    table: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        dvc("exp", "run", "-n", f"seed{seed}", "-S", f"base.seed={seed}", cwd=project)
        table[seed] = scores(project)
        print(f"seed {seed}: {json.dumps(table[seed])}", flush=True)
    for key in table[args.seeds[0]]:
        values = [row[key] for row in table.values()]
        print(f"{key}: {min(values)} .. {max(values)}")


if __name__ == "__main__":
    main()
