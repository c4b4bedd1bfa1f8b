"""sanity_check: greedy answers of the base and the fine-tuned model, side by side, as DVC metrics and plots.

    python -m skytune.stages.sanity_check      (normally: dvc repro sanity_check)

Prompts: every line of `paths.sanity_prompts` (`{"prompt": ...}` or `{"messages": [...]}`, optional
`"expected"`), one probe per identity intent (expected answer from the `identity` params), the retained-knowledge
probes of `paths.retained_prompts` (`{"prompt", "accept": [...]}`: general questions with short known answers, right
when the answer holds one of `accept`), and the first `sanity_check.val_records` held-out val conversations
(expected: their last assistant turn). Both models answer
with seeded greedy decoding on `sanity_check.engine` (vLLM's server, from its own environment, on a GPU node; else
transformers' batched generate), fed the same token ids either way. Writes:
- `paths.sanity_results` (CSV): each prompt with the expected, base and tuned answers, exact matches, lengths,
  and whether each answer stopped by itself;
- `paths.sanity_report` (markdown): the metrics and the answers side by side;
- `paths.sanity_metrics` (a DVC metric): the engine (and `base_engine: transformers` where vLLM cannot take the
  base's prompts: a template's tokens the base lacks, `generation.engine_for_base`); val perplexity (over the
  tokens training scored, on the first `sanity_check.perplexity_records` val conversations); identity and val exact
  match; the retained probes answered right, and `retained`: of the probes the base answers right, the fraction the
  tuned model still answers right (forgetting), on the probes' held-out half (`retained_dev` on the dev half, which
  a recipe may be tuned on; `core.evaluation.holdout`); mean answer length; the fraction of answers that end with
  the end-of-turn token (it catches a model that never stops) - base vs tuned;
- `paths.sanity_plot` (a DVC plot): answer length per prompt, base vs tuned.
"""

from __future__ import annotations

import csv
import logging
import math
from typing import Any

from skytune.core.atomic import atomic_file, read_jsonl, write_json
from skytune.core.chat import chat_template, tokenization
from skytune.core.data import identity
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import generation, holdout, scoring
from skytune.core.models.base import BaseModel, load_tokenizer, location
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import (
    fit_embeddings,
    load_full_precision,
    load_saved_tokenizer,
)
from skytune.core.params import Params
from skytune.core.vllm_server import Vllm
from skytune.stages import run_stage

log = logging.getLogger(__name__)

MODELS = ("base", "tuned")


def _prompt_rows(params: Params) -> list[dict[str, Any]]:
    """Every prompt to answer: `{"kind", "id", "messages", "prompt", "expected"}`."""
    rows = []
    for line, r in enumerate(read_jsonl(params.paths.sanity_prompts), 1):
        if ("prompt" in r) == ("messages" in r):
            raise SkytuneError(f"{params.paths.sanity_prompts}:{line}: give exactly one of 'prompt' and 'messages'")
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        rows.append({"kind": "prompt", "id": f"prompt-{line}", "messages": messages,
                     "expected": r.get("expected", "")})
    for line, r in enumerate(read_jsonl(params.paths.retained_prompts), 1):
        accept = r.get("accept")
        if not isinstance(r.get("prompt"), str) or not accept or not all(isinstance(a, str) for a in accept):
            raise SkytuneError(f"{params.paths.retained_prompts}:{line}: give 'prompt' (text) and 'accept' (a list of "
                             "the answers that count as right)")
        rows.append({"kind": "retained", "id": f"retained-{line}", "accept": accept, "expected": " | ".join(accept),
                     "messages": [{"role": "user", "content": r["prompt"]}], "half": holdout.half(r["prompt"])})
    if params.identity.enabled:
        who = identity.Identity(params.identity.name, params.identity.creator)
        rows += [{"kind": "identity", "id": f"identity-{intent}", "expected": who.answer(intent),
                  "messages": [{"role": "user", "content": q}]} for intent, q in identity.PROBES.items()]
    for r in read_jsonl(params.paths.val_file)[: params.sanity_check.val_records]:
        rows.append({"kind": "val", "id": r["id"], "messages": r["messages"][:-1],
                     "expected": r["messages"][-1]["content"]} | ({"tools": r["tools"]} if r.get("tools") else {}))
    for row in rows:
        users = [m["content"] for m in row["messages"] if m.get("role") == "user"]
        if not users:
            raise SkytuneError(f"sanity prompt {row['id']} ({params.paths.sanity_prompts} or {params.paths.val_file}): "
                             "no user message to answer")
        row["prompt"] = users[-1]
    return rows


def _evaluate(source: str, revision: str | None, tokenizer: Any, rows: list[dict[str, Any]], val: list[dict],
              engine: str, vllm: Vllm, params: Params) -> tuple[list[generation.Generation], float, int]:
    """One model's answers to `rows` and its perplexity on `val` (nan over 0 tokens when `val` is empty). The model
    is loaded here where transformers computes either; vLLM's server loads its own copy, after this one is gone."""
    dtype = compute_dtype(params.train.compute_dtype)
    stops = chat_template.stop_tokens(tokenizer)
    prompts = [chat_template.render_prompt(tokenizer, r["messages"], r.get("tools")) for r in rows]
    sc = params.sanity_check
    answers: list[generation.Generation] = []
    ppl, tokens = math.nan, 0
    if val or engine == "transformers":
        model = load_full_precision(source, revision, dtype)
        fit_embeddings(model, tokenizer)
        if val:
            encoded = tokenization.Encoder(tokenizer, params.train.loss).encode(val)
            ppl, tokens = scoring.perplexity(model, encoded, pad_id=tokenizer.pad_token_id, batch_size=sc.batch_size)
        if engine == "transformers":
            answers = generation.generate_greedy(model, tokenizer, prompts, stop_tokens=stops,
                                                 max_new_tokens=sc.max_new_tokens, batch_size=sc.batch_size)
        del model
        generation.release_memory()
    if engine == "vllm":
        answers = generation.generate_greedy_vllm(vllm, source, revision, tokenizer, prompts, stop_tokens=stops,
                                                  max_new_tokens=sc.max_new_tokens, dtype=dtype,
                                                  seed=params.base.seed)
    return answers, ppl, tokens


def _retained(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Forgetting: of the retained probes the base answers right, the fraction the tuned model still answers right;
    on the held-out half (`retained`, what the metrics report) and on the dev half (`retained_dev`, what a recipe
    may be tuned on)."""
    metrics: dict[str, Any] = {}
    for half, suffix in ((holdout.HELDOUT, ""), (holdout.DEV, "_dev")):
        known = [r for r in rows if r["kind"] == "retained" and r["half"] == half and r["base_match"]]
        if known:
            metrics |= {f"retained{suffix}": scoring.mean([float(r["tuned_match"]) for r in known]),
                        f"retained{suffix}_probes_base_correct": len(known)}
            log.info("retained (%s half): the tuned model still answers %d of the %d probes the base answers right",
                     half, sum(r["tuned_match"] for r in known), len(known))
    return metrics


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>") or " "


def report_markdown(rows: list[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """The metrics (base vs tuned) and every answer side by side."""
    keys = sorted({k.removesuffix("_base") for k in metrics if k.endswith("_base")})
    lines = ["# Sanity check: base vs fine-tuned", "",
             f"Engine: {metrics['engine']}. {metrics['prompts']} prompts, greedy decoding.", "",
             "| metric | base | tuned |", "|---|---|---|"]
    lines += [f"| {k} | {metrics[f'{k}_base']} | {metrics[f'{k}_tuned']} |" for k in keys]
    if "retained" in metrics:
        kept = (f"Retained knowledge (held-out probes): of the {metrics['retained_probes_base_correct']} retained "
                f"probes the base answers right, the tuned model still answers {metrics['retained']:.0%} right.")
        lines += ["", kept]
    lines += ["", "Answers that did not stop by themselves (ran to max_new_tokens) end with ⏵.", "",
              "| # | kind | prompt | expected | base | tuned |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        answers = [_cell(r[f"{m}_answer"]) + ("" if r[f"{m}_stopped"] else " ⏵") for m in MODELS]
        lines.append(f"| {i} | {r['kind']} | {_cell(r['prompt'])} | {_cell(r['expected'])} | "
                     f"{answers[0]} | {answers[1]} |")
    return "\n".join(lines) + "\n"


def main(params: Params) -> None:
    from transformers import set_seed

    set_seed(params.base.seed)
    paths, sc = params.paths, params.sanity_check
    rows = _prompt_rows(params)
    val = read_jsonl(paths.val_file)[: sc.perplexity_records]
    vllm = Vllm.from_params(params.vllm, paths.vllm_env)
    engine = generation.resolve_engine(sc.engine, vllm)
    log.info("engine %s (sanity_check.engine: %s); %d prompts, %d val conversations for perplexity",
             engine, sc.engine, len(rows), len(val))
    base = BaseModel.load(paths.base_model_dir)
    sources = {"base": (location(base), base.revision, load_tokenizer(base)),
               "tuned": (paths.merged_dir, None, load_saved_tokenizer(paths.merged_dir))}
    metrics: dict[str, Any] = {"engine": engine, "prompts": len(rows)}
    engines = {"base": generation.engine_for_base(engine, base.added_tokens), "tuned": engine}
    if engines["base"] != engine:
        metrics["base_engine"] = engines["base"]
    for name, (source, revision, tokenizer) in sources.items():
        answers, ppl, tokens = _evaluate(source, revision, tokenizer, rows, val, engines[name], vllm, params)
        metrics |= _score(name, rows, answers)
        metrics[f"val_perplexity_{name}"] = round(ppl, 4) if tokens else None
        metrics["val_perplexity_tokens"] = tokens
        log.info("%s: %s", name, {k: v for k, v in metrics.items() if k.endswith(f"_{name}")})
    metrics.update(_retained(rows))
    _write_results(params, rows, metrics)


def _score(name: str, rows: list[dict[str, Any]], answers: list[generation.Generation]) -> dict[str, Any]:
    """Put model `name`'s answers into `rows` (answer, stopped, tokens, match) and return its answer metrics."""
    metrics: dict[str, Any] = {}
    for row, gen in zip(rows, answers, strict=True):
        row[f"{name}_answer"] = gen.text
        row[f"{name}_stopped"] = gen.stopped
        row[f"{name}_tokens"] = gen.num_tokens
        row[f"{name}_match"] = (scoring.contains_answer(gen.text, row["accept"]) if "accept" in row else
                                bool(row["expected"]) and gen.text == row["expected"].strip())
    for kind in ("identity", "val"):
        matched = [float(r[f"{name}_match"]) for r in rows if r["kind"] == kind]
        if matched:
            metrics[f"{kind}_exact_match_{name}"] = scoring.mean(matched)
    retained = [float(r[f"{name}_match"]) for r in rows if r["kind"] == "retained" and r["half"] == holdout.HELDOUT]
    if retained:
        metrics[f"retained_correct_{name}"] = scoring.mean(retained)
    for key, value in scoring.answer_stats(answers).items():
        metrics[f"{key}_{name}"] = value
    return metrics


def _write_results(params: Params, rows: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    paths = params.paths
    columns = ["kind", "id", "half", "prompt", "expected"] + [f"{m}_{f}" for m in MODELS
                                                      for f in ("answer", "stopped", "tokens", "match")]
    with atomic_file(paths.sanity_results) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_file(paths.sanity_plot) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["prompt", "kind", "base_tokens", "tuned_tokens"])
        writer.writerows([i, r["kind"], r["base_tokens"], r["tuned_tokens"]] for i, r in enumerate(rows, 1))
    with atomic_file(paths.sanity_report) as fh:
        fh.write(report_markdown(rows, metrics))
    write_json(paths.sanity_metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
