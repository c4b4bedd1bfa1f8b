"""One HTML page a person opens in a browser: the summary (base vs tuned), the side-by-side answers, the loss
curves and every metric of the current experiment, or of several compared.

    python -m skytune.face.report                      # the workspace (the last `dvc exp run`)
    python -m skytune.face.report exp-a exp-b main     # experiments, branches or commits compared (`dvc plots diff`)
    make report REVS="exp-a exp-b"

The plots are DVC's own (`dvc plots show/diff --json`: the Vega-Lite specs of dvc.yaml's plots, filled with each
revision's data), rendered here to static SVG with vl-convert, so the page needs no network and no JavaScript
(DVC's own HTML loads Vega from a CDN and renders blank offline). Metrics come from `dvc.api.metrics_show` and the
answers from each revision's `paths.sanity_results`. Writes `paths.report_dir`/index.html.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

from skytune.core.atomic import atomic_file
from skytune.core.errors import reported
from skytune.core.params import Params, load_params
from skytune.face import commands

WORKSPACE = "workspace"
CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.nostop { background: #fde8e8; }
td.answer { max-width: 24rem; overflow-wrap: anywhere; }  /* a runaway answer wraps; the columns stay */
.plots { display: flex; flex-wrap: wrap; gap: 1.5rem; } figure { margin: 0; }
figcaption { font-size: 0.8rem; color: #555; }
"""


def _dvc_json(args: list[str]) -> dict[str, Any]:
    return json.loads(commands.dvc(*args, "--json"))


def plot_specs(revs: list[str]) -> dict[str, dict[str, Any]]:
    """{plot id: Vega-Lite spec with the data of every revision} from DVC."""
    shown = _dvc_json(["plots", "diff", *revs] if revs else ["plots", "show"])
    return {name: items[0]["content"] for name, items in sorted(shown.get("data", {}).items())
            if items and items[0].get("type") == "vega"}


def render_svg(spec: dict[str, Any]) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)


def metric_files(params: Params) -> dict[str, str]:
    """The metrics worth comparing, by the stage that writes them (the data stages' row counts are left out)."""
    p = params.paths
    return {"train": p.train_metrics, "preference": p.preference_metrics, "merge": p.merge_metrics,
            "sanity": p.sanity_metrics, "evaluate": p.eval_metrics, "export": p.export_metrics}


def revision_metrics(params: Params, rev: str | None) -> dict[str, Any]:
    """{"<stage>.<key>": value} of the metrics at `rev` (None: the workspace); a file missing there is left out."""
    import dvc.api

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        elif not isinstance(node, list):
            flat[prefix] = node

    for stage, path in metric_files(params).items():
        try:
            walk(stage, dvc.api.metrics_show(path, rev=rev))
        except Exception:  # noqa: BLE001 - DVC raises several types for a file absent at a revision
            continue
    return flat


def revision_answers(params: Params, rev: str | None) -> list[dict[str, str]]:
    import dvc.api

    try:
        text = dvc.api.read(params.paths.sanity_results, rev=rev, encoding="utf-8")
    except Exception:  # noqa: BLE001 - a revision without a sanity check: no answers to show
        return []
    return list(csv.DictReader(io.StringIO(text)))


# The headline of a fine-tune, base vs tuned: (words, metric of the base, metric of the tuned model).
HEADLINE = (
    ("identity: answers as identity.name / creator", "sanity.identity_exact_match_base",
     "sanity.identity_exact_match_tuned"),
    ("answers that stop by themselves", "sanity.ends_with_eot_base", "sanity.ends_with_eot_tuned"),
    ("retained: probes the base got right, still right", None, "sanity.retained"),
    ("val perplexity", "sanity.val_perplexity_base", "sanity.val_perplexity_tuned"),
    ("val loss", "train.val_loss_before", "train.val_loss_after"),
    ("preference accuracy: val pairs, chosen above rejected (per token)", "preference.val_preference_accuracy_before",
     "preference.val_preference_accuracy_after"),
    ("preference reward margin: val pairs, against the model it started from", None, "preference.val_reward_margin"),
    ("general text perplexity (forgetting)", "evaluate.general_text.perplexity.base",
     "evaluate.general_text.perplexity.tuned"),
    ("forgetting flagged (regressions)", None, "evaluate.regressions"),
)
BENCHMARK = re.compile(r"evaluate\.tasks\.(?P<task>[^.]+)\.(?P<metric>.+)\.tuned")  # one headline row each
# Plot titles and axis names in words, by the plot's file name and by the data's column.
PLOT_TITLES = {"loss": "Loss", "perplexity": "Perplexity", "learning_rate": "Learning rate",
               "grad_norm": "Gradient norm", "train_lengths": "Training sequences by length"}
AXIS_NAMES = {"step": "optimizer step", "loss": "loss (cross-entropy per trained token)",
              "perplexity": "perplexity", "learning_rate": "learning rate", "grad_norm": "gradient norm",
              "tokens": "tokens per sequence", "records": "sequences", "prompt": "prompt", "base": "base model",
              "tuned": "tuned model", "answer_tokens": "answer tokens", "rev": "experiment",
              "dvc_inferred_y_value": "tokens", "score": "task, metric (model)", "value": "score"}


def plot_title(plot_id: str) -> str:
    """`dvclive/plots/metrics/eval/loss.tsv` -> "Loss (validation)", `metrics/train_lengths.csv` -> its words."""
    path = Path(plot_id)
    title = PLOT_TITLES.get(path.stem, path.stem.replace("_", " ").capitalize())
    split = {"train": "training", "eval": "validation"}.get(path.parent.name)
    return f"{title} ({split})" if split else title


def titled(spec: dict[str, Any], title: str) -> dict[str, Any]:
    """The Vega-Lite `spec` with a title and its x/y axes named in words (DVC names them by column)."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: walk(v) for k, v in node.items()}
            encoding = node.get("encoding")
            if isinstance(encoding, dict):
                for axis in ("x", "y"):
                    channel = encoding.get(axis)
                    if isinstance(channel, dict) and isinstance(channel.get("field"), str):
                        field = channel["field"]
                        channel["title"] = AXIS_NAMES.get(field, field.replace("_", " "))
            return node
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return {**walk(spec), "title": title}


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _headline(names: list[str], metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Base vs tuned: the fixed rows of HEADLINE, then one row per benchmark task and metric (a tuned score flagged
    as forgetting in red; beside a tested one, its paired test's p-value against the control, the base as the tuned
    model is merged onto it, shown beside the base where it differs)."""
    first = metrics[names[0]]
    out = ["<table class='headline'>", "<tr><th>base vs tuned</th><th>base</th>"
           + "".join(f"<th>tuned: {html.escape(n)}</th>" for n in names) + "</tr>"]
    benchmarks = sorted({(m["task"], m["metric"]) for n in names for k in metrics[n] if (m := BENCHMARK.fullmatch(k))})
    rows = [*HEADLINE, *((f"benchmark: {task} {metric}", f"evaluate.tasks.{task}.{metric}.base",
                          f"evaluate.tasks.{task}.{metric}.tuned") for task, metric in benchmarks)]
    for words, base_key, tuned_key in rows:
        if not any(tuned_key in metrics[n] for n in names):
            continue
        base = _value(first.get(base_key, "")) if base_key else "-"
        control = base_key.removesuffix(".base") + ".control" if base_key else ""
        if first.get(control, first.get(base_key)) != first.get(base_key):  # after QLoRA: the dequantized base
            base += f" <small>control {_value(first[control])}</small>"
        forgot, p_value = (tuned_key.removesuffix(".tuned") + suffix for suffix in (".forgot", ".p_value"))
        cells = "".join(f"<td class='num{' nostop' if metrics[n].get(forgot) is True else ''}'>"
                        f"{_value(metrics[n].get(tuned_key, ''))}"
                        + (f" <small>p={_value(metrics[n][p_value])}</small>" if p_value in metrics[n] else "")
                        + "</td>" for n in names)
        out.append(f"<tr><td>{html.escape(words)}</td><td class='num'>{base}</td>{cells}</tr>")
    return [*out, "</table>"]


def _answers(names: list[str], answers: dict[str, list[dict[str, str]]]) -> list[str]:
    out = ["<p>Greedy answers to the sanity prompts; a red cell ran to max_new_tokens without stopping.</p>",
           "<table class='answers'>"]
    shown = [n for n in names if answers.get(n)]
    out.append("<tr><th>#</th><th>kind</th><th>prompt</th><th>expected</th><th>base</th>"
               + "".join(f"<th>tuned: {html.escape(n)}</th>" for n in shown) + "</tr>")

    def cell(r: dict[str, str], model: str) -> str:
        cls = "answer" if r.get(f"{model}_stopped") == "True" else "answer nostop"
        return f"<td class='{cls}'>{html.escape(r.get(f'{model}_answer', ''))}</td>"

    first = answers[shown[0]] if shown else []
    for i, row in enumerate(first):
        tuned = "".join(cell(answers[n][i], "tuned") if i < len(answers[n]) else "<td></td>" for n in shown)
        out.append(f"<tr><td>{i + 1}</td><td>{html.escape(row['kind'])}</td><td>{html.escape(row['prompt'])}</td>"
                   f"<td>{html.escape(row['expected'])}</td>{cell(row, 'base')}{tuned}</tr>")
    return [*out, "</table>"]


def page(revs: list[str], plots: dict[str, str], metrics: dict[str, dict[str, Any]],
         answers: dict[str, list[dict[str, str]]]) -> str:
    """The HTML page: the summary (experiments, base vs tuned), the answers side by side, the plots as inline SVG
    (`plots`: {title: svg}), then every metric."""
    names = revs or [WORKSPACE]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>skytune report</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>skytune report: {html.escape(', '.join(names))}</h1>",
           "<h2 id='summary'>Summary</h2>", *_headline(names, metrics),
           "<h2 id='answers'>Answers side by side</h2>", *_answers(names, answers),
           "<h2 id='plots'>Plots</h2>", "<div class='plots'>"]
    for title, svg in plots.items():
        out.append(f"<figure class='plot'>{svg}<figcaption>{html.escape(title)}</figcaption></figure>")
    out.append("</div>")

    keys = sorted({k for m in metrics.values() for k in m})
    out += ["<h2 id='metrics'>All metrics</h2>", "<table class='metrics'>",
            "<tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for key in keys:
        cells = "".join(f"<td class='num'>{_value(metrics[n].get(key, ''))}</td>" for n in names)
        out.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
    out += ["</table>", "</body></html>"]
    return "\n".join(out)


def build(revs: list[str], params: Params) -> Path:
    names = revs or [WORKSPACE]
    plots = {plot_title(plot_id): render_svg(titled(spec, plot_title(plot_id)))
             for plot_id, spec in plot_specs(revs).items()}
    metrics = {n: revision_metrics(params, None if n == WORKSPACE else n) for n in names}
    answers = {n: revision_answers(params, None if n == WORKSPACE else n) for n in names}
    target = Path(params.paths.report_dir) / "index.html"
    with atomic_file(target) as fh:
        fh.write(page(revs, plots, metrics, answers))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.face.report", description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", help="experiments, branches or commits to compare (default: workspace)")
    args = parser.parse_args(argv)
    target = build(args.revs, load_params())
    print(f"report: {target.resolve()}  (open it in a browser)")
    return 0


if __name__ == "__main__":
    with reported():
        sys.exit(main())
