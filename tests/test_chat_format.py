"""Converters to canonical messages, and the validation every record passes."""

from __future__ import annotations

import pytest

from skytune.chat_format import InvalidRecord, to_messages, validate


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
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "conversations[0].from", "unknown speaker 'bot'"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "sharegpt",
     "messages[0].role", "expected user, got assistant"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt", "messages",
     "the last turn must be from the assistant"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "messages[0].role", "unknown role 'tool'"),
    ({"messages": []}, "messages", "messages", "empty conversation"),
])
def test_invalid_rows_name_the_field(row: dict, fmt: str, field: str, reason: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        to_messages(row, fmt)
    assert (err.value.field, err.value.reason) == (field, reason)


def test_lone_surrogate_is_not_valid_utf8() -> None:
    with pytest.raises(InvalidRecord, match="not valid UTF-8"):
        validate([{"role": "user", "content": "bad \udcff"}, {"role": "assistant", "content": "x"}])
