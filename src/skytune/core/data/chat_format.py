"""Converters from common dataset formats to canonical chat messages, and the checks every record must pass.

Formats: `messages` (OpenAI), `sharegpt` (conversations with from/value), `alpaca` (instruction/input/output),
`prompt_completion`, `orca` (system_prompt/question/response), `summarization` (dialogue/summary plus an
instruction), `columns` (an explicit mapping of columns to roles), and `preference` (prompt/chosen/rejected, kept
in its own canonical shape for a later DPO stage). `detect_format` names the format of a sample of rows only when
exactly one fits.

A canonical message is `{"role": "system"|"user"|"assistant"|"tool", "content": str}`; an assistant message may
also carry `tool_calls` and `reasoning_content`, a tool result a `tool_call_id` (see `tool_calls`). A conversation
is an optional system message, then a user turn, each answered by the assistant, whose calls (if any) are answered
by tool results and then by the assistant again; it ends with an assistant turn. Converters raise `InvalidRecord`
with the field at fault; the caller decides (by `data.on_invalid`) whether that is an error or a counted reject.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from typing import Any

from skytune.core.chat.chat_template import LOSS_WEIGHT
from skytune.core.data.invalid import InvalidRecord
from skytune.core.data.tool_calls import check_calls, parse_calls, parse_tools
from skytune.core.errors import SkytuneError
from skytune.core.params.schema import Format

Messages = list[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "function_call", "observation": "tool"}
REASONING_KEYS = ("reasoning_content", "thinking")  # an assistant message's trace: Qwen3/DeepSeek's name, gpt-oss's
THINK = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.DOTALL)  # a trace written inline, before the answer


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


def from_sharegpt(row: dict[str, Any], tags: Any = None, columns: dict[str, str] | None = None) -> Messages:
    """`{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value": str}, ...]}` ->
    messages. A `function_call` turn is the assistant calling (its value the JSON of a call, or of a list of
    calls), an `observation` the result. A ShareGPT variant names its keys and speakers in `tags` (role_tag,
    content_tag, user_tag, assistant_tag, system_tag, function_tag, observation_tag) and its columns in `columns`
    (messages, system), as LLaMA-Factory's dataset_info.json does."""
    columns = columns or {}
    role_tag = getattr(tags, "role_tag", None) or "from"
    content_tag = getattr(tags, "content_tag", None) or "value"
    speakers = SHAREGPT_ROLES if tags is None else {  # with tags, exactly the speakers they name (or the defaults)
        tags.user_tag or "human": "user", tags.assistant_tag or "gpt": "assistant",
        tags.system_tag or "system": "system", tags.function_tag or "function_call": "function_call",
        tags.observation_tag or "observation": "tool"}
    key = columns.get("messages", "conversations")
    turns = row.get(key)
    if not isinstance(turns, list):
        raise InvalidRecord(key, "missing or not a list")
    messages: Messages = []
    if "system" in columns and _text(row, columns["system"], required=False).strip():
        messages.append({"role": "system", "content": _text(row, columns["system"])})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"{key}[{i}]", "not an object")
        speaker = _text(turn, role_tag)
        if speaker not in speakers:
            raise InvalidRecord(f"{key}[{i}].{role_tag}", "unknown speaker", repr(speaker))
        role = speakers[speaker]
        if role == "function_call":
            calls = parse_calls(_text(turn, content_tag), f"{key}[{i}].{content_tag}")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": _text(turn, content_tag)})
    return messages


TEXT_PARTS = ("text", "input_text", "output_text")  # OpenAI's chat and responses names for a text part
REASONING_PARTS = ("reasoning", "thinking")  # a trace as a content part (Anthropic's thinking blocks, ...)
CALL_PARTS = ("tool_call",)  # LLaMA-Factory v1: a call as a content part, its value the JSON of {"name", "arguments"}
PART_SEPARATOR = "\n"


def _content(turn: dict[str, Any], field: str) -> tuple[str, str, list[dict[str, Any]]]:
    """A message's (text, reasoning, calls). `content` is text, or a list of content parts (`{"type": "text", "text"
    | "value": ...}`) joined by PART_SEPARATOR; `reasoning`/`thinking` parts are the trace, `tool_call` parts
    (LLaMA-Factory v1) the calls. A non-text part (image, audio, video, file) rejects the record: multimodal training
    is out of scope, and dropping the part would train answers about something the model never saw."""
    value = turn.get("content")
    if not isinstance(value, list):
        return ("" if value is None and turn.get("tool_calls") else _text(turn, "content")), "", []
    texts, traces, calls = [], [], []
    for j, part in enumerate(value):
        if isinstance(part, str):  # a bare string among the parts: text
            part = {"type": "text", "text": part}
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{field}.content[{j}]"
        if kind in CALL_PARTS:
            calls += parse_calls(part.get("value"), f"{where}.value")
            continue
        if kind not in TEXT_PARTS + REASONING_PARTS:
            raise InvalidRecord(where, "non_text_content", repr(kind))
        text = next((part[k] for k in ("text", "value", kind) if k in part), None)
        if not isinstance(text, str):
            raise InvalidRecord(f"{where}.text", f"expected a string, got {type(text).__name__}")
        (traces if kind in REASONING_PARTS else texts).append(text)
    return PART_SEPARATOR.join(texts), PART_SEPARATOR.join(traces), calls


def _loss_weight(turn: dict[str, Any], role: str, field: str) -> bool:
    """Whether a message's `loss_weight` (LLaMA-Factory v1) leaves it out of the loss. 0 does (an assistant turn
    kept as context only); 1 on an assistant turn, or 0 on any other, is what training does anyway. Any other value
    is refused: the loss has no per-token weights, and user, system and tool turns are never trained alone."""
    if LOSS_WEIGHT not in turn or turn[LOSS_WEIGHT] is None:
        return False
    weight = turn[LOSS_WEIGHT]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise InvalidRecord(f"{field}.{LOSS_WEIGHT}", "unsupported_loss_weight", f"expected a number, got {weight!r}")
    if weight == 0:
        return True
    if weight == 1 and role == "assistant":
        return False
    why = ("per-turn weights other than 0 and 1 are not supported by the loss" if role == "assistant" else
           f"a {role} turn is never trained on its own (0 or leave it out; train.loss: full trains every token)")
    raise InvalidRecord(f"{field}.{LOSS_WEIGHT}", "unsupported_loss_weight", f"{weight!r}: {why}")


def _message(turn: dict[str, Any], field: str) -> dict[str, Any]:
    """One OpenAI-style message -> canonical: role, content (text parts joined), and an assistant's trace
    (`reasoning_content`, `thinking`, reasoning parts) and `tool_calls` (or `tool_call` parts), a tool result's
    `tool_call_id`; `loss_weight: 0` on an assistant turn that is context only."""
    role = _text(turn, "role")
    content, reasoning, calls = _content(turn, field)
    untrained = _loss_weight(turn, role, field)
    message: dict[str, Any] = {"role": role, "content": content}
    if calls and role != "assistant":
        raise InvalidRecord(f"{field}.content", "invalid_tool_call", f"a {role} message cannot call a function")
    if role == "assistant":
        key = next((k for k in REASONING_KEYS if turn.get(k)), None)
        if key is not None:
            reasoning = _text(turn, key)
        if reasoning.strip():
            message["reasoning_content"] = reasoning
        if turn.get("tool_calls"):
            if calls:
                raise InvalidRecord(f"{field}.tool_calls", "invalid_tool_call", "calls both as tool_calls and as parts")
            calls = parse_calls(turn["tool_calls"], f"{field}.tool_calls")
        if calls:
            message["tool_calls"] = calls
        if untrained:
            message[LOSS_WEIGHT] = 0
    if role == "tool" and isinstance(turn.get("tool_call_id"), str):
        message["tool_call_id"] = turn["tool_call_id"]
    return message


def from_messages(row: dict[str, Any]) -> Messages:
    """OpenAI style `{"messages": [{"role", "content", "tool_calls"?, ...}, ...]}` -> canonical messages."""
    turns = row.get("messages")
    if not isinstance(turns, list):
        raise InvalidRecord("messages", "missing or not a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"messages[{i}]", "not an object")
        messages.append(_message(turn, f"messages[{i}]"))
    return messages


def _turns(row: dict[str, Any], key: str, role: str) -> Messages:
    """A field that holds either plain text (one `role` turn) or a list of messages."""
    value = row.get(key)
    if isinstance(value, list):
        return from_messages({"messages": value}) if value else []
    return [{"role": role, "content": _text(row, key)}]


def from_prompt_completion(row: dict[str, Any]) -> Messages:
    """`{"prompt", "completion"}`, each text or a list of messages."""
    return _turns(row, "prompt", "user") + _turns(row, "completion", "assistant")


def from_orca(row: dict[str, Any]) -> Messages:
    """`{"system_prompt"?, "question", "response"}` (OpenOrca)."""
    system = _text(row, "system_prompt", required=False)
    messages = [{"role": "user", "content": _text(row, "question")},
                {"role": "assistant", "content": _text(row, "response")}]
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def from_summarization(row: dict[str, Any], instruction: str) -> Messages:
    """`{"dialogue", "summary"}` (samsum-like): the instruction and the dialogue as the user turn."""
    return [{"role": "user", "content": f"{instruction}\n\n{_text(row, 'dialogue')}"},
            {"role": "assistant", "content": _text(row, "summary")}]


def from_columns(row: dict[str, Any], columns: dict[str, str]) -> Messages:
    """An explicit mapping `{"system"?: col, "user": col, "assistant": col}` for any other single-turn table."""
    messages = []
    for role in ("system", "user", "assistant"):
        if role in columns:
            text = _text(row, columns[role], required=role != "system")
            if role != "system" or text.strip():
                messages.append({"role": role, "content": text})
    return messages


PREFERENCE_KEYS = (("prompt", "chosen", "rejected"), ("prompt_messages", "chosen_messages", "rejected_messages"),
                   ("conversations", "chosen", "rejected"))
# Two whole conversations and no prompt column: TRL's implicit prompt, LLaMA-Factory v1's DPO sample.
WHOLE_PAIRS = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"))
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")  # Anthropic HH-RLHF transcripts


def _sharegpt_answer(row: dict[str, Any], key: str, tags: Any) -> Messages:
    """A ShareGPT ranking answer: one message object `{"from": "gpt", "value": ...}`."""
    value = row.get(key)
    if not isinstance(value, dict):
        raise InvalidRecord(key, "expected a message object {from, value}", type(value).__name__)
    return from_sharegpt({"conversations": [value]}, tags)


def from_hh_transcript(text: str, field: str) -> Messages:
    """An Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ...") -> messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise InvalidRecord(field, "not a Human:/Assistant: transcript")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def _preference_parts(row: dict[str, Any], tags: Any = None, columns: dict[str, str] | None = None,
                      ) -> tuple[Messages, Messages, Messages, tuple[str, str, str]]:
    """(prompt, chosen, rejected, the keys they came from) of any of the preference shapes."""
    columns = columns or {}
    if "conversations" in row or "chosen" in columns:  # ShareGPT ranking (LLaMA-Factory's dpo_en_demo)
        keys = (columns.get("messages", "conversations"), columns.get("chosen", "chosen"),
                columns.get("rejected", "rejected"))
        return (from_sharegpt(row, tags, columns), _sharegpt_answer(row, keys[1], tags),
                _sharegpt_answer(row, keys[2], tags), keys)
    keys = next((k for k in PREFERENCE_KEYS if k[0] in row), None)
    whole = next((k for k in WHOLE_PAIRS if isinstance(row.get(k[0]), list) and isinstance(row.get(k[1]), list)), None)
    if keys is None and whole is not None:  # two whole conversations: the prompt is what they share
        return [], _turns(row, whole[0], "assistant"), _turns(row, whole[1], "assistant"), (whole[0], *whole)
    if keys is None:  # Anthropic HH: two whole transcripts that share everything but the last answer
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise InvalidRecord("prompt", "missing")
        chosen, rejected = (from_hh_transcript(row[k], k) for k in ("chosen", "rejected"))
        if chosen[:-1] != rejected[:-1]:
            raise InvalidRecord("rejected", "its transcript does not share the chosen one's prompt")
        return chosen[:-1], chosen[-1:], rejected[-1:], ("chosen", "chosen", "rejected")
    return (_turns(row, keys[0], "user"), _turns(row, keys[1], "assistant"), _turns(row, keys[2], "assistant"),
            keys)


def to_preference(row: dict[str, Any], tags: Any = None, columns: dict[str, str] | None = None,
                  tools_column: str | None = "tools") -> dict[str, Any]:
    """Every common preference shape -> the canonical `{"prompt": [..., user], "chosen": [assistant...],
    "rejected": [assistant...]}`: `prompt`/`chosen`/`rejected` as text or messages (silogen's `*_messages` names
    too), conversations that repeat the prompt or carry it whole (HuggingFaceH4's, TRL's implicit prompt),
    ShareGPT ranking (`conversations` with `chosen`/`rejected` message objects), and Anthropic HH (whole
    `chosen`/`rejected` transcripts), LLaMA-Factory v1's `chosen_messages`/`rejected_messages`; with the `tools`
    the row may call. A ShareGPT variant's `tags` and `columns` are as in `from_sharegpt`."""
    prompt, chosen, rejected, keys = _preference_parts(row, tags, columns)
    # The answers are what is compared, the prompt is context: a message's loss_weight means nothing here.
    prompt, chosen, rejected = ([{k: v for k, v in m.items() if k != LOSS_WEIGHT} for m in part]
                                for part in (prompt, chosen, rejected))
    prompt, chosen, rejected = _shared_prompt(*map(inline_reasoning, (prompt, chosen, rejected)))
    tools = parse_tools(row.get(tools_column), tools_column) if tools_column else []
    validate(prompt + [{"role": "assistant", "content": "-"}], tools)
    out: dict[str, Any] = {"prompt": prompt}
    for name, key, answer in (("chosen", keys[1], chosen), ("rejected", keys[2], rejected)):
        if not answer or any(m["role"] not in ("assistant", "tool") for m in answer) or answer[0]["role"] == "tool":
            raise InvalidRecord(key, "must be assistant text or assistant messages")
        validate(prompt + answer, tools)
        out[name] = answer
    if out["chosen"] == out["rejected"]:
        raise InvalidRecord(keys[2], "identical to the chosen answer")
    return out | ({"tools": tools} if tools else {})


def _shared_prompt(prompt: Messages, chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Answers given as whole conversations (TRL's implicit prompt; HuggingFaceH4's, which repeat the prompt)
    split into the prompt they share and the answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n and (not prompt or chosen[:n] == prompt or chosen[:n][-len(prompt):] == prompt):
        return chosen[:n], chosen[n:], rejected[n:]
    return prompt, chosen, rejected


FORMATS = tuple(f for f in typing.get_args(Format) if f != "auto")  # the explicit formats of params.yaml

# Which keys identify each format in auto-detection; `columns` and `summarization` options need params.
_SIGNATURES: dict[str, tuple[frozenset[str], ...]] = {
    "messages": (frozenset({"messages"}),),
    "sharegpt": (frozenset({"conversations"}),),
    "alpaca": (frozenset({"instruction", "output"}),),
    "preference": tuple(frozenset(k) for k in PREFERENCE_KEYS + WHOLE_PAIRS),
    "prompt_completion": (frozenset({"prompt", "completion"}),),
    "orca": (frozenset({"question", "response"}),),
    "summarization": (frozenset({"dialogue", "summary"}),),
}


def detect_format(rows: list[dict[str, Any]]) -> str | None:
    """The one format whose keys every row has, or None when none or several fit (ask the user for `format:`)."""
    if not rows:
        return None
    fits = [name for name, signatures in _SIGNATURES.items()
            if all(any(sig <= row.keys() for sig in signatures) for row in rows)]
    if "preference" in fits:  # preference rows also carry "prompt" or "conversations"
        fits = [f for f in fits if f not in ("prompt_completion", "sharegpt")]
    return fits[0] if len(fits) == 1 else None


def converter(fmt: str, *, instruction: str | None = None, columns: dict[str, str] | None = None,
              tags: Any = None) -> Callable[[dict[str, Any]], Messages]:
    """The converter for `fmt`, with its options bound. (`preference` has its own shape: see `to_preference`.)"""
    if fmt == "summarization":
        if not instruction:
            raise SkytuneError("format summarization needs `instruction` (the task put before each dialogue)")
        return lambda row: from_summarization(row, instruction)
    if fmt == "columns":
        if not columns or "user" not in columns or "assistant" not in columns:
            raise SkytuneError("format columns needs `columns` mapping at least user and assistant to column names")
        return lambda row: from_columns(row, columns)
    if fmt == "sharegpt":
        return lambda row: from_sharegpt(row, tags, columns)
    return {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "messages": from_messages,
            "prompt_completion": from_prompt_completion, "orca": from_orca}[fmt]


def inline_reasoning(messages: Messages) -> Messages:
    """Messages with a trace written inline at the start of an assistant's text (`<think>...</think>`, as Qwen3 and
    DeepSeek-R1 answer) moved to `reasoning_content`, whatever format they came from."""
    out = []
    for message in messages:
        inline = THINK.match(message["content"]) if message["role"] == "assistant" else None
        if inline and "reasoning_content" not in message:
            message = {**message, "content": message["content"][inline.end():]}
            if inline.group(1).strip():
                message["reasoning_content"] = inline.group(1).strip("\n")
        out.append(message)
    return out


def _next_roles(previous: dict[str, Any] | None) -> tuple[str, ...]:
    """The roles that may follow `previous` in a conversation's body (after the optional system message)."""
    if previous is None:
        return ("user",)
    if previous["role"] == "assistant":
        return ("tool",) if previous.get("tool_calls") else ("user",)
    return ("tool", "assistant") if previous["role"] == "tool" else ("assistant",)


def validate(messages: Messages, tools: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
    """Raise InvalidRecord unless `messages` is a trainable conversation (see the module docstring) whose calls
    name functions of `tools`."""
    if not messages:
        raise InvalidRecord("messages", "empty conversation")
    offset = 1 if messages[0]["role"] == "system" else 0
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise InvalidRecord(f"messages[{i}].role", "unknown role", repr(role))
        if not message["content"].strip() and not message.get("tool_calls"):
            raise InvalidRecord(f"messages[{i}].content", "empty")
        try:
            message["content"].encode("utf-8")
            message.get("reasoning_content", "").encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRecord(f"messages[{i}].content", "not valid UTF-8", exc.reason) from exc
        if i < offset:
            continue
        allowed = _next_roles(previous)
        if role not in allowed:
            if role == "tool":
                raise InvalidRecord(f"messages[{i}]", "tool_result_without_call")
            raise InvalidRecord(f"messages[{i}].role", f"expected {' or '.join(allowed)}, got {role}")
        previous = message
    if previous is None or previous["role"] != "assistant":
        raise InvalidRecord("messages", "the last turn must be from the assistant")
    if all(m.get(LOSS_WEIGHT) == 0 for m in messages if m["role"] == "assistant"):
        raise InvalidRecord("messages", "nothing_to_train", f"every assistant turn has {LOSS_WEIGHT} 0")
    check_calls(messages, list(tools))


def replace_text(record: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    """`record` (a conversation or a preference record) with every `table` key replaced by its value in the
    content and reasoning of every message, longest key first."""
    if not table:
        return record
    keys = sorted(table, key=len, reverse=True)

    def fix(message: dict[str, Any]) -> dict[str, Any]:
        out = dict(message)
        for field in ("content", "reasoning_content"):
            if field in out:
                for key in keys:
                    out[field] = out[field].replace(key, table[key])
        return out

    return {field: [fix(m) for m in value] if field != "tools" and isinstance(value, list) else value
            for field, value in record.items()}


def drop_reasoning(record: dict[str, Any]) -> dict[str, Any]:
    """`record` without reasoning traces (`data.reasoning: drop`)."""
    return {field: [{k: v for k, v in m.items() if k != "reasoning_content"} for m in value]
            if field != "tools" and isinstance(value, list) else value for field, value in record.items()}


LABEL_KEYS = ("label", "kto_tag")  # TRL's unpaired preference rows; LLaMA-Factory's KTO tag


def _desirable(row: dict[str, Any], column: str | None) -> bool:
    """False for a row explicitly labelled undesirable (KTO-style `label: false`): never an SFT target. An unmapped
    `label`/`kto_tag` counts only when it is true or false (a classification label means something else); a mapped
    `kto_tag` column must hold true/false (or 1/0)."""
    if column is None:
        return next((row[k] for k in LABEL_KEYS if isinstance(row.get(k), bool)), True)
    value = row.get(column)
    if value is None:
        return True
    if value not in (True, False):  # 1 and 0 compare equal to True and False
        raise InvalidRecord(column, "expected true or false", repr(value))
    return bool(value)


def record_converter(fmt: str, *, instruction: str | None = None, columns: dict[str, str] | None = None,
                     tags: Any = None, reasoning: str = "keep") -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Raw row -> the body of a canonical record, validated: `{"messages", "tools"?}` for conversations,
    `{"prompt", "chosen", "rejected"}` for preference data (a sharegpt source whose `columns` map `chosen` and
    `rejected` is ShareGPT ranking), or `{"prompt", "completion", "label": false}` for a conversation labelled
    undesirable (kept apart with the preference data, never trained on). `reasoning: drop` removes the traces.
    Raises InvalidRecord."""
    columns = columns or {}
    finish = drop_reasoning if reasoning == "drop" else (lambda record: record)
    # A row's function schemas: the mapped column, or `tools` in the shapes that carry one.
    tools_column = columns.get("tools") or ("tools" if fmt in ("messages", "sharegpt", "preference") else None)
    if fmt == "preference" or (fmt == "sharegpt" and "chosen" in columns):
        return lambda row: finish(to_preference(row, tags, columns, tools_column))
    convert = converter(fmt, instruction=instruction, columns=columns, tags=tags)

    def conversation(row: dict[str, Any]) -> dict[str, Any]:
        messages = inline_reasoning(convert(row))
        tools = parse_tools(row.get(tools_column), tools_column) if tools_column else []
        validate(messages, tools)
        body = {"tools": tools} if tools else {}
        if _desirable(row, columns.get("kto_tag")):
            return finish({"messages": messages, **body})
        return finish({"prompt": messages[:-1], "completion": messages[-1:], "label": False, **body})

    return conversation


def to_messages(row: dict[str, Any], fmt: str) -> Messages:
    """Convert and validate one row of a format without options (a convenience for one-off use)."""
    return record_converter(fmt)(row)["messages"]
