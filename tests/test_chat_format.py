"""Converters to canonical messages, and the validation every record passes."""

from __future__ import annotations

import pytest

from skytune.core.data.chat_format import InvalidRecord, to_messages, validate
from skytune.core.errors import SkytuneError
from skytune.core.params.schema import SharegptTags


def test_alpaca_with_and_without_input_and_system() -> None:
    assert to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca") == [
        {"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    msgs = to_messages({"instruction": "Hi", "input": "", "output": "Hello", "system": "Be brief."}, "alpaca")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Hi"


def test_sharegpt_multi_turn_with_system_and_unicode() -> None:
    row = {"conversations": [
        {"from": "system", "value": "Réponds en français."},
        {"from": "human", "value": "Bonjour 👋"}, {"from": "gpt", "value": "Salut !"},
        {"from": "human", "value": "Ça va ?"}, {"from": "gpt", "value": "Oui, merci."}]}
    msgs = to_messages(row, "sharegpt")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == "Bonjour 👋"


def test_messages_keeps_role_and_content_only() -> None:
    row = {"messages": [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}]}
    assert to_messages(row, "messages") == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(("row", "fmt", "field", "reason"), [
    ({"instruction": "x"}, "alpaca", "output", "missing"),
    ({"instruction": "x", "output": 3}, "alpaca", "output", "expected a string, got int"),
    ({"instruction": "x", "output": "  "}, "alpaca", "messages[1].content", "empty"),
    ({"conversations": "nope"}, "sharegpt", "conversations", "missing or not a list"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "conversations[0].from", "unknown speaker"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "sharegpt",
     "messages[0].role", "expected user, got assistant"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "messages",
     "the last turn must be from the assistant"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages", "messages[0].role", "unknown role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "messages[0]", "tool_result_without_call"),
    ({"messages": []}, "messages", "messages", "empty conversation"),
])
def test_invalid_rows_name_the_field(row: dict, fmt: str, field: str, reason: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        to_messages(row, fmt)
    assert (err.value.field, err.value.reason) == (field, reason)


def test_lone_surrogate_is_not_valid_utf8() -> None:
    with pytest.raises(InvalidRecord, match="not valid UTF-8"):
        validate([{"role": "user", "content": "bad \udcff"}, {"role": "assistant", "content": "x"}])


def test_prompt_completion_text_or_messages() -> None:
    from skytune.core.data.chat_format import converter

    convert = converter("prompt_completion")
    assert convert({"prompt": "q", "completion": "a"}) == [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]
    msgs = convert({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                    "completion": [{"role": "assistant", "content": "a"}]})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


def test_orca_summarization_and_columns() -> None:
    from skytune.core.data.chat_format import converter

    orca = converter("orca")({"system_prompt": "Be precise.", "question": "2+2?", "response": "4"})
    assert [m["role"] for m in orca] == ["system", "user", "assistant"]
    assert converter("orca")({"system_prompt": "", "question": "q", "response": "r"})[0]["role"] == "user"
    summary = converter("summarization", instruction="Summarize:")({"dialogue": "A: hi\nB: yo", "summary": "Greetings."})
    assert summary[0]["content"] == "Summarize:\n\nA: hi\nB: yo" and summary[1]["content"] == "Greetings."
    cols = converter("columns", columns={"user": "Context", "assistant": "Response"})
    assert cols({"Context": "I feel low.", "Response": "I hear you."})[1] == {"role": "assistant",
                                                                             "content": "I hear you."}
    with pytest.raises(SkytuneError, match="needs `instruction`"):
        converter("summarization")


def test_preference_has_its_own_shape() -> None:
    from skytune.core.data.chat_format import to_preference

    pref = to_preference({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pref == {"prompt": [{"role": "user", "content": "q"}],
                    "chosen": [{"role": "assistant", "content": "good"}],
                    "rejected": [{"role": "assistant", "content": "bad"}]}
    silogen = to_preference({"prompt_messages": [{"role": "user", "content": "q"}],
                             "chosen_messages": [{"role": "assistant", "content": "g"}],
                             "rejected_messages": [{"role": "assistant", "content": "b"}]})
    assert silogen["chosen"][0]["content"] == "g"
    with pytest.raises(InvalidRecord, match="identical to the chosen"):
        to_preference({"prompt": "q", "chosen": "same", "rejected": "same"})


@pytest.mark.parametrize(("rows", "expected"), [
    ([{"messages": []}], "messages"),
    ([{"conversations": []}], "sharegpt"),
    ([{"instruction": "", "input": "", "output": ""}], "alpaca"),
    ([{"prompt": "", "completion": ""}], "prompt_completion"),
    ([{"prompt": "", "chosen": "", "rejected": ""}], "preference"),
    ([{"chosen_messages": [], "rejected_messages": []}], "preference"),  # LLaMA-Factory v1's DPO sample
    ([{"system_prompt": "", "question": "", "response": ""}], "orca"),
    ([{"dialogue": "", "summary": ""}], "summarization"),
    ([{"instruction": "", "output": ""}, {"conversations": []}], None),   # rows disagree
    ([{"messages": [], "conversations": []}], None),                      # ambiguous
    ([{"Context": "", "Response": ""}], None),                            # unknown: needs format: columns
    ([], None),
])
def test_detect_format_only_when_unambiguous(rows: list[dict], expected: str | None) -> None:
    from skytune.core.data.chat_format import detect_format

    assert detect_format(rows) == expected


def test_content_parts_are_joined_and_non_text_parts_reject_the_record() -> None:
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "input_text", "text": "briefly."}]},
        {"role": "assistant", "content": [{"type": "output_text", "value": "Done."}]}]}
    assert to_messages(row, "messages") == [{"role": "user", "content": "Describe\nbriefly."},
                                            {"role": "assistant", "content": "Done."}]
    bare = {"messages": [{"role": "user", "content": ["Describe", {"type": "text", "text": "briefly."}]},
                         {"role": "assistant", "content": "Done."}]}
    assert to_messages(bare, "messages")[0]["content"] == "Describe\nbriefly."  # a bare string part is text
    for part in ({"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "input_audio"}, {"text": "no type"}):
        row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]},
                            {"role": "assistant", "content": "A cat."}]}
        with pytest.raises(InvalidRecord) as caught:
            to_messages(row, "messages")
        assert (caught.value.field, caught.value.reason) == ("messages[0].content[1]", "non_text_content")
    with pytest.raises(InvalidRecord, match="content\\[0\\].text: expected a string, got int"):
        to_messages({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages")


def v1(role: str, *parts: tuple[str, str], weight: float | None = None) -> dict:
    """A LLaMA-Factory v1 message: typed parts with `value`, and a `loss_weight` when given."""
    message = {"role": role, "content": [{"type": kind, "value": value} for kind, value in parts]}
    return message | ({"loss_weight": weight} if weight is not None else {})


def test_llama_factory_v1_parts_tool_calls_and_loss_weights() -> None:
    from skytune.core.data.chat_format import record_converter

    call = '{"name": "add", "arguments": {"a": 2, "b": 3}}'
    row = {"messages": [v1("system", ("text", "Use tools."), weight=0.0),
                        v1("user", ("text", "2+3?"), weight=0.0),
                        v1("assistant", ("reasoning", "Add them."), ("text", "Calling."), ("tool_call", call),
                           weight=0.0),
                        v1("tool", ("text", "5"), weight=0.0),
                        v1("assistant", ("text", "It is 5."), weight=1.0)],
           "tools": '[{"name": "add", "parameters": {"type": "object"}}]'}
    record = record_converter("messages")(row)
    assert record["messages"] == [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "Calling.", "reasoning_content": "Add them.", "loss_weight": 0,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    assert record["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    both = {"messages": [v1("user", ("text", "q")), v1("assistant", ("tool_call", call)) | {"tool_calls": [call]}],
            "tools": [{"name": "add"}]}
    for bad, field, reason in [
        ({"messages": [v1("user", ("text", "q"), weight=1.0), v1("assistant", ("text", "a"))]},
         "messages[0].loss_weight", "unsupported_loss_weight"),
        ({"messages": [v1("user", ("text", "q")), v1("assistant", ("text", "a"), weight=0.5)]},
         "messages[1].loss_weight", "unsupported_loss_weight"),
        ({"messages": [v1("user", ("text", "q")), v1("assistant", ("text", "a"), weight=True)]},
         "messages[1].loss_weight", "unsupported_loss_weight"),
        ({"messages": [v1("user", ("text", "q")), v1("assistant", ("text", "a"), weight=0)]},
         "messages", "nothing_to_train"),
        ({"messages": [v1("user", ("tool_call", call)), v1("assistant", ("text", "a"))]},
         "messages[0].content", "invalid_tool_call"),
        ({"messages": [v1("user", ("text", "q")), v1("assistant", ("tool_call", "{not json"))]},
         "messages[1].content[0].value", "invalid_tool_call"),
        (both, "messages[1].tool_calls", "invalid_tool_call"),
    ]:
        with pytest.raises(InvalidRecord) as caught:
            record_converter("messages")(bad)
        assert (caught.value.field, caught.value.reason) == (field, reason), bad


def test_llama_factory_v1_preference_rows_split_at_the_shared_prompt() -> None:
    from skytune.core.data.chat_format import record_converter

    prompt = [v1("system", ("text", "Be kind."), weight=0.0), v1("user", ("text", "Hi?"), weight=0.0)]
    row = {"chosen_messages": [*prompt, v1("assistant", ("text", "Hello!"), weight=1.0)],
           "rejected_messages": [*prompt, v1("assistant", ("text", "Go away."), weight=1.0)]}
    assert record_converter("preference")(row) == {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}


def test_a_row_labelled_undesirable_is_kept_apart_never_as_a_conversation() -> None:
    from skytune.core.data.chat_format import record_converter

    convert = record_converter("messages")
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a bad answer"}]
    assert convert({"messages": turns, "label": False}) == {"prompt": turns[:1], "completion": turns[1:],
                                                            "label": False}
    assert convert({"messages": turns, "label": True}) == {"messages": turns}  # desirable: an SFT target
    assert convert({"messages": turns, "kto_tag": False})["label"] is False  # LLaMA-Factory's column name
    prompt_completion = record_converter("prompt_completion")  # TRL's unpaired preference rows
    assert prompt_completion({"prompt": "q", "completion": "a", "label": False})["completion"] == [
        {"role": "assistant", "content": "a"}]
    for label in ("positive", 0):  # a class label, not KTO's: only true/false counts unless kto_tag is mapped
        assert convert({"messages": turns, "label": label}) == {"messages": turns}
    kto = record_converter("sharegpt", columns={"messages": "messages", "kto_tag": "label"},
                           tags=SharegptTags(role_tag="role", content_tag="content", user_tag="user",
                                             assistant_tag="assistant"))
    assert kto({"messages": turns, "label": 0})["label"] is False
    with pytest.raises(InvalidRecord, match="label: expected true or false"):
        kto({"messages": turns, "label": "no"})  # mapped as the KTO tag: it must say


def test_every_common_preference_shape_becomes_the_canonical_one() -> None:
    from skytune.core.data.chat_format import detect_format, to_preference

    canonical = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
                 "rejected": [{"role": "assistant", "content": "Go away."}]}
    shapes = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello."},
         "rejected": {"from": "gpt", "value": "Go away."}},  # ShareGPT ranking
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},  # HH
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],  # TRL implicit
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},
        {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},  # H4
    ]
    for row in shapes:
        assert to_preference(row) == canonical, row
        assert detect_format([row]) == "preference", row
    hh = {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
          "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E"}
    assert to_preference(hh)["prompt"] == [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                           {"role": "user", "content": "C"}]
    with pytest.raises(InvalidRecord, match="does not share the chosen one's prompt"):
        to_preference({**hh, "rejected": "\n\nHuman: X\n\nAssistant: E"})
    with pytest.raises(InvalidRecord, match="chosen: expected a message object"):
        to_preference({"conversations": [{"from": "human", "value": "Hi?"}], "chosen": "Hello.",
                       "rejected": {"from": "gpt", "value": "No."}})


def test_a_sharegpt_variant_maps_by_tags_and_columns_as_llama_factory_writes_them() -> None:
    from skytune.core.data.chat_format import record_converter

    # dataset_info.json's OpenAI-style sharegpt: {"columns": {"messages": "messages", "system": "system"},
    # "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    tags = SharegptTags(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant")
    convert = record_converter("sharegpt", columns={"messages": "messages", "system": "system"}, tags=tags)
    row = {"system": "Be brief.",
           "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert convert(row)["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Yo"}]
    with pytest.raises(InvalidRecord, match=r"messages\[0\].role: unknown speaker \('human'\)"):
        convert({"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Yo"}]})
    plain = record_converter("sharegpt")  # no tags: ShareGPT's own from/value/human/gpt
    assert plain({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})["messages"][1] \
        == {"role": "assistant", "content": "b"}
