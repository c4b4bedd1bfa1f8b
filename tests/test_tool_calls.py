"""Tool calling: both common shapes into one canonical form, each reject reason, and the loss masks (calls trained,
results context) through a real tools-capable template (Qwen2.5's). Expected texts are written here by hand from
the shapes' documentation and Qwen2.5's template, not computed by the code under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import trained_runs
from tiny_archs import build_tiny

from skytune.core.chat import chat_template, tokenization
from skytune.core.data.chat_format import InvalidRecord, record_converter
from skytune.core.errors import SkytuneError
from skytune.core.models.base import describe_base, load_tokenizer

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}

SHAREGPT_ROW = {  # LLaMA-Factory's glaive shape: the call and the result are turns, the tools JSON text
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"celsius\": 21}"},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps([WEATHER]),
}

CANONICAL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"celsius\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


def test_openai_and_sharegpt_tool_calls_become_one_canonical_form() -> None:
    openai = record_converter("messages")(OPENAI_ROW)
    sharegpt = record_converter("sharegpt", columns={"messages": "conversations", "tools": "tools"})(SHAREGPT_ROW)
    assert openai["tools"] == sharegpt["tools"] == [{"type": "function", "function": WEATHER}]
    ids = [("id", "call_1"), ("tool_call_id", "call_1")]  # OpenAI's ids are kept; ShareGPT has none
    assert openai["messages"][1]["tool_calls"][0].pop(ids[0][0]) == ids[0][1]
    assert openai["messages"][2].pop(ids[1][0]) == ids[1][1]
    assert openai["messages"] == sharegpt["messages"] == CANONICAL


def test_parallel_calls_in_one_sharegpt_turn() -> None:
    row = json.loads(json.dumps(SHAREGPT_ROW))
    row["conversations"][1]["value"] = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                   {"name": "get_weather", "arguments": {"city": "Rome"}}])
    row["conversations"][2:2] = [{"from": "observation", "value": "{\"celsius\": 25}"}]
    messages = record_converter("sharegpt", columns={"tools": "tools"})(row)["messages"]
    assert [c["function"]["arguments"]["city"] for c in messages[1]["tool_calls"]] == ["Paris", "Rome"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]


def _broken(edit: Any) -> dict:
    row = json.loads(json.dumps(OPENAI_ROW))
    edit(row)
    return row


@pytest.mark.parametrize(("edit", "field", "reason"), [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     "messages[1].tool_calls[0].arguments", "invalid_tool_arguments"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
     "messages[1].tool_calls[0].arguments", "invalid_tool_arguments"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_time"),
     "messages[1].tool_calls[0]", "unknown_function"),
    (lambda r: r.pop("tools"), "messages[1].tool_calls[0]", "unknown_function"),
    (lambda r: r["messages"].insert(1, {"role": "tool", "content": "{}"}), "messages[1]", "tool_result_without_call"),
    (lambda r: r["messages"].insert(3, {"role": "tool", "content": "{}"}), "messages[3]", "tool_result_without_call"),
    (lambda r: r["messages"][2].update(tool_call_id="call_9"), "messages[2].tool_call_id",
     "tool_result_without_call"),
    (lambda r: r.update(tools="[{\"name\": "), "tools", "invalid_tools"),
    (lambda r: r.update(tools=[{"description": "no name"}]), "tools[0]", "invalid_tools"),
    (lambda r: r["messages"][1].update(tool_calls=[{"function": {"arguments": "{}"}}]), "messages[1].tool_calls[0]",
     "invalid_tool_call"),
    (lambda r: r["messages"][1]["tool_calls"].append({"id": "call_2", "function": {"name": "get_weather"}}),
     "messages[3]", "tool_call_without_result"),  # two calls, one result, then the answer
    (lambda r: r["messages"][1]["tool_calls"].append({"id": "call_1", "function": {"name": "get_weather"}}),
     "messages[1].tool_calls[1].id", "invalid_tool_call"),  # a duplicate id
])
def test_each_reject_reason_names_the_field(edit: Any, field: str, reason: str) -> None:
    with pytest.raises(InvalidRecord) as caught:
        record_converter("messages")(_broken(edit))
    assert (caught.value.field, caught.value.reason) == (field, reason)


def test_a_conversation_may_end_with_the_call() -> None:
    row = _broken(lambda r: r.update(messages=r["messages"][:2]))
    assert record_converter("messages")(row)["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_preference_rows_may_call_tools() -> None:
    row = {"prompt": OPENAI_ROW["messages"][:3], "chosen": "It is 21 degrees in Paris.", "rejected": "No idea.",
           "tools": OPENAI_ROW["tools"]}
    record = record_converter("preference")(row)
    assert record["tools"] == [{"type": "function", "function": WEATHER}]
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "tool"]
    with pytest.raises(InvalidRecord, match="unknown_function"):
        record_converter("preference")({k: v for k, v in row.items() if k != "tools"})


def test_a_sharegpt_call_that_is_not_json_is_rejected() -> None:
    row = json.loads(json.dumps(SHAREGPT_ROW))
    row["conversations"][1]["value"] = "get_weather(city='Paris')"
    with pytest.raises(InvalidRecord) as caught:
        record_converter("sharegpt", columns={"tools": "tools"})(row)
    assert (caught.value.field, caught.value.reason) == ("conversations[1].value", "invalid_tool_call")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny Qwen2 tokenizer with Qwen2.5's template (tools inside), set up as the pipeline sets it up."""
    path = build_tiny("qwen2", tmp_path_factory.mktemp("qwen2"))
    return load_tokenizer(describe_base("local", "qwen2", str(path), None, template="keep", pad_token="auto"))


def test_calls_are_trained_and_results_are_context(qwen: Any) -> None:
    record = {"id": "r", "source": "s", "messages": CANONICAL, "tools": [{"type": "function", "function": WEATHER}]}
    [encoded] = tokenization.Encoder(qwen, "assistant_only").encode([record])
    # Qwen2.5 writes a call as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call> (its template's own text).
    assert trained_runs(encoded) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>"]
    assert "<tool_response>\n{\"celsius\": 21}\n</tool_response>" in encoded.text  # the result is there, untrained
    assert '"name": "get_weather", "description"' in encoded.text  # the tools are in the prompt
    report = tokenization.gate(qwen, [encoded], max_length=1024, loss="assistant_only", where="test")
    assert report.assistant_turns == 2 and not report.problems
    # completion_only: the last answer alone
    [last] = tokenization.Encoder(qwen, "completion_only").encode([record])
    assert trained_runs(last) == ["It is 21 degrees in Paris.<|im_end|>"]


def test_the_gate_refuses_a_trained_result_or_an_untrained_call(qwen: Any) -> None:
    record = {"id": "r", "source": "s", "messages": CANONICAL, "tools": [{"type": "function", "function": WEATHER}]}
    [encoded] = tokenization.Encoder(qwen, "assistant_only").encode([record])
    result = encoded.text.index('{"celsius": 21}')
    call = encoded.text.index('get_weather", "arguments"')
    for where, invariant in ((result, "tool_result_trained"), (call, "tool_call_not_trained")):
        labels = list(encoded.labels)
        for j, (a, b) in enumerate(encoded.offsets):
            if a <= where < b:
                labels[j] = encoded.input_ids[j] if invariant == "tool_result_trained" else tokenization.IGNORE
        broken = tokenization.Encoded(**{**encoded.__dict__, "labels": labels})
        with pytest.raises(tokenization.GateError, match=invariant):
            tokenization.gate(qwen, [broken], max_length=1024, loss="assistant_only", where="test")


def test_a_template_that_ignores_the_tools_or_drops_the_calls_is_not_tool_capable(qwen: Any) -> None:
    own = qwen.chat_template
    try:
        qwen.chat_template = own.replace("{%- if tools %}", "{%- if false %}")  # never writes the schemas
        assert not chat_template.writes_tool_calls(qwen)
        qwen.chat_template = own.replace("{{- tool_call.arguments | tojson }}", "")  # writes no arguments
        assert not chat_template.writes_tool_calls(qwen)
    finally:
        qwen.chat_template = own


def test_a_template_without_tools_is_refused_by_name(qwen: Any) -> None:
    qwen.chat_template, own = chat_template.CHATML_TEMPLATE, qwen.chat_template
    try:
        assert not chat_template.writes_tool_calls(qwen)
        with pytest.raises(SkytuneError, match=r"the chat template \(model.chat_template: chatml\) does not write "
                                               r"tools"):
            chat_template.check_writes(qwen, CANONICAL, None, "model.chat_template: chatml")
    finally:
        qwen.chat_template = own
    assert chat_template.writes_tool_calls(qwen)


def test_dedup_tells_calls_apart() -> None:
    from skytune.core.data.records import dedup_keys

    other = json.loads(json.dumps(CANONICAL))
    other[1]["tool_calls"][0]["function"]["arguments"]["city"] = "Rome"
    assert dedup_keys({"messages": CANONICAL})[1] != dedup_keys({"messages": other})[1]
    answer = json.loads(json.dumps(CANONICAL))
    answer[-1]["content"] = "21 degrees."
    assert dedup_keys({"messages": CANONICAL})[0] == dedup_keys({"messages": answer})[0]  # same context
    assert dedup_keys({"messages": CANONICAL, "tools": [WEATHER]})[0] != dedup_keys({"messages": CANONICAL})[0]


def test_merge_data_refuses_tool_data_with_a_template_that_has_no_tools(tmp_path: Path) -> None:
    """Through the stages, on the default tiny model (ChatML without tools): one clear error before training."""
    from conftest import copy_inputs, run_stages, write_params

    from skytune.stages import ingest, merge_data, self_replay, split, to_chat

    root = copy_inputs(tmp_path)
    (root / "data/raw/tools.jsonl").write_text(json.dumps(OPENAI_ROW) + "\n")

    def edit(params: dict) -> None:
        params["data"]["sources"].append({"name": "tools", "path": "tools.jsonl", "format": "messages"})
        params["split"]["val_fraction_by_source"] = {"tools": 0.0}

    write_params(root, edit)
    run_stages(root, ingest, self_replay, to_chat, split)
    assert json.loads((root / "metrics/to_chat.json").read_text())["tool_calls"] == {"tools": 1}
    with pytest.raises(SkytuneError, match=r"\(model.chat_template: .*\) does not write tools"):
        run_stages(root, merge_data)


def test_each_tool_reject_is_counted_with_its_file_line_and_reason(tmp_path: Path) -> None:
    """A small file with one row per tool reject reason, through to_chat: each row in rejects.jsonl with its line."""
    from conftest import copy_inputs, run_stages, write_params

    from skytune.stages import ingest, self_replay, to_chat

    edits = {
        "invalid_tool_arguments": lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{x"),
        "unknown_function": lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_time"),
        "tool_result_without_call": lambda r: r["messages"].insert(1, {"role": "tool", "content": "{}"}),
        "invalid_tools": lambda r: r.update(tools="[{"),
        "invalid_tool_call": lambda r: r["messages"][1].update(tool_calls="call get_weather"),
        "non_text_content": lambda r: r["messages"][0].update(content=[{"type": "image_url", "image_url": "x"}]),
    }
    root = copy_inputs(tmp_path)
    rows = [OPENAI_ROW] * 20 + [_broken(edit) for edit in edits.values()]
    (root / "data/raw/tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def edit(params: dict) -> None:
        params["data"]["sources"].append({"name": "tools", "path": "tools.jsonl", "format": "messages"})
        params["data"]["max_reject_fraction"] = 0.3

    write_params(root, edit)
    run_stages(root, ingest, self_replay, to_chat)
    rejects = [json.loads(line) for line in (root / "data/chat/rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects if r["source"] == "tools"] == [
        (21 + i, reason) for i, reason in enumerate(edits)]
    metrics = json.loads((root / "metrics/to_chat.json").read_text())
    assert metrics["records"]["tools"] == 20 and metrics["rejected"]["tools"] == len(edits)


def test_the_shipped_chatml_tools_template_on_the_embedded_defaults_real_tokenizer() -> None:
    """templates/chatml_tools.jinja on SmolLM2's real tokenizer (the embedded default's base): tools, calls, results
    and a trace written; calls and the trace trained, results not; the gate passes. Expected texts by hand."""
    from conftest import REPO
    from real_vocabs import missing, real_tokenizer

    if missing("smollm2"):
        pytest.skip(str(missing("smollm2")))
    tokenizer = real_tokenizer("smollm2")
    tokenizer.chat_template = (REPO / "templates/chatml_tools.jinja").read_text(encoding="utf-8")
    chat_template.ensure_pad_token(tokenizer)
    assert chat_template.writes_tool_calls(tokenizer) and chat_template.writes_reasoning(tokenizer)
    messages = [*CANONICAL[:-1], {**CANONICAL[-1], "reasoning_content": "The tool said 21."}]
    record = {"id": "r", "source": "s", "messages": messages, "tools": [{"type": "function", "function": WEATHER}]}
    [encoded] = tokenization.Encoder(tokenizer, "assistant_only").encode([record])
    assert trained_runs(encoded) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nThe tool said 21.\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>"]
    assert "<|im_start|>user\n<tool_response>\n{\"celsius\": 21}\n</tool_response><|im_end|>" in encoded.text
    report = tokenization.gate(tokenizer, [encoded], max_length=2048, loss="assistant_only", where="test")
    assert not report.problems and report.assistant_turns == 2
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert chat_template.render(tokenizer, plain) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
