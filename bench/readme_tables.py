"""The README's base-vs-tuned tables, written from a real run's metrics rather than by hand:

    python bench/readme_tables.py [WORKSPACE]      (default: this checkout, after `make run`)

Prints two Markdown tables: the sanity check (identity, stopping, retained probes, val perplexity and loss) and the
benchmarks (per task and metric the base, the control and the tuned model; quantization's change and its paired
p-value; training's change with its confidence interval and p-value; the flag), read from the workspace's `paths.sanity_metrics`, `paths.train_metrics` and `paths.eval_metrics`.
bench/fresh_clone.sh prints them for the clone it ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from skytune.core.params import load_params


def _read(root: Path, path: str) -> dict[str, Any]:
    return json.loads((root / path).read_text(encoding="utf-8"))


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def sanity_table(sanity: dict[str, Any], train: dict[str, Any]) -> list[str]:
    rows = [("identity exact match (answers as `identity.name` by `identity.creator`)",
             sanity["identity_exact_match_base"], sanity["identity_exact_match_tuned"]),
            ("ends_with_eot (answers that stop by themselves)", sanity["ends_with_eot_base"],
             sanity["ends_with_eot_tuned"])]
    if "retained" in sanity:
        known = sanity["retained_probes_base_correct"]
        rows.append((f"retained (of the {known} held-out retained probes the base answers right, still right)", "-",
                     f"{sanity['retained']:.2f} ({round(sanity['retained'] * known)} of {known})"))
    rows += [("val perplexity", sanity["val_perplexity_base"], sanity["val_perplexity_tuned"]),
             ("val loss (train stage)", train["val_loss_before"], train["val_loss_after"])]
    return ["| metric (sanity_check) | base | fine-tuned |", "|---|---|---|",
            *(f"| {name} | {_num(base)} | {_num(tuned)} |" for name, base, tuned in rows)]


def benchmark_table(evaluated: dict[str, Any]) -> list[str]:
    rows = [(f"{task} {metric} ({evaluated['examples'][task]} items)", e)
            for task, metrics in evaluated["tasks"].items() for metric, e in metrics.items()]
    if "general_text" in evaluated:
        rows.append((f"perplexity on text the base wrote itself ({evaluated['general_text']['tokens']} tokens)",
                     evaluated["general_text"]["perplexity"]))
    header = (f"| benchmark (evaluate) | base | control ({evaluated['control']}) | fine-tuned | quantization, p | "
              "training [95% interval], p | |")
    out = [header, "|---|---|---|---|---|---|---|"]
    for name, e in rows:
        quantization = f"{e['quantization']:+.3g}" + (f", {e['quantization_p_value']:.2g}"
                                                      if "quantization_p_value" in e else "")
        interval = f" [{e['ci_low']:+.3g}, {e['ci_high']:+.3g}]" if "ci_low" in e else ""
        training = f"{e['training']:+.3g}{interval}, " + (f"{e['p_value']:.2g} ({e['test'].replace('_', ' ')})"
                                                          if "p_value" in e else "untested")
        out.append(f"| {name} | {_num(e['base'])} | {_num(e['control'])} | {_num(e['tuned'])} | {quantization} | "
                   f"{training} | {'FORGOT' if e['forgot'] else ''} |")
    return out


def main(root: Path) -> None:
    paths = load_params(root / "params.yaml").paths
    print("\n".join(sanity_table(_read(root, paths.sanity_metrics), _read(root, paths.train_metrics))))
    print()
    print("\n".join(benchmark_table(_read(root, paths.eval_metrics))))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
