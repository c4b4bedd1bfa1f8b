"""evaluate: benchmark scores and forgetting, base vs control vs tuned, as DVC metrics.

    python -m skytune.stages.evaluate      (normally: dvc repro evaluate)

Scores the merged tuned model on `evaluate.tasks` with lm-eval exactly as evaluate_base scored the base (same tasks,
settings, seed and lm-eval version), and its perplexity on the base's general text. Writes:
- `paths.eval_metrics` (a DVC metric, so `dvc exp show` has a column for each): per task and metric the base,
  control (evaluate_base's: the base as the tuned model is merged onto it) and tuned scores, the `delta` from the
  base split into `quantization` (control - base) and `training` (tuned - control), the paired test of training's
  change on the same items (`p_value`, the `ci_low`..`ci_high` interval at 1 - `evaluate.alpha`, which `test`) and
  of quantization's (`quantization_p_value`), and `forgot` (training's drop past `evaluate.max_regression`, or for
  perplexities past `evaluate.max_perplexity_increase`, and significant at `evaluate.alpha`); the same for the
  general-text perplexity, tested text by text; `control`, what the control was; `forgetting` (any flagged) and
  `regressions` (how many); the engine, lm-eval's version, and the examples scored per task.
- `paths.eval_plot` (a DVC plot): base, control and tuned per task and metric.
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
from skytune.core.evaluation import (
    forgetting,
    general_text,
    generation,
    harness,
    scoring,
    significance,
)
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer
from skytune.core.params import Params
from skytune.core.vllm_server import Vllm
from skytune.stages import run_stage

log = logging.getLogger(__name__)

MODELS = ("base", "control", "tuned")


def main(params: Params) -> None:
    from transformers import set_seed

    set_seed(params.base.seed)
    paths, ev = params.paths, params.evaluate
    vllm = Vllm.from_params(params.vllm, paths.vllm_env)
    base_json, control_json = _base_scores(paths.base_scores_dir,
                                           generation.resolve_engine(ev.engine, vllm, "evaluate.engine"))
    start = time.monotonic()
    tokenizer = load_saved_tokenizer(paths.merged_dir)
    tuned, model = _score_tuned(params, tokenizer, vllm)
    limits = forgetting.Limits(ev.max_regression, ev.max_perplexity_increase, ev.alpha, params.base.seed)
    base, control = harness.Scores.from_json(base_json), harness.Scores.from_json(control_json)
    metrics: dict[str, Any] = {"engine": tuned.engine, "lm_eval": tuned.lm_eval, "examples": tuned.examples,
                               "control": control_json["model"],
                               "tasks": forgetting.compare(base, control, tuned, limits)}
    flagged = forgetting.forgotten(metrics["tasks"])
    texts = read_jsonl(Path(paths.base_scores_dir) / general_text.FILE)
    if texts:
        metrics["general_text"] = _general_text(model, tokenizer, texts, base_json, control_json, limits)
        flagged += ["general_text.perplexity"] if metrics["general_text"]["perplexity"]["forgot"] else []
    metrics |= {"forgetting": bool(flagged), "regressions": len(flagged), "seconds_base": base_json.get("seconds"),
                "seconds_control": control_json.get("seconds", 0.0),
                "seconds_tuned": round(time.monotonic() - start, 1)}
    write_json(paths.eval_metrics, metrics)
    _write_plot(paths.eval_plot, metrics["tasks"])
    _report(metrics, flagged, params)


def _score_tuned(params: Params, tokenizer: Any, vllm: Vllm) -> tuple[harness.Scores, Any]:
    """The merged tuned model's lm-eval scores, as evaluate_base scored the base, and the model."""
    paths, dtype = params.paths, compute_dtype(params.train.compute_dtype)
    return harness.score(lambda: load_full_precision(paths.merged_dir, None, dtype), tokenizer,
                         source=paths.merged_dir, revision=None, ev=params.evaluate, vllm=vllm,
                         tasks_dir=Path(paths.eval_tasks_dir), pin_file=Path(paths.lm_eval_pin),
                         dtype=str(dtype).removeprefix("torch."), seed=params.base.seed)


def _general_text(model: Any, tokenizer: Any, texts: list[dict[str, Any]], base: dict[str, Any],
                  control: dict[str, Any], limits: forgetting.Limits) -> dict[str, Any]:
    """The tuned model's perplexity on the base's general text against the control's and the base's, tested text by
    text."""
    losses = general_text.losses(model, tokenizer, texts)
    ppl, tokens = scoring.perplexity_of(losses)
    before, reference = base["general_text"], control["general_text"]
    tests = [significance.compare(a, b, significance.perplexity_delta, alpha=limits.alpha, seed=limits.seed)
             for a, b in ((reference["losses"], losses), (before["losses"], reference["losses"]))]
    return {"perplexity": forgetting.entry(before["perplexity"], reference["perplexity"], ppl, False, limits, *tests),
            "tokens": tokens}


def _base_scores(base_dir: str, engine: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """evaluate_base's scores of the base and of the control (the base's own where the base is the control), once
    they are known to come from the engine this machine scores on."""
    scores_file, control_file = (Path(base_dir) / name for name in (harness.SCORES_FILE, harness.CONTROL_FILE))
    if not scores_file.is_file() or not control_file.is_file():
        raise SkytuneError(f"{scores_file} or {control_file.name} not found: run the evaluate_base stage first "
                           "(dvc repro evaluate_base)")
    base_json = json.loads(scores_file.read_text(encoding="utf-8"))
    if base_json.get("engine") != engine:  # evaluate.engine: auto resolves per machine; the base may be cached
        raise SkytuneError(f"{scores_file}: the base was scored on the {base_json.get('engine')} engine, and this "
                           f"machine scores on {engine}: the deltas would mix engines. Set evaluate.engine: "
                           f"{base_json.get('engine')}, or score the base here: dvc repro -f evaluate_base")
    control = json.loads(control_file.read_text(encoding="utf-8"))
    if control["model"] == harness.BASE_IS_CONTROL:
        control = base_json | {"model": harness.BASE_IS_CONTROL, "seconds": 0.0}
    return base_json, control


def _report(metrics: dict[str, Any], flagged: list[str], params: Params) -> None:
    """Each score in the log; a flagged regression warned about, or failing the stage when asked."""
    ev = params.evaluate
    for task, scores in metrics["tasks"].items():
        for metric, e in scores.items():
            log.info("%s %s: base %s -> control %s -> tuned %s (training %+.4f, p=%s, %s)%s", task, metric,
                     e["base"], e["control"], e["tuned"], e["training"], e.get("p_value"), e["test"],
                     "  FORGOT" if e["forgot"] else "")
    if flagged:
        message = (f"forgetting: {', '.join(flagged)} regressed past evaluate.max_regression "
                   f"({ev.max_regression}) / max_perplexity_increase ({ev.max_perplexity_increase}), significantly "
                   f"(p < evaluate.alpha, {ev.alpha}); see {params.paths.eval_metrics}")
        if ev.fail_on_regression:
            raise SkytuneError(f"{message} (evaluate.fail_on_regression is true)")
        log.warning(message)


def _write_plot(path: str, tasks: dict[str, Any]) -> None:
    """Three rows per task and metric, the base's, the control's and the tuned model's (a DVC plot: dvc.yaml's
    benchmark chart, one bar each)."""
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["score", "value"])
        writer.writerows([f"{task} {metric} ({model})", e[model]]
                         for task, metrics in tasks.items() for metric, e in metrics.items() for model in MODELS)


if __name__ == "__main__":
    run_stage(main)
