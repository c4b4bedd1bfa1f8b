"""The user's commands that are not pipeline stages.

    python -m skytune.cli summary     # the experiments' params and metrics, and where the sanity report is
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from skytune.params import load_params

# The columns worth comparing experiments on (regexes for `dvc exp show --keep`); everything else is dropped.
SUMMARY_KEEP = (r"Experiment|model\.base|train\.(method|lora_r|lora_alpha|learning_rate|epochs)|quantization"
                r"|val_loss_before|val_loss_after|identity_exact_match_.*|ends_with_eot_.*|max_abs_logit_diff")


def summary() -> int:
    params = load_params()
    show = ["dvc", "exp", "show", "--md", "--drop", ".*", "--keep", SUMMARY_KEEP]
    print("$ dvc exp show --md   (selected columns; `dvc exp show` has them all)")
    code = subprocess.call(show)
    metrics = Path(params.paths.sanity_metrics)
    if metrics.is_file():
        values = json.loads(metrics.read_text(encoding="utf-8"))
        print("\nsanity check (base -> fine-tuned):")
        for key in ("identity_exact_match", "ends_with_eot", "mean_answer_tokens"):
            print(f"  {key:22s} {values[f'{key}_base']} -> {values[f'{key}_tuned']}")
    print(f"\nside-by-side answers: {params.paths.sanity_results}")
    print(f"model to serve:       {params.paths.export_dir} (model card: {params.paths.export_dir}/README.md)")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("summary", help="print the experiments' params and metrics and where the sanity report is")
    args = parser.parse_args(argv)
    if args.command == "summary":
        return summary()
    return 2


if __name__ == "__main__":
    sys.exit(main())
