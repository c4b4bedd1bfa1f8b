"""self_replay: the base model's own answers to the prompts of every `self_replay` source (self-distillation).

    python -m skytune.stages.self_replay      (normally: dvc repro self_replay)

Trained beside the new data, text the base wrote itself holds the tuned model near what the base could already do,
without the base's training data (replay of the model's own outputs, as in self-distillation fine-tuning). The base
answers each prompt once, greedily, through the chat template training uses, on `self_replay.engine` (the same token
ids and stop tokens on either engine). Writes `paths.replay_dir`:
- `<source>.jsonl`: one `{"file", "line", "row": {"messages": [..., answer]}}` per answered prompt, in ingest's
  shape, which to_chat reads as format `messages`;
- `rejects.jsonl`: rows with no prompt to answer (file, line, field, reason), which to_chat counts with the source's;
- `dropped.jsonl`: the prompts whose answers were dropped (source, file, line, reason: cut or empty);
- `summary.json`: the counts of `paths.replay_metrics`, per source (to_chat counts the dropped answers' prompts in a
  source's rows when it judges its reject fraction);
and `paths.replay_metrics`: per source the prompts, the answers kept, and those cut at `self_replay.max_new_tokens`
(dropped: an answer cut short would teach the model to stop mid-sentence), and the empty ones (dropped). A source of
which no answer is kept is an error; `data.on_invalid: error` stops at the first row with no prompt. With no such
source it loads nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skytune.core.atomic import atomic_dir, iter_jsonl, write_json, write_jsonl
from skytune.core.chat import chat_template
from skytune.core.data import replay
from skytune.core.data.invalid import InvalidRecord
from skytune.core.data.records import REJECTS_FILE, SUMMARY_FILE
from skytune.core.data.sources import Reject
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import generation
from skytune.core.models.base import BaseModel, load_tokenizer, location
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import fit_embeddings, load_full_precision
from skytune.core.params import Params
from skytune.core.vllm_server import Vllm
from skytune.stages import run_stage

log = logging.getLogger(__name__)

DROPPED_FILE = "dropped.jsonl"  # the prompts whose answers were dropped: source, file, line, reason (cut, empty)
GREEDY_SEED = 0  # greedy decoding draws nothing; vLLM's server takes a seed all the same


@dataclass(frozen=True)
class Answering:
    """How the base answers: every setting the answers depend on, read whether a source asks for answers or not (a
    change of any re-runs the stage, as dvc.yaml declares)."""

    engine: str
    max_new_tokens: int
    batch_size: int
    dtype: Any
    vllm: Vllm

    @classmethod
    def from_params(cls, params: Params) -> Answering:
        settings = params.self_replay
        return cls(settings.engine, settings.max_new_tokens, settings.batch_size,
                   compute_dtype(params.train.compute_dtype), Vllm.from_params(params.vllm, params.paths.vllm_env))


def main(params: Params) -> None:
    start = time.monotonic()
    how = Answering.from_params(params)
    prompts, rejects = _prompts(params, params.data.on_invalid)
    asked = [messages for pairs in prompts.values() for _, messages in pairs]
    answers, engine = _answers(params.paths.base_model_dir, asked, how) if asked else ([], None)
    counts: dict[str, dict[str, int]] = {}
    dropped: list[dict[str, Any]] = []
    with atomic_dir(params.paths.replay_dir) as out:
        for name, pairs in prompts.items():
            mine, answers = answers[:len(pairs)], answers[len(pairs):]
            kept = []
            for (item, messages), answer in zip(pairs, mine, strict=True):
                if answer.stopped and answer.text:
                    kept.append({"file": item["file"], "line": item["line"],
                                 "row": replay.answered(messages, answer.text)})
                else:
                    dropped.append({"source": name, "file": item["file"], "line": item["line"],
                                    "reason": "empty" if answer.stopped else "cut"})
            counts[name] = _counts(name, pairs, kept, dropped, rejects, how.max_new_tokens)
            write_jsonl(out / f"{name}.jsonl", kept)
        write_jsonl(out / REJECTS_FILE, rejects)
        write_jsonl(out / DROPPED_FILE, dropped)
        write_json(out / SUMMARY_FILE, counts)
    write_json(params.paths.replay_metrics, {"engine": engine, "sources": counts,
                                             "seconds": round(time.monotonic() - start, 1)})


def _prompts(params: Params, on_invalid: str) -> tuple[dict[str, list[tuple[dict[str, Any], list[dict[str, str]]]]],
                                                       list[dict]]:
    """Per self_replay source, its ingested rows and the conversation each asks; and the rows that ask none
    (`data.on_invalid: error` stops at the first)."""
    prompts: dict[str, list[tuple[dict[str, Any], list[dict[str, str]]]]] = {}
    rejects: list[dict[str, Any]] = []
    for name in [s.name for s in params.data.sources if s.format == "self_replay"]:
        prompts[name] = []
        for item in iter_jsonl(Path(params.paths.ingested_dir) / f"{name}.jsonl"):
            try:
                prompts[name].append((item, replay.prompt_messages(item["row"])))
            except InvalidRecord as exc:
                if on_invalid == "error":
                    raise SkytuneError(f"{item['file']}:{item['line']}: field {exc}: (fix the row, or set "
                                       "data.on_invalid: skip to reject it)") from exc
                rejects.append(Reject(item["file"], item["line"], exc.field, exc.reason, exc.detail).as_dict(name))
    return prompts, rejects


def _counts(name: str, pairs: list, kept: list, dropped: list[dict], rejects: list[dict],
            max_new_tokens: int) -> dict[str, int]:
    """A source's counts; a source of which the base answered no prompt is an error (it would train on nothing)."""
    mine = [d for d in dropped if d["source"] == name]
    cut = sum(d["reason"] == "cut" for d in mine)
    if pairs and not kept:
        raise SkytuneError(f"source {name}: the base answered none of its {len(pairs)} prompts within "
                           f"self_replay.max_new_tokens={max_new_tokens} tokens ({cut} cut, {len(mine) - cut} "
                           "empty); raise self_replay.max_new_tokens, or ask for shorter answers")
    log.info("source %s: the base answered %d of %d prompts within %d tokens (%d cut, dropped)", name, len(kept),
             len(pairs), max_new_tokens, cut)
    return {"prompts": len(pairs), "answers": len(kept), "cut": cut, "empty": len(mine) - cut,
            "rejected": sum(r["source"] == name for r in rejects)}


def _answers(base_dir: str, conversations: list[list[dict[str, str]]],
             how: Answering) -> tuple[list[generation.Generation], str]:
    """The base's greedy answers to `conversations`, rendered by the chat template training uses; the engine used."""
    base = BaseModel.load(base_dir)
    if base.added_tokens:
        raise SkytuneError(f"a self_replay source replays the base's own answers through the chat template, and this "
                           f"base cannot read it: its vocabulary lacks {base.added_tokens} (model.chat_template). "
                           "Remove the self_replay sources from data.sources, or use a template the base knows")
    tokenizer = load_tokenizer(base)
    engine = generation.resolve_engine(how.engine, how.vllm, "self_replay.engine")
    rendered = [chat_template.render_prompt(tokenizer, messages) for messages in conversations]
    stops = chat_template.stop_tokens(tokenizer)
    log.info("%d prompts, engine %s (self_replay.engine: %s)", len(rendered), engine, how.engine)
    if engine == "vllm":
        return generation.generate_greedy_vllm(how.vllm, location(base), base.revision, tokenizer, rendered,
                                               stop_tokens=stops, max_new_tokens=how.max_new_tokens,
                                               dtype=how.dtype, seed=GREEDY_SEED), engine
    model = load_full_precision(location(base), base.revision, how.dtype)
    fit_embeddings(model, tokenizer)
    return generation.generate_greedy(model, tokenizer, rendered, stop_tokens=stops,
                                      max_new_tokens=how.max_new_tokens, batch_size=how.batch_size), engine


if __name__ == "__main__":
    run_stage(main)
