"""Conversations to training sequences, and the gate every training set passes before any GPU time is spent.

The loss masks are derived from the rendered chat template itself, not from `{% generation %}` markers: the template
is rendered once per sequence of roles with sentinels in place of the contents, which gives the fixed pieces it
writes around each message; the real rendering is then walked piece by piece to find every message's characters.
That works for any template that writes the contents in order (verbatim or trimmed), markers or not, and
the tokenizer's offsets turn character spans into token labels. A conversation with tools, tool calls or reasoning
traces has text that depends on more than its contents: there an assistant turn is what the template writes after
the generation prompt of the messages before it, up to its end-of-turn token (its trace, its content and its calls,
exactly what the model is asked to produce when served); tool results are context.

`gate()` checks the invariants whose violation peers only discover at inference (a model that never stops, a
double BOS, an empty answer) and `render_samples()` shows a human what is trained.
"""

from __future__ import annotations

import json
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from skytune.core.chat.chat_template import (
    LOSS_WEIGHT,
    document_bos,
    end_of_turn_token,
    render,
    stop_tokens,
    structured,
    template_pieces,
)
from skytune.core.errors import SkytuneError
from skytune.core.params.schema import Loss

IGNORE = -100  # the label of a token outside the loss
LOSS_MODES = typing.get_args(Loss)


class TemplateError(SkytuneError):
    """The chat template does not write the message contents in a way the loss masks can be derived from."""


class GateError(SkytuneError):
    """The tokenized training set breaks an invariant; training would waste GPU time or produce a broken model."""


@dataclass
class Turn:
    """A trained assistant turn: token range [start, end) of its content, and the index of its end-of-turn token
    (None when the template writes none after it)."""

    start: int
    end: int
    eot: int | None


@dataclass
class Encoded:
    """One conversation as the trainer sees it. `template_bos` is how many BOS tokens the chat template's own text
    writes for this sequence of roles (any other BOS came from the data)."""

    id: str
    source: str
    text: str
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    turns: list[Turn] = field(default_factory=list)
    template_bos: int = 0
    # Character ranges whose training the gate checks: (invariant broken if wrong, start, end, must be trained).
    expected: list[tuple[str, int, int, bool]] = field(default_factory=list)
    reasoning_dropped: int = 0  # assistant traces the template did not write (Qwen3 drops those of earlier turns)


class Encoder:
    """Tokenizes conversations with a tokenizer's chat template and labels the tokens of `loss`:
    `assistant_only` (every assistant turn and its end-of-turn token), `completion_only` (the last assistant turn
    and its end-of-turn token) or `full` (every token). An assistant turn marked `loss_weight: 0` is context only,
    under every mode."""

    def __init__(self, tokenizer: Any, loss: str) -> None:
        if loss not in LOSS_MODES:
            raise ValueError(f"loss must be one of {LOSS_MODES}, got {loss!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast tokenizer (with offsets) is needed to derive the loss masks")
        self.tokenizer = tokenizer
        self.loss = loss
        self.eot = end_of_turn_token(tokenizer)
        self.pieces: dict[tuple[str, ...], list[str]] = {}

    def _pieces(self, roles: tuple[str, ...]) -> list[str]:
        if roles not in self.pieces:
            pieces = template_pieces(self.tokenizer, roles)
            if pieces is None:
                raise TemplateError(
                    f"the chat template does not write the messages of a {'/'.join(roles)} conversation in order "
                    "(it moves or drops one): the loss masks cannot be derived from it. Use model.chat_template: "
                    "chatml or a templates/<file>.jinja")
            self.pieces[roles] = pieces
        return self.pieces[roles]

    def template_bos(self, messages: list[dict[str, Any]], text: str, tools: list[dict[str, Any]] | None) -> int:
        """BOS tokens the template writes around these messages' data (none comes from the data)."""
        bos = self.tokenizer.bos_token
        if not bos:
            return 0
        if not structured(messages, tools):
            return sum(piece.count(bos) for piece in self._pieces(tuple(m["role"] for m in messages)))
        data = json.dumps([messages, tools or []], ensure_ascii=False)
        return text.count(bos) - data.count(bos)

    def locate(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               ) -> tuple[str, list[tuple[int, int]]]:
        """Render `messages`; return the text and each message's content span [start, end) in it (for a
        structured conversation, each assistant turn's span up to its end-of-turn token; others are empty)."""
        if structured(messages, tools):
            return self._locate_turns(messages, tools)
        pieces = self._pieces(tuple(m["role"] for m in messages))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not text.startswith(pieces[0]):
            raise TemplateError("the chat template's output depends on the message contents beyond writing them")
        pos, spans = len(pieces[0]), []
        for i, message in enumerate(messages):
            after, last = pieces[i + 1], i == len(messages) - 1
            for content in dict.fromkeys((message["content"], message["content"].strip())):
                end = pos + len(content)
                if text.startswith(content, pos) and text.startswith(after, end) and (
                        not last or end + len(after) == len(text)):
                    spans.append((pos, end))
                    pos = end + len(after)
                    break
            else:
                raise TemplateError(f"the chat template changes the content of message {i} ({message['role']}) "
                                    "beyond trimming it: the loss masks cannot be derived from it")
        return text, spans

    def _locate_turns(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      ) -> tuple[str, list[tuple[int, int]]]:
        """Each assistant turn as the text the template writes after the generation prompt of the messages
        before it, up to (not including) its end-of-turn token."""
        text = render(self.tokenizer, messages, tools)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] == "tool":  # a result: its content, after the call it answers
                content = message["content"].strip()
                found = text.find(content, spans[-1][1] if spans else 0)
                if found < 0:
                    raise TemplateError(f"the chat template does not write the tool result of message {i}")
                spans.append((found, found + len(content)))
                continue
            if message["role"] != "assistant":
                spans.append(spans[-1] if spans else (0, 0))
                continue
            prompt = render(self.tokenizer, messages[:i], tools, add_generation_prompt=True)
            if not text.startswith(prompt):
                raise TemplateError(f"the chat template writes the conversation before message {i} differently "
                                    "when the model is asked to answer (add_generation_prompt) than when the answer "
                                    "follows: the loss masks cannot be derived from it")
            start, eot = len(prompt), text.find(self.eot, len(prompt))
            eot = len(text) if eot < 0 else eot
            content = message["content"].strip()
            if content and content not in text[start:eot]:
                raise TemplateError(f"the chat template changes the content of message {i} (assistant) beyond "
                                    "trimming it: the loss masks cannot be derived from it")
            spans.append((start, max(start, len(text[:eot].rstrip(" \t")))))
        return text, spans

    def _trained(self, text: str, messages: list[dict[str, str]],
                 spans: list[tuple[int, int]]) -> list[tuple[int, int, int | None]]:
        """Character ranges to train: (start, end of content, end of the end-of-turn token or None)."""
        if self.loss == "full":  # every token but the assistant turns marked loss_weight 0 (and their end of turn)
            out, pos = [], 0
            for i, message in enumerate(messages):
                if message["role"] == "assistant" and message.get(LOSS_WEIGHT) == 0:
                    start, end, eot_end = self._turn(text, spans[i])
                    out.append((pos, start, None))
                    pos = eot_end or end
            return [(a, b, None) for a, b, _ in [*out, (pos, len(text), None)] if b > a]
        return [self._turn(text, spans[i]) for i in self._trained_turns(messages)]

    def _turn(self, text: str, span: tuple[int, int]) -> tuple[int, int, int | None]:
        """An assistant turn's (start, end of content, end of its end-of-turn token or None)."""
        start, end = span
        gap = len(text[end:]) - len(text[end:].lstrip(" \t"))  # some templates put a space before </s>
        return start, end, end + gap + len(self.eot) if text.startswith(self.eot, end + gap) else None

    def _trained_turns(self, messages: list[dict[str, Any]]) -> list[int]:
        """The assistant turns the loss trains (not under `full`): all of them, or the last (`completion_only`),
        less those marked `loss_weight: 0` (LLaMA-Factory v1: context only)."""
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get(LOSS_WEIGHT) != 0]
        return trained[-1:] if self.loss == "completion_only" else trained

    def encode(self, records: list[dict[str, Any]]) -> list[Encoded]:
        """Tokenize records `{"id", "source", "messages", "tools"?}` (no special tokens added: the template writes
        them)."""
        located = [self.locate(r["messages"], r.get("tools")) for r in records]
        batch = self.tokenizer([text for text, _ in located], add_special_tokens=False, return_offsets_mapping=True)
        eot_id = self.tokenizer.convert_tokens_to_ids(self.eot)
        out = []
        for record, (text, spans), ids, offsets in zip(records, located, batch["input_ids"],
                                                       batch["offset_mapping"], strict=True):
            labels = [IGNORE] * len(ids)
            turns = []
            for start, end, eot_end in self._trained(text, record["messages"], spans):
                stop = eot_end if eot_end is not None else end
                inside = [j for j, (a, b) in enumerate(offsets) if a < stop and b > start]
                for j in inside:
                    labels[j] = ids[j]
                if self.loss != "full":
                    eot = next((j for j in inside if offsets[j][1] == eot_end and ids[j] == eot_id), None)
                    content = [j for j in inside if j != eot]
                    turns.append(Turn(content[0] if content else (eot or 0), (content[-1] + 1) if content else 0, eot))
            encoded = Encoded(record["id"], record.get("source", ""), text, list(ids), labels,
                              [tuple(o) for o in offsets], turns,
                              self.template_bos(record["messages"], text, record.get("tools")))
            if self.loss != "full" and structured(record["messages"], record.get("tools")):
                self._expect(encoded, record["messages"], spans)
            out.append(encoded)
        return out

    def _expect(self, encoded: Encoded, messages: list[dict[str, Any]], spans: list[tuple[int, int]]) -> None:
        """What the gate must find trained in a structured conversation: each trained assistant turn's reasoning
        trace and calls; and never a tool result."""
        trained = set(self._trained_turns(messages))
        text = encoded.text
        for i, message in enumerate(messages):
            start, end = spans[i]
            if message["role"] == "tool":
                encoded.expected.append(("tool_result_trained", start, end, False))
            if i not in trained:
                continue
            trace = message.get("reasoning_content", "").strip()
            if trace:
                found = text.find(trace, start, end)
                if found < 0:
                    encoded.reasoning_dropped += 1
                else:
                    encoded.expected.append(("reasoning_not_trained", found, found + len(trace), True))
            for call in message.get("tool_calls", ()):
                name = call["function"]["name"]
                found = text.find(name, start, end)  # not found: an empty range, which fails the check
                encoded.expected.append(("tool_call_not_trained", found, found + len(name) if found >= 0 else found,
                                         True))


@dataclass
class GateReport:
    """What the gate measured. `problems` counts violations per invariant; `examples` names the first records."""

    sequences: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    assistant_turns: int = 0
    reasoning_dropped: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, invariant: str, record: Encoded, detail: str = "") -> None:
        self.problems[invariant] += 1
        shown = self.examples.setdefault(invariant, [])
        if len(shown) < 3:
            shown.append(f"{record.source}/{record.id}" + (f" ({detail})" if detail else ""))

    def as_metrics(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                "assistant_turns": self.assistant_turns, "reasoning_dropped": self.reasoning_dropped,
                "problems": dict(sorted(self.problems.items()))}


def gate(tokenizer: Any, records: list[Encoded], *, max_length: int, loss: str, where: str) -> GateReport:
    """Check every sequence; raise GateError listing each broken invariant (with counts and the first records)
    before the model is even loaded. Invariants:

    - `pad_is_stop_token`: the pad token is EOS or the end-of-turn token (the collator would mask the stop token);
    - `bos_count`: the BOS tokens are exactly those the template writes, and a family with a document BOS
      (`chat_template.document_bos`) starts with exactly one. Catches a BOS written twice, or one smuggled in by the
      data as text, while a BOS the template writes as turn structure (SmolLM2's `<|im_start|>`, Llama 2's
      `<s>[INST]` per turn) is expected;
    - `end_of_turn_not_trained`: an assistant turn trained without its end-of-turn token (a model that never stops);
    - `empty_assistant_turn`: an assistant turn with nothing to learn but the end-of-turn token;
    - `nothing_trained`: a sequence with no trained token;
    - `too_long`: a sequence longer than `max_length` (merge_data should have dropped or truncated it);
    - `tool_call_not_trained`, `reasoning_not_trained`: a trained assistant turn's call or reasoning trace outside
      the loss (or not written in its turn); `tool_result_trained`: a tool's result inside it (results are context:
      the model must learn to call, not to invent what the tool says).
    """
    report = GateReport()
    eot_token = end_of_turn_token(tokenizer)
    stops = set(tokenizer.convert_tokens_to_ids(stop_tokens(tokenizer)))
    bos_id = tokenizer.bos_token_id
    document = document_bos(tokenizer)
    for record in records:
        report.sequences += 1
        report.tokens += len(record.input_ids)
        trained = sum(label != IGNORE for label in record.labels)
        report.trained_tokens += trained
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stops:
            report.add("pad_is_stop_token", record, f"pad {tokenizer.pad_token!r}")
        if bos_id is not None:
            ids, count = record.input_ids, record.input_ids.count(bos_id)
            if count != record.template_bos:
                report.add("bos_count", record, f"{count} BOS, the template writes {record.template_bos}")
            elif document and (ids[:1] != [bos_id] or ids[1:2] == [bos_id]):
                report.add("bos_count", record, "does not start with exactly one document BOS")
        if not trained:
            report.add("nothing_trained", record)
        if len(record.input_ids) > max_length:
            report.add("too_long", record, f"{len(record.input_ids)} > {max_length} tokens")
        report.reasoning_dropped += record.reasoning_dropped
        for invariant, start, end, must_train in record.expected:
            inside = [label != IGNORE for (a, b), label in zip(record.offsets, record.labels, strict=True)
                      if a < end and b > start]
            if (not inside or not all(inside)) if must_train else any(inside):
                report.add(invariant, record, f"characters {start}-{end}")
        for k, turn in enumerate(record.turns):
            report.assistant_turns += 1
            if turn.eot is None or record.labels[turn.eot] == IGNORE:
                report.add("end_of_turn_not_trained", record, f"assistant turn {k}")
            if turn.end <= turn.start:
                report.add("empty_assistant_turn", record, f"assistant turn {k}")
    if report.problems:
        lines = [f"  - {name}: {count} sequence(s), e.g. {', '.join(report.examples[name])}"
                 for name, count in sorted(report.problems.items())]
        raise GateError(f"{where}: the tokenization gate failed (loss: {loss}, end of turn {eot_token!r}, pad "
                        f"{tokenizer.pad_token!r}); nothing was trained:\n" + "\n".join(lines))
    return report


def render_samples(records: list[Encoded], n: int, *, loss: str) -> str:
    """Markdown showing the first `n` sequences as rendered, with each trained run of text between ⟦ and ⟧."""
    parts = [f"# Training sequences as the model sees them (loss: {loss})\n",
             "Text between ⟦ and ⟧ is trained (in the loss); everything else is context only. Written before "
             "training by the tokenization gate.\n"]
    for record in records[:n]:
        runs: list[list[int]] = []
        for (a, b), label in zip(record.offsets, record.labels, strict=True):
            if label == IGNORE or a == b:
                continue
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
        text, pos, out = record.text, 0, []
        for a, b in runs:
            out += [text[pos:a], "⟦", text[a:b], "⟧"]
            pos = b
        out.append(text[pos:])
        trained = sum(label != IGNORE for label in record.labels)
        parts.append(f"## {record.source}/{record.id}: {len(record.input_ids)} tokens, {trained} trained\n\n"
                      f"~~~~text\n{''.join(out)}\n~~~~\n")
    return "\n".join(parts)
