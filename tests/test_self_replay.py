"""Self-replay: the base's own answers to generic prompts, trained beside the new data (stage self_replay).

The answers are checked against transformers' own `generate`, one prompt at a time with no padding, rendered by the
tokenizer's `apply_chat_template`: not the stage's batched, left-padded generation."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PATHS, REPO, PipelineRun, copy_inputs, run_stages, write_params

from skytune.core.atomic import read_jsonl
from skytune.core.chat import chat_template
from skytune.core.data import replay
from skytune.core.data.invalid import InvalidRecord
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, load_tokenizer, location
from skytune.core.params import ParamsError, load_params
from skytune.stages import ingest, self_replay, to_chat

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Why is the sky blue?"}
ANSWER = {"role": "assistant", "content": "Scattering."}


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "Why is the sky blue?"}, [USER]),
    ({"prompt": "Why is the sky blue?", "system": "Be brief."}, [SYSTEM, USER]),
    ({"prompt": "Why is the sky blue?", "system": ""}, [USER]),
    ({"messages": [SYSTEM, USER, ANSWER]}, [SYSTEM, USER]),
    ({"messages": [USER, ANSWER, USER, ANSWER, ANSWER]}, [USER, ANSWER, USER]),
])
def test_the_prompt_is_the_conversation_up_to_its_last_user_turn(row: dict, expected: list[dict]) -> None:
    assert replay.prompt_messages(row) == expected


@pytest.mark.parametrize(("row", "field"), [
    ({"question": "Why?"}, "<row>"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": "Why?", "system": 3}, "system"),
    ({"messages": "Why?"}, "messages"),
    ({"messages": [{"role": "bot", "content": "Why?"}]}, "messages[0].role"),
    ({"messages": [USER, {"role": "user", "content": None}]}, "messages[1].content"),
    ({"messages": [USER, SYSTEM]}, "messages"),
    ({"messages": [ANSWER]}, "messages"),
])
def test_a_row_with_no_prompt_names_the_field(row: dict, field: str) -> None:
    with pytest.raises(InvalidRecord) as caught:
        replay.prompt_messages(row)
    assert caught.value.field == field


def independent_answers(model_dir: Path, chat_template: str, prompts: list[list[dict]], max_new_tokens: int,
                        stop_tokens: list[str]) -> list[str | None]:
    """transformers' greedy answer to each prompt, alone (no batch, no padding); None where it did not stop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    answers: list[str | None] = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=stop_ids[0])[0, ids.shape[1]:].tolist()
        ends = [i for i, t in enumerate(out) if t in stop_ids]
        answers.append(tokenizer.decode(out[:ends[0]], skip_special_tokens=True).strip() if ends else None)
    return answers


def check_replay(root: Path, *, source: str, stop_tokens: list[str], limit: int | None = None) -> dict:
    """The stage's rows of `source` are the independent answers that stopped, in order, each after its prompt; the
    metrics count the rest as cut. Returns the source's metrics."""
    params = load_params(root / "params.yaml")
    base = json.loads((root / params.paths.base_model_dir / "base_model.json").read_text())
    model_dir = Path(location(BaseModel.load(root / params.paths.base_model_dir)))
    rows = [r for r in read_jsonl(root / params.paths.ingested_dir / f"{source}.jsonl")
            if isinstance(r["row"].get("prompt"), str) and r["row"]["prompt"].strip()][:limit]
    prompts = [[{"role": "user", "content": r["row"]["prompt"]}] for r in rows]
    expected = independent_answers(model_dir, base["chat_template"], prompts, params.self_replay.max_new_tokens,
                                   stop_tokens)
    written = {r["line"]: r["row"]["messages"] for r in read_jsonl(root / params.paths.replay_dir / f"{source}.jsonl")}
    for row, prompt, answer in zip(rows, prompts, expected, strict=True):
        if answer:
            assert written[row["line"]] == [*prompt, {"role": "assistant", "content": answer}]
        else:
            assert row["line"] not in written
    counts = json.loads((root / params.paths.replay_metrics).read_text())["sources"][source]
    if limit is None:
        dropped = [d["line"] for d in read_jsonl(root / params.paths.replay_dir / "dropped.jsonl")
                   if d["source"] == source]
        assert dropped == [row["line"] for row, answer in zip(rows, expected, strict=True) if not answer]
        assert counts["answers"] == len(written) == sum(bool(a) for a in expected)
        assert counts["cut"] + counts["empty"] + counts["answers"] == counts["prompts"] == len(rows)
    return counts


def replay_sources(*names: str) -> Callable[[dict], None]:
    """A params edit: self_replay sources `names`, read from `<name>.jsonl`, beside the tiny profile's."""
    return lambda params: params["data"]["sources"].extend(
        {"name": name, "path": f"{name}.jsonl", "format": "self_replay"} for name in names)


def write_prompts(root: Path, name: str, lines: list[str]) -> Path:
    path = root / PATHS.raw_dir / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_sources_answered_as_transformers_generates_each_prompt_alone(pipeline: PipelineRun,
                                                                          tmp_path: Path) -> None:
    """On the built-in model as the pipeline fixture fine-tuned it (a random one never stops): a base that stops on
    some prompts within 8 tokens and runs on in others, which are dropped, and counted. Two sources, so that each
    gets its own answers; a row with no prompt in each, rejected with its file and line."""
    root = copy_inputs(tmp_path)
    merged = str(pipeline.root / PATHS.merged_dir)
    write_params(root, lambda p: (replay_sources("replay_a", "replay_b")(p), p["model"].update(base=merged),
                                  p["self_replay"].update(max_new_tokens=8)))
    shipped = (REPO / PATHS.raw_dir / "replay_prompts.jsonl").read_text().splitlines()
    write_prompts(root, "replay_a", [*shipped[:5], '{"question": "Why?"}', *shipped[5:20]])
    write_prompts(root, "replay_b", [*shipped[20:40], '{"prompt": ""}'])
    run_stages(root, ingest, self_replay, to_chat)
    stops = chat_template.stop_tokens(load_tokenizer(BaseModel.load(root / PATHS.base_model_dir)))
    chat = json.loads((root / PATHS.to_chat_metrics).read_text())
    for name in ("replay_a", "replay_b"):
        counts = check_replay(root, source=name, stop_tokens=stops)
        assert counts["prompts"] == 20 and 0 < counts["answers"] < counts["prompts"], counts
        assert counts["rejected"] == chat["rejected"][name] == 1 and chat["records"][name] == counts["answers"]
    rejects = [r for r in read_jsonl(root / PATHS.chat_dir / "rejects.jsonl")]
    assert [(Path(r["file"]).name, r["line"], r["field"]) for r in rejects] == [
        ("replay_a.jsonl", 6, "<row>"), ("replay_b.jsonl", 21, "prompt")]

    # Over data.max_reject_fraction (0.1): 3 rows with no prompt, beside the prompts the base answered above.
    answered = [json.dumps({"prompt": r["row"]["messages"][-2]["content"]}) for name in ("replay_a", "replay_b")
                for r in read_jsonl(root / PATHS.replay_dir / f"{name}.jsonl")][:5]
    write_prompts(root, "replay_b", [*answered, *['{"question": "Why?"}'] * 3])
    run_stages(root, ingest, self_replay)
    with pytest.raises(SkytuneError, match=rf"source replay_b: 3 of {len(answered) + 3} rows rejected \(3 before "
                                           "conversion: see "):
        run_stages(root, to_chat)


def test_a_source_the_base_answers_none_of_is_an_error(tmp_path: Path) -> None:
    """The random built-in model never stops within 2 tokens: the source would train on nothing."""
    root = copy_inputs(tmp_path)
    write_params(root, lambda p: (replay_sources("replay")(p), p["self_replay"].update(max_new_tokens=2)))
    write_prompts(root, "replay", ['{"prompt": "Why?"}', '{"prompt": "How?"}'])
    run_stages(root, ingest)
    with pytest.raises(SkytuneError, match=r"source replay: the base answered none of its 2 prompts within "
                                           r"self_replay.max_new_tokens=2 tokens \(2 cut, 0 empty\)"):
        run_stages(root, self_replay)


def test_on_invalid_error_stops_at_the_first_row_with_no_prompt(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    write_params(root, lambda p: (replay_sources("replay")(p), p["data"].update(on_invalid="error")))
    path = write_prompts(root, "replay", ['{"prompt": "Why?"}', ('{"messages": [{"role": "assistant", "content": '
                                          '"Hi"}]}'), '{"question": "How?"}'])
    run_stages(root, ingest)
    where = path.relative_to(root)
    with pytest.raises(SkytuneError, match=rf"^{where}:2: field messages: no user turn for the base to answer: "
                                           r"\(fix the row, or set data.on_invalid: skip"):
        run_stages(root, self_replay)


def test_to_chat_before_self_replay_says_what_to_run(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    write_params(root, replay_sources("replay"))
    write_prompts(root, "replay", ['{"prompt": "Why?"}'])
    run_stages(root, ingest)
    with pytest.raises(SkytuneError, match=r"source replay \(format self_replay\): the base's answers are not in "
                                           r"data/replay; run the self_replay stage first"):
        run_stages(root, to_chat)


def test_a_self_replay_source_takes_no_rewriting_keys(tmp_path: Path) -> None:
    write_params(tmp_path, lambda p: p["data"]["sources"].append(
        {"name": "replay", "path": "r.jsonl", "format": "self_replay", "replace": {"{{name}}": "${identity.name}"}}))
    with pytest.raises(ParamsError, match=r"format self_replay takes no `replace`: the base answers the prompts"):
        load_params(tmp_path / "params.yaml")


def test_no_self_replay_source_loads_no_model(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)  # the tiny profile has no self_replay source
    run_stages(root, ingest, self_replay)
    assert json.loads((root / PATHS.replay_metrics).read_text())["engine"] is None
    assert sorted(p.name for p in (root / PATHS.replay_dir).iterdir()) == ["dropped.jsonl", "rejects.jsonl",
                                                                         "summary.json"]


def _words(text: str) -> str:
    """A prompt as its words: case, punctuation and the replay prompts' length hints aside."""
    text = re.sub(r"^(in one sentence|in two sentences|briefly|in a few words),\s*|\s*keep it short\.$", "",
                  text.lower())
    return " ".join(re.findall(r"[a-z0-9']+", text))


def test_the_replay_prompts_and_preference_pairs_are_none_of_the_evaluated_items() -> None:
    """Replay teaches the base's own answers, the preference pairs an answer's length: none of their prompts may be a
    probe, a sanity prompt, a general-text prompt or a benchmark question, or the scores would measure the training
    data rather than what was kept."""
    replayed = {_words(r["prompt"]) for r in read_jsonl(REPO / PATHS.raw_dir / "replay_prompts.jsonl")}
    paired = {_words(r["prompt"]) for r in read_jsonl(REPO / PATHS.raw_dir / "one_sentence_pairs.jsonl")}
    assert len(paired) == 48 and paired.isdisjoint(replayed)
    evaluated = {_words(r["prompt"]) for name in (PATHS.retained_prompts, PATHS.sanity_prompts, PATHS.general_prompts)
                 for r in read_jsonl(REPO / name)}
    evaluated |= {_words(r["question"]) for path in (REPO / PATHS.eval_tasks_dir).glob("*/*.jsonl")
                  for r in read_jsonl(path)}
    assert len(replayed) == 119 and len(evaluated) > 200
    assert replayed.isdisjoint(evaluated), sorted(replayed & evaluated)
    assert paired.isdisjoint(evaluated), sorted(paired & evaluated)


def test_a_base_that_cannot_read_its_template_is_refused_by_name(tmp_path: Path) -> None:
    """ChatML on a base without its tokens: the base's answers through that template would be noise, not replay."""
    from skytune.core.models.base import BaseModel
    from skytune.stages import self_replay

    BaseModel("local", "m", str(tmp_path), None, "t", "auto", None, ["<|im_start|>", "<|im_end|>"]).save(tmp_path)
    with pytest.raises(SkytuneError, match=r"its vocabulary lacks \['<\|im_start\|>', '<\|im_end\|>'\]"):
        self_replay._answers(str(tmp_path), [[{"role": "user", "content": "hi"}]], None)
