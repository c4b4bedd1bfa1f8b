"""Tool calling in canonical records: the functions a conversation may call, the calls, and their results.

The canonical forms are the ones transformers' chat templates take (`apply_chat_template(messages, tools=...)`):

- a record's `tools`: `[{"type": "function", "function": {"name", "description"?, "parameters"?}}, ...]`;
- an assistant message's `tool_calls`: `[{"type": "function", "function": {"name": str, "arguments": {...}}}]`,
  arguments parsed from JSON text into an object (templates write them with `| tojson`), an `id` kept when given;
- a result: `{"role": "tool", "content": str}`, with `tool_call_id` kept when given.

OpenAI's shape (`tool_calls` with JSON-text arguments, `tool` messages) and ShareGPT's (`function_call` and
`observation` turns whose values are JSON, a `tools` column holding JSON text) both parse into these.
"""

from __future__ import annotations

import json
from typing import Any

from skytune.core.data.invalid import InvalidRecord

Message = dict[str, Any]


def _json(value: Any, field: str, reason: str) -> Any:
    """`value`, parsed when it is JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidRecord(field, reason, value[:60]) from exc


def parse_tools(value: Any, field: str = "tools") -> list[dict[str, Any]]:
    """A record's tools (a list of function schemas, bare or OpenAI-wrapped, or JSON text of one) -> canonical."""
    value = _json(value, field, "invalid_tools")
    if value in (None, "", []):
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRecord(field, "invalid_tools", f"expected a list of function schemas, got {type(value).__name__}")
    tools = []
    for j, tool in enumerate(value):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidRecord(f"{field}[{j}]", "invalid_tools", "a function schema needs a name")
        tools.append({"type": "function", "function": spec})
    return tools


def parse_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """An assistant's calls: OpenAI `tool_calls`, or a ShareGPT `function_call` value (JSON text of one call
    `{"name", "arguments"}` or of a list of them) -> canonical calls."""
    value = _json(value, field, "invalid_tool_call")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRecord(field, "invalid_tool_call", "expected a call or a list of calls")
    calls = []
    for j, call in enumerate(value):
        where = f"{field}[{j}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRecord(where, "invalid_tool_call", "a call needs a function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str) and not arguments.strip():
            arguments = {}
        arguments = _json(arguments, f"{where}.arguments", "invalid_tool_arguments")
        if not isinstance(arguments, dict):
            raise InvalidRecord(f"{where}.arguments", "invalid_tool_arguments", "not a JSON object")
        canonical: dict[str, Any] = {"type": "function", "function": {"name": function["name"],
                                                                      "arguments": arguments}}
        if isinstance(call.get("id"), str):
            canonical["id"] = call["id"]
        calls.append(canonical)
    return calls


def check_calls(messages: list[Message], tools: list[dict[str, Any]]) -> None:
    """Raise InvalidRecord for a call to a function not in `tools` (`unknown_function`), for a result with no call
    before it (`tool_result_without_call`: a `tool` message must follow an assistant's calls or another result, at
    most one result per call, and a `tool_call_id` must name one of those calls), and for a call left unanswered
    when the conversation goes on (`tool_call_without_result`; a conversation may end with calls: the model learns
    to make them). Call ids must be unique."""
    known = {tool["function"]["name"] for tool in tools}
    pending: list[str | None] = []
    seen: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            if not pending:
                raise InvalidRecord(f"messages[{i}]", "tool_result_without_call")
            wanted = message.get("tool_call_id")
            if wanted is not None and wanted not in pending and any(pending):
                raise InvalidRecord(f"messages[{i}].tool_call_id", "tool_result_without_call", repr(wanted))
            pending.remove(wanted if wanted in pending else pending[0])
            continue
        if pending:
            raise InvalidRecord(f"messages[{i}]", "tool_call_without_result", f"{len(pending)} call(s) unanswered")
        for j, call in enumerate(message.get("tool_calls", ())):
            name = call["function"]["name"]
            if name not in known:
                raise InvalidRecord(f"messages[{i}].tool_calls[{j}]", "unknown_function", repr(name))
            if call.get("id") in seen:
                raise InvalidRecord(f"messages[{i}].tool_calls[{j}].id", "invalid_tool_call", "duplicate id")
            if call.get("id") is not None:
                seen.add(call["id"])
            pending.append(call.get("id"))
