"""One HTML page a person opens in a browser: the loss curves, the metrics and the side-by-side answers of the
current experiment, or of several compared.

    python -m skytune.report                      # the workspace (the last `dvc exp run`)
    python -m skytune.report exp-a exp-b main     # experiments, branches or commits compared (`dvc plots diff`)
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
import subprocess
import sys
from pathlib import Path
from typing import Any

from skytune.atomic import atomic_file
from skytune.params import Params, load_params

WORKSPACE = "workspace"
CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.nostop { background: #fde8e8; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5rem; } figure { margin: 0; }
figcaption { font-size: 0.8rem; color: #555; }
"""


def _dvc_json(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


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
    return {"train": p.train_metrics, "merge": p.merge_metrics, "sanity": p.sanity_metrics, "export": p.export_metrics}


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


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def page(revs: list[str], plots: dict[str, str], metrics: dict[str, dict[str, Any]],
         answers: dict[str, list[dict[str, str]]]) -> str:
    """The HTML page: metrics per revision, the plots as inline SVG, and the answers side by side."""
    names = revs or [WORKSPACE]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>skytune report</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>skytune report: {html.escape(', '.join(names))}</h1>"]

    out += ["<h2 id='plots'>Plots</h2>", "<div class='plots'>"]
    for title, svg in plots.items():
        out.append(f"<figure class='plot'>{svg}<figcaption>{html.escape(title)}</figcaption></figure>")
    out.append("</div>")

    keys = sorted({k for m in metrics.values() for k in m})
    out += ["<h2 id='metrics'>Metrics</h2>", "<table class='metrics'>",
            "<tr><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for key in keys:
        cells = "".join(f"<td class='num'>{_value(metrics[n].get(key, ''))}</td>" for n in names)
        out.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
    out.append("</table>")

    out += ["<h2 id='answers'>Answers side by side</h2>",
            "<p>Greedy answers to the sanity prompts; a red cell ran to max_new_tokens without stopping.</p>",
            "<table class='answers'>"]
    shown = [n for n in names if answers.get(n)]
    out.append("<tr><th>#</th><th>kind</th><th>prompt</th><th>expected</th><th>base</th>"
               + "".join(f"<th>tuned: {html.escape(n)}</th>" for n in shown) + "</tr>")
    first = answers[shown[0]] if shown else []
    for i, row in enumerate(first):
        def cell(r: dict[str, str], model: str) -> str:
            cls = "" if r.get(f"{model}_stopped") == "True" else " class='nostop'"
            return f"<td{cls}>{html.escape(r.get(f'{model}_answer', ''))}</td>"
        tuned = "".join(cell(answers[n][i], "tuned") if i < len(answers[n]) else "<td></td>" for n in shown)
        out.append(f"<tr><td>{i + 1}</td><td>{html.escape(row['kind'])}</td><td>{html.escape(row['prompt'])}</td>"
                   f"<td>{html.escape(row['expected'])}</td>{cell(row, 'base')}{tuned}</tr>")
    out += ["</table>", "</body></html>"]
    return "\n".join(out)


def build(revs: list[str], params: Params) -> Path:
    names = revs or [WORKSPACE]
    plots = {title: render_svg(spec) for title, spec in plot_specs(revs).items()}
    metrics = {n: revision_metrics(params, None if n == WORKSPACE else n) for n in names}
    answers = {n: revision_answers(params, None if n == WORKSPACE else n) for n in names}
    target = Path(params.paths.report_dir) / "index.html"
    with atomic_file(target) as fh:
        fh.write(page(revs, plots, metrics, answers))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.report", description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", help="experiments, branches or commits to compare (default: workspace)")
    args = parser.parse_args(argv)
    target = build(args.revs, load_params())
    print(f"report: {target.resolve()}  (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
