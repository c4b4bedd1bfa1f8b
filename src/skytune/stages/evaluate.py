"""evaluate: benchmark scores and forgetting, base vs tuned, as DVC metrics.

    python -m skytune.stages.evaluate      (normally: dvc repro evaluate)

Scores the merged tuned model on `evaluate.tasks` with lm-eval exactly as evaluate_base scored the base (same tasks,
settings, seed and lm-eval version), and its perplexity on the base's general text. Writes:
- `paths.eval_metrics` (a DVC metric, so `dvc exp show` has a column for each): per task and metric the base, tuned
  and delta scores and `forgot` (a regression past `evaluate.max_regression`, or for perplexities past
  `evaluate.max_perplexity_increase`); the same for the general-text perplexity; `forgetting` (any flagged) and
  `regressions` (how many); the engine, lm-eval's version, and the examples scored per task.
- `paths.eval_plot` (a DVC plot): base vs tuned per task and metric.
With `evaluate.fail_on_regression`, a flagged regression then fails the stage.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from skytune.core.atomic import atomic_file, read_jsonl, write_json
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import forgetting, general_text, generation, harness
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer
from skytune.core.params import Params
from skytune.core.vllm_server import Vllm
from skytune.stages import run_stage

log = logging.getLogger(__name__)

MODELS = ("base", "tuned")


def main(params: Params) -> None:
    from transformers import set_seed

    set_seed(params.base.seed)
    paths, ev = params.paths, params.evaluate
    vllm = Vllm.from_params(params.vllm, paths.vllm_env)
    base_json = _base_scores(paths.base_scores_dir, generation.resolve_engine(ev.engine, vllm, "evaluate.engine"))
    base = harness.Scores.from_json(base_json)
    start = time.monotonic()
    tokenizer = load_saved_tokenizer(paths.merged_dir)
    dtype = compute_dtype(params.train.compute_dtype)
    tuned, model = harness.score(lambda: load_full_precision(paths.merged_dir, None, dtype), tokenizer,
                                 source=paths.merged_dir, revision=None, ev=ev, vllm=vllm,
                                 tasks_dir=Path(paths.eval_tasks_dir),
                                 pin_file=Path(paths.lm_eval_pin), dtype=str(dtype).removeprefix("torch."),
                                 seed=params.base.seed)
    limits = {"max_regression": ev.max_regression, "max_increase": ev.max_perplexity_increase}
    metrics: dict[str, Any] = {"engine": tuned.engine, "lm_eval": tuned.lm_eval, "examples": tuned.examples,
                               "tasks": forgetting.compare(base, tuned, **limits)}
    flagged = forgetting.forgotten(metrics["tasks"])
    texts = read_jsonl(Path(paths.base_scores_dir) / general_text.FILE)
    if texts:
        ppl, tokens = general_text.perplexity(model, tokenizer, texts, batch_size=ev.batch_size)
        entry = forgetting.entry(base_json["general_text"]["perplexity"], ppl, higher_is_better=False, **limits)
        metrics["general_text"] = {"perplexity": entry, "tokens": tokens}
        flagged += ["general_text.perplexity"] if entry["forgot"] else []
    metrics |= {"forgetting": bool(flagged), "regressions": len(flagged),
                "seconds_base": base_json.get("seconds"), "seconds_tuned": round(time.monotonic() - start, 1)}
    write_json(paths.eval_metrics, metrics)
    _write_plot(paths.eval_plot, metrics["tasks"])
    _report(metrics, flagged, params)


def _base_scores(base_dir: str, engine: str) -> dict[str, Any]:
    """evaluate_base's scores, once they are known to come from the engine this machine scores on."""
    scores_file = Path(base_dir) / harness.SCORES_FILE
    if not scores_file.is_file():
        raise SkytuneError(f"{scores_file} not found: run the evaluate_base stage first (dvc repro evaluate_base)")
    base_json = json.loads(scores_file.read_text(encoding="utf-8"))
    if base_json.get("engine") != engine:  # evaluate.engine: auto resolves per machine; the base may be cached
        raise SkytuneError(f"{scores_file}: the base was scored on the {base_json.get('engine')} engine, and this "
                           f"machine scores on {engine}: the deltas would mix engines. Set evaluate.engine: "
                           f"{base_json.get('engine')}, or score the base here: dvc repro -f evaluate_base")
    return base_json


def _report(metrics: dict[str, Any], flagged: list[str], params: Params) -> None:
    """Each score in the log; a flagged regression warned about, or failing the stage when asked."""
    ev = params.evaluate
    for task, scores in metrics["tasks"].items():
        for metric, e in scores.items():
            log.info("%s %s: base %s -> tuned %s (%+.4f)%s", task, metric, e["base"], e["tuned"], e["delta"],
                     "  FORGOT" if e["forgot"] else "")
    if flagged:
        message = (f"forgetting: {', '.join(flagged)} regressed past evaluate.max_regression "
                   f"({ev.max_regression}) / max_perplexity_increase ({ev.max_perplexity_increase}); see "
                   f"{params.paths.eval_metrics}")
        if ev.fail_on_regression:
            raise SkytuneError(f"{message} (evaluate.fail_on_regression is true)")
        log.warning(message)


def _write_plot(path: str, tasks: dict[str, Any]) -> None:
    """Two rows per task and metric, the base's and the tuned model's (a DVC plot: dvc.yaml's benchmark chart, one
    bar each)."""
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["score", "value"])
        writer.writerows([f"{task} {metric} ({model})", e[model]]
                         for task, metrics in tasks.items() for metric, e in metrics.items() for model in MODELS)


if __name__ == "__main__":
    run_stage(main)
