"""Reasoning traces: every common way of writing one becomes the assistant's `reasoning_content`; `data.reasoning:
drop` removes them; kept, they are trained inside the assistant turn through a template that writes them (Qwen3's
official template on the real Qwen2 vocabulary), and a template with no place for them is refused by name. Expected
texts are written here by hand from Qwen3's template source."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_inputs, run_stages, trained_runs, write_params
from real_vocabs import missing, real_tokenizer

from skytune.core.chat import chat_template, tokenization
from skytune.core.data.chat_format import InvalidRecord, record_converter
from skytune.core.errors import SkytuneError

ANSWER = "It is 4."
TRACE = "2 plus 2 makes 4."


def _row(assistant: dict) -> dict:
    return {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", **assistant}]}


@pytest.mark.parametrize("assistant", [
    {"content": ANSWER, "reasoning_content": TRACE},
    {"content": ANSWER, "thinking": TRACE},  # gpt-oss's name
    {"content": [{"type": "thinking", "thinking": TRACE}, {"type": "text", "text": ANSWER}]},  # Anthropic's blocks
    {"content": [{"type": "reasoning", "text": TRACE}, {"type": "text", "text": ANSWER}]},
    {"content": f"<think>\n{TRACE}\n</think>\n\n{ANSWER}"},  # written inline, as Qwen3 and DeepSeek-R1 answer
])
def test_every_way_of_writing_a_trace_becomes_reasoning_content(assistant: dict) -> None:
    record = record_converter("messages")(_row(assistant))
    assert record["messages"][-1] == {"role": "assistant", "content": ANSWER, "reasoning_content": TRACE}
    dropped = record_converter("messages", reasoning="drop")(_row(assistant))
    assert dropped["messages"][-1] == {"role": "assistant", "content": ANSWER}


def test_an_inline_trace_is_found_in_any_format() -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "q"},
                                  {"from": "gpt", "value": f"<think>{TRACE}</think>a"}]}
    alpaca = {"instruction": "q", "output": f"<think>\n{TRACE}\n</think>\n\na"}
    for fmt, row in (("sharegpt", sharegpt), ("alpaca", alpaca)):
        assert record_converter(fmt)(row)["messages"][-1] == {"role": "assistant", "content": "a",
                                                              "reasoning_content": TRACE}
        assert record_converter(fmt, reasoning="drop")(row)["messages"][-1] == {"role": "assistant", "content": "a"}


def test_a_trace_with_no_answer_is_rejected() -> None:
    with pytest.raises(InvalidRecord) as caught:
        record_converter("messages")(_row({"content": "", "reasoning_content": TRACE}))
    assert (caught.value.field, caught.value.reason) == ("messages[1].content", "empty")


@pytest.fixture(scope="module")
def qwen3() -> Any:
    """The real Qwen2 vocabulary (Qwen3 shares it) with Qwen3's official template, as TRL ships it."""
    reason = missing("qwen2")
    if reason:
        pytest.skip(reason)
    tokenizer = real_tokenizer("qwen2")
    tokenizer.chat_template = files("trl").joinpath("chat_templates", "qwen3.jinja").read_text(encoding="utf-8")
    chat_template.ensure_pad_token(tokenizer)
    return tokenizer


def test_kept_traces_are_trained_inside_the_assistant_turn(qwen3: Any) -> None:
    messages = [{"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": ANSWER, "reasoning_content": "first trace"},
                {"role": "user", "content": "And 3 plus 3?"},
                {"role": "assistant", "content": "It is 6.", "reasoning_content": "3 plus 3 makes 6."}]
    [encoded] = tokenization.Encoder(qwen3, "assistant_only").encode([{"id": "r", "source": "s",
                                                                      "messages": messages}])
    # Qwen3 writes the last turn's trace as <think>\n...\n</think>\n\n before the answer, and drops the traces of
    # turns before the last question: those are counted, not trained.
    assert trained_runs(encoded) == [f"{ANSWER}<|im_end|>",
                                     "<think>\n3 plus 3 makes 6.\n</think>\n\nIt is 6.<|im_end|>"]
    report = tokenization.gate(qwen3, [encoded], max_length=512, loss="assistant_only", where="test")
    assert report.reasoning_dropped == 1 and not report.problems
    # The gate checks the trace is inside the loss: take it out, and the gate refuses.
    start = encoded.text.index("3 plus 3 makes")
    labels = [tokenization.IGNORE if a <= start < b else label
              for (a, b), label in zip(encoded.offsets, encoded.labels, strict=True)]
    with pytest.raises(tokenization.GateError, match="reasoning_not_trained"):
        tokenization.gate(qwen3, [tokenization.Encoded(**{**encoded.__dict__, "labels": labels})], max_length=512,
                          loss="assistant_only", where="test")


def test_a_template_with_no_place_for_traces_is_refused_by_name(qwen3: Any) -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "t"}]
    assert chat_template.writes_reasoning(qwen3)
    own, qwen3.chat_template = qwen3.chat_template, files("trl").joinpath(
        "chat_templates", "qwen2_5.jinja").read_text(encoding="utf-8")
    try:
        assert not chat_template.writes_reasoning(qwen3)
        with pytest.raises(SkytuneError, match=r"\(model.chat_template: templates/qwen2_5.jinja\) has no place for "
                                               r"them .* Set data.reasoning: drop"):
            chat_template.check_writes(qwen3, messages, None, "model.chat_template: templates/qwen2_5.jinja")
    finally:
        qwen3.chat_template = own


def test_to_chat_keeps_or_drops_traces_as_params_say(tmp_path: Path) -> None:
    from skytune.stages import ingest, self_replay, to_chat

    rows = [_row({"content": f"{ANSWER} ({i})", "reasoning_content": TRACE}) for i in range(4)]
    for policy, kept in (("keep", 4), ("drop", 0)):
        root = copy_inputs(tmp_path / policy)
        (root / "data/raw/traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        def edit(params: dict, policy: str = policy) -> None:
            params["data"]["sources"].append({"name": "traces", "path": "traces.jsonl", "format": "messages"})
            params["data"]["reasoning"] = policy

        write_params(root, edit)
        run_stages(root, ingest, self_replay, to_chat)
        records = [json.loads(line) for line in (root / "data/chat/traces.jsonl").read_text().splitlines()]
        assert sum("reasoning_content" in r["messages"][-1] for r in records) == kept
        assert json.loads((root / "metrics/to_chat.json").read_text())["reasoning"] == ({"traces": 4} if kept else {})
