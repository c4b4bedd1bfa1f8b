"""The recipe table: candidate training recipes side by side, from their DVC experiments' metrics.

    python bench/recipe_table.py [WORKSPACE] [EXPERIMENT ...]     (default: this checkout, every experiment)

Each experiment must have run with `evaluate.tasks` naming the dev halves and the held-out halves
(`skytune_knowledge_dev, skytune_choice_dev, skytune_knowledge, skytune_choice`). Prints one Markdown table per
half: identity and stopping (sanity_check), the retained probes of that half, each task metric's training change
(tuned - control) with its paired p-value, and the general-text perplexity's (not split: one set of texts), then
the candidate the rule below picks, on the dev half alone.

The rule, fixed before any candidate ran: a candidate is eligible when identity exact match is 1.0, ends_with_eot
is at least 0.95 and nothing is flagged on the dev half (a task metric or the perplexity); of those, the one with the
highest mean of its dev changes (each dev task metric's training change, and retained_dev - 1) wins; a tie goes to
the one listed first. The held-out table is what the README reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from skytune.core.params import load_params

DEV = "_dev"


def experiments(root: Path) -> dict[str, dict[str, Any]]:
    """Every experiment's metrics files, by experiment name, as `dvc exp show --all-commits --json` gives them."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--all-commits", "--json"], cwd=root,
                                      capture_output=True, text=True, check=True).stdout)
    return {exp["name"]: {path: m["data"] for path, m in rev["data"]["metrics"].items() if "data" in m}
            for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]}


def _change(entry: dict[str, Any]) -> str:
    p = f", p={entry['p_value']:.2g}" if "p_value" in entry else ""
    return f"{entry['training']:+.3f}{p}{' FORGOT' if entry['forgot'] else ''}"


def _tasks(evaluated: dict[str, Any], dev: bool) -> dict[str, dict[str, Any]]:
    return {f"{task} {metric}": entry for task, metrics in evaluated["tasks"].items()
            for metric, entry in metrics.items() if task.endswith(DEV) == dev}


def table(runs: dict[str, dict[str, Any]], paths: Any, *, dev: bool) -> list[str]:
    names = list(_tasks(next(iter(runs.values()))[paths.eval_metrics], dev))
    retained = "retained_dev" if dev else "retained"
    out = [f"| candidate | identity | ends_with_eot | {retained} | {' | '.join(names)} | general-text perplexity |",
           "|---" * (5 + len(names)) + "|"]
    for name, metrics in runs.items():
        sanity, evaluated = metrics[paths.sanity_metrics], metrics[paths.eval_metrics]
        tasks = _tasks(evaluated, dev)
        ppl = evaluated["general_text"]["perplexity"]
        relative = ppl["training"] / ppl["control"]
        out.append(f"| {name} | {sanity['identity_exact_match_tuned']:.2f} | {sanity['ends_with_eot_tuned']:.2f} | "
                   f"{sanity[retained]:.2f} | {' | '.join(_change(tasks[n]) for n in names)} | "
                   f"{ppl['control']:.2f} -> {ppl['tuned']:.2f} ({relative:+.0%}, p={ppl['p_value']:.2g})"
                   f"{' FORGOT' if ppl['forgot'] else ''} |")
    return out


def pick(runs: dict[str, dict[str, Any]], paths: Any) -> tuple[str | None, dict[str, float]]:
    """The rule of the module's docstring, on the dev half: the winner, and every eligible candidate's mean."""
    means: dict[str, float] = {}
    for name, metrics in runs.items():
        sanity, evaluated = metrics[paths.sanity_metrics], metrics[paths.eval_metrics]
        tasks = _tasks(evaluated, dev=True)
        if sanity["identity_exact_match_tuned"] < 1.0 or sanity["ends_with_eot_tuned"] < 0.95:
            continue
        if any(e["forgot"] for e in tasks.values()) or evaluated["general_text"]["perplexity"]["forgot"]:
            continue
        changes = [e["training"] for e in tasks.values()] + [sanity["retained_dev"] - 1]
        means[name] = sum(changes) / len(changes)
    return (max(means, key=lambda n: means[n]) if means else None), means  # max keeps the first of a tie


def main(root: Path, names: list[str]) -> None:
    paths = load_params(root / "params.yaml").paths
    runs = experiments(root)
    runs = {n: runs[n] for n in names} if names else runs
    for dev in (True, False):
        print(f"{'Dev' if dev else 'Held-out'} half: training's change (tuned - control), paired p-value\n")
        print("\n".join(table(runs, paths, dev=dev)) + "\n")
    winner, means = pick(runs, paths)
    print("Mean dev change of the eligible candidates: "
          + ", ".join(f"{n} {m:+.4f}" for n, m in means.items()) + f". Picked on the dev half: {winner}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve(), sys.argv[2:])
