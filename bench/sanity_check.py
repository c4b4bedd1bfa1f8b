"""Wall time of the sanity_check stage on the workspace's last run (target: under 30 s for the embedded default).

    make run && .venv/bin/python bench/sanity_check.py [--repeat 3]

Copies what the stage reads (params.yaml, the base model, the merged model, the val file and the sanity prompts)
into a temporary directory, runs `python -m skytune.stages.sanity_check` there as DVC would (a fresh process:
imports and model loads included), and prints the wall time of each run and the stage's metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from skytune.core.params import load_params  # noqa: E402

TARGET_SECONDS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = load_params(REPO / "params.yaml").paths
    needed = [paths.base_model_dir, paths.merged_dir, paths.val_file, paths.sanity_prompts]
    missing = [p for p in needed if not (REPO / p).exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `make run` first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy2(REPO / "params.yaml", work / "params.yaml")
        for rel in needed:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if (REPO / rel).is_dir() else shutil.copy2
            copy(REPO / rel, work / rel)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "skytune.stages.sanity_check"], cwd=work, env=env, check=True,
                           capture_output=True)
            times.append(time.perf_counter() - start)
        metrics = json.loads((work / paths.sanity_metrics).read_text())
    print(f"sanity_check wall time: {', '.join(f'{t:.1f} s' for t in times)} "
          f"(best {min(times):.1f} s; target {TARGET_SECONDS:.0f} s: {min(times) / TARGET_SECONDS:.2f} of it)")
    print(f"{metrics['prompts']} prompts, engine {metrics['engine']}, "
          f"perplexity over {metrics['val_perplexity_tokens']} val tokens")
    for key in ("identity_exact_match", "ends_with_eot", "mean_answer_tokens", "val_perplexity"):
        print(f"  {key:22s} base {metrics[f'{key}_base']}  tuned {metrics[f'{key}_tuned']}")


if __name__ == "__main__":
    main()
