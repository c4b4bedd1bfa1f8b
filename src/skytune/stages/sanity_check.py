"""sanity_check: greedy answers of the base and the fine-tuned model, side by side, as DVC metrics.

    python -m skytune.stages.sanity_check      (normally: dvc repro sanity_check)

Prompts: every line of `paths.sanity_prompts` (`{"prompt": ...}`, optional `"expected"`), plus one probe per
identity intent whose expected answer comes from the `identity` params. Both models answer in batches with
greedy decoding. Writes:
- `paths.sanity_results` (CSV): prompt, expected, base and tuned answers, exact match, whether each answer stopped by itself;
- `paths.sanity_metrics` (JSON, a DVC metric): identity exact match (base vs tuned), the fraction of answers that end with the end-of-turn
  token (it catches a model that never stops), mean answer length.
"""

from __future__ import annotations

import csv
import logging
from typing import Any

from skytune import chat_template, identity, models
from skytune.atomic import atomic_file, read_jsonl, write_json
from skytune.generation import Generation, generate_greedy
from skytune.params import Params
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def _answers(model: Any, tokenizer: Any, prompts: list[str], params: Params) -> list[Generation]:
    stops = sorted({tokenizer.eos_token, chat_template.end_of_turn_token(tokenizer)})
    rendered = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return generate_greedy(model, tokenizer, rendered, stop_tokens=stops,
                           max_new_tokens=params.sanity_check.max_new_tokens,
                           batch_size=params.sanity_check.batch_size)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def main(params: Params) -> None:
    from transformers import set_seed

    set_seed(params.base.seed)
    rows = [{"kind": "prompt", "prompt": r["prompt"], "expected": r.get("expected", "")}
            for r in read_jsonl(params.paths.sanity_prompts)]
    if params.identity.enabled:
        who = identity.Identity(params.identity.name, params.identity.creator)
        rows += [{"kind": "identity", "prompt": q, "expected": who.answer(intent)}
                 for intent, q in identity.PROBES.items()]
    prompts = [r["prompt"] for r in rows]

    base = models.BaseModel.load(params.paths.base_model_dir)
    dtype = models.compute_dtype(params.train.compute_dtype)
    base_tokenizer = models.load_tokenizer(base)
    base_model = models.load_full_precision(base.ref, base.revision, dtype)
    models.fit_embeddings(base_model, base_tokenizer)
    answers = {"base": _answers(base_model, base_tokenizer, prompts, params),
               "tuned": _answers(models.load_full_precision(params.paths.merged_dir, None, dtype),
                                 models.load_saved_tokenizer(params.paths.merged_dir), prompts, params)}

    metrics: dict[str, float | int] = {"prompts": len(rows)}
    for name, gens in answers.items():
        for row, gen in zip(rows, gens, strict=True):
            row[f"{name}_answer"] = gen.text
            row[f"{name}_stopped"] = gen.stopped
            row[f"{name}_tokens"] = gen.num_tokens
            row[f"{name}_match"] = bool(row["expected"]) and gen.text == row["expected"]
        probes = [r for r in rows if r["kind"] == "identity"]
        metrics[f"identity_exact_match_{name}"] = _mean([float(r[f"{name}_match"]) for r in probes])
        metrics[f"ends_with_eot_{name}"] = _mean([float(g.stopped) for g in gens])
        metrics[f"mean_answer_tokens_{name}"] = _mean([float(g.num_tokens) for g in gens])
        log.info("%s: identity exact match %.2f, stopped by itself %.2f", name,
                 metrics[f"identity_exact_match_{name}"], metrics[f"ends_with_eot_{name}"])

    with atomic_file(params.paths.sanity_results) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_json(params.paths.sanity_metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
