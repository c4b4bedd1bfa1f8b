"""Self-replay rows: the prompt a row of a `self_replay` source asks, and the conversation it becomes once the base
has answered it.

A row is `{"prompt": text}` (with an optional `"system": text`) or `{"messages": [...]}`, OpenAI-style, whose
trailing assistant turns are dropped: the base writes the last answer itself.
"""

from __future__ import annotations

from typing import Any

from skytune.core.data.invalid import InvalidRecord

ROLES = ("system", "user", "assistant")


def prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation the base answers: its messages up to the last user turn. Raises `InvalidRecord` naming the
    field at fault."""
    if "prompt" in row:
        return _prompt(row)
    if "messages" in row:
        return _messages(row["messages"])
    raise InvalidRecord("<row>", "a self_replay row needs 'prompt' (text) or 'messages'", f"keys: {sorted(row)}")


def _prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise InvalidRecord("system", "not text")
        if system.strip():
            messages.append({"role": "system", "content": system})
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRecord("prompt", "empty or not text")
    return [*messages, {"role": "user", "content": prompt}]


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise InvalidRecord("messages", "not a list")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidRecord(f"messages[{i}].role", "unknown role", f"one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRecord(f"messages[{i}].content", "not text")
        out.append({"role": role, "content": content})
    while out and out[-1]["role"] == "assistant":
        out.pop()
    if not out or out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise InvalidRecord("messages", "no user turn for the base to answer")
    return out


def answered(messages: list[dict[str, str]], answer: str) -> dict[str, Any]:
    """The row to_chat reads (format `messages`): the prompt's conversation and the base's answer."""
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}
