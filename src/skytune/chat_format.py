"""Converters from common dataset formats to canonical chat messages, and the checks every record must pass.

A canonical message list is `[{"role": "system"|"user"|"assistant", "content": str}, ...]`: an optional system
message first, then user and assistant turns alternating, ending with an assistant turn. Converters raise
`InvalidRecord` with the field at fault; the caller decides (by `data.on_invalid`) whether that is an error or a
counted reject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class InvalidRecord(ValueError):
    """A record that cannot become a valid conversation; `field` names the key at fault."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise InvalidRecord(key, "missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise InvalidRecord(key, f"expected a string, got {type(value).__name__}")
    return value


def from_alpaca(row: dict[str, Any]) -> Messages:
    """`{"instruction", "input"?, "output", "system"?}` -> one user turn and one assistant turn."""
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    system = _text(row, "system", required=False)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def from_sharegpt(row: dict[str, Any]) -> Messages:
    """`{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}` -> messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise InvalidRecord("conversations", "missing or not a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"conversations[{i}]", "not an object")
        speaker = _text(turn, "from")
        if speaker not in SHAREGPT_ROLES:
            raise InvalidRecord(f"conversations[{i}].from", f"unknown speaker {speaker!r}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn, "value")})
    return messages


def from_messages(row: dict[str, Any]) -> Messages:
    """OpenAI style `{"messages": [{"role", "content"}, ...]}`: copied, keeping only role and content."""
    turns = row.get("messages")
    if not isinstance(turns, list):
        raise InvalidRecord("messages", "missing or not a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"messages[{i}]", "not an object")
        messages.append({"role": _text(turn, "role"), "content": _text(turn, "content")})
    return messages


CONVERTERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
}


def validate(messages: Messages) -> None:
    """Raise InvalidRecord unless `messages` is a trainable conversation (see the module docstring)."""
    if not messages:
        raise InvalidRecord("messages", "empty conversation")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise InvalidRecord(f"messages[{i}].role", f"unknown role {message['role']!r}")
        if not message["content"].strip():
            raise InvalidRecord(f"messages[{i}].content", "empty")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRecord(f"messages[{i}].content", f"not valid UTF-8 ({exc.reason})") from exc
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(body)
            raise InvalidRecord(f"messages[{i + offset}].role", f"expected {expected}, got {message['role']}")
    if not body or body[-1]["role"] != "assistant":
        raise InvalidRecord("messages", "the last turn must be from the assistant")


def to_messages(row: dict[str, Any], fmt: str) -> Messages:
    """Convert one raw row in format `fmt` and validate it; raise InvalidRecord if it cannot be trained on."""
    messages = CONVERTERS[fmt](row)
    validate(messages)
    return messages
