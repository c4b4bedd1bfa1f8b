"""Chat templates and the tokenizer facts that training and serving must agree on.

The pad token must never be the end-of-turn/EOS token: the collator masks pad positions out of the loss, so a
model trained with pad == EOS never learns to stop (trl#976, alignment-handbook#127, the ancestor's defect 5).
The template chosen by `model.chat_template` (`resolve_template`) is the one used to train, saved with every
model output, and rendered by the serving engine: one template from data to serving.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from skytune.core.errors import SkytuneError

log = logging.getLogger(__name__)

# ChatML with `{% generation %}` markers around each assistant reply *and* its end-of-turn token, so that
# TRL's assistant-only loss trains the model to emit `<|im_end|>`. The BOS is written once by the template;
# the tokenizer adds no special tokens of its own, so there is never a second one.
CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] }}{{ '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = {"bos": "<|begin_of_text|>", "eos": "<|im_end|>", "pad": "<|pad|>"}
CHATML_EXTRA_TOKENS = ["<|im_start|>"]

_PROBE = "\u2063probe\u2063"  # an unlikely reply used to find what the template writes after a reply


def end_of_turn_token(tokenizer: Any) -> str:
    """The token the chat template writes right after an assistant reply (`<|im_end|>`, `<|eot_id|>`, ...)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.index(_PROBE) + len(_PROBE):]
    for token in sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True):
        if token and after.startswith(token):
            return token
    if tokenizer.eos_token and after.lstrip().startswith(tokenizer.eos_token):
        return tokenizer.eos_token
    raise SkytuneError(
        f"the chat template writes {after[:40]!r} after an assistant reply, which starts with no special token: "
        "the model could not learn to stop. Use a template that ends each assistant turn with an EOS/EOT token."
    )


def stop_tokens(tokenizer: Any) -> list[str]:
    """The tokens generation stops on: EOS and the template's end-of-turn token (often the same), sorted."""
    return sorted({tokenizer.eos_token, end_of_turn_token(tokenizer)})


PAD_TOKEN_ADDED = "<|pad|>"


def unused_special_tokens(tokenizer: Any) -> list[str]:
    """Special tokens the chat template never writes and that are not BOS/EOS/UNK (`<|reserved_special_token_0|>`,
    `<|fim_pad|>`, ...), and added tokens named for padding (llama.cpp's `[PAD151646]` in GGUF vocabularies), in
    vocabulary order: safe to reuse as padding."""
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja's own errors and raise_exception(): templates that refuse a system role
        rendered = tokenizer.apply_chat_template(probe[1:], tokenize=False, add_generation_prompt=True)
    taken = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, end_of_turn_token(tokenizer)}
    vocab = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens) | {a.content for a in tokenizer.added_tokens_decoder.values()
                                                   if a.special}
    free = [t for t in vocab if (t in special or "pad" in t.lower()) and t not in taken and t not in rendered]
    # Tokens named for padding first, then reserved ones; others (`<|end_of_text|>`...) may be stop ids of the model.
    return sorted(free, key=lambda t: (0 if "pad" in t else 1 if "reserved" in t or "unused" in t else 2, vocab[t]))


def ensure_pad_token(tokenizer: Any, strategy: str = "auto") -> str:
    """Give the tokenizer a pad token that is not its EOS or end-of-turn token; return which was chosen.

    `auto` keeps the tokenizer's own pad token when it is distinct, else reuses an unused special token, then UNK,
    then BOS (pad positions are masked from both the loss and attention, so the reuse is harmless and the embeddings
    never grow). `unused`, `unk` and `bos` ask for one of those; `add` adds `<|pad|>` (the model's embeddings must
    then cover it: `models.loading.fit_embeddings`).
    """
    stops = set(stop_tokens(tokenizer))
    choices = {
        "unused": unused_special_tokens(tokenizer)[:1],
        "unk": [tokenizer.unk_token],
        "bos": [tokenizer.bos_token],
        "add": [PAD_TOKEN_ADDED],
    }
    if strategy == "auto":
        candidates = [tokenizer.pad_token, *choices["unused"], *choices["unk"], *choices["bos"]]
    else:
        candidates = choices[strategy]
    for candidate in candidates:
        if candidate and candidate not in stops:
            if candidate not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"pad_token": candidate})
            if candidate != tokenizer.pad_token:
                log.info("pad token: %r (was %r, which is an end token or unset)", candidate, tokenizer.pad_token)
            tokenizer.pad_token = candidate
            return candidate
    raise SkytuneError(
        f"model.pad_token: {strategy}: the tokenizer has no such token distinct from its EOS/end-of-turn token "
        f"{sorted(t for t in stops if t)}; choose auto, or add (a new <|pad|> token)"
    )


def renders_bos(tokenizer: Any) -> bool:
    """Whether the chat template writes the BOS token at the start of a conversation."""
    if tokenizer.bos_token is None:
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    return text.startswith(tokenizer.bos_token)


def bos_in_turns(tokenizer: Any) -> bool:
    """Whether the chat template writes the BOS token once per turn, as turn structure: ChatML tokenizers whose BOS
    is `<|im_start|>` (SmolLM2), or Llama 2's `<s>[INST]` in front of every user turn."""
    if tokenizer.bos_token is None:
        return False
    one, three = (template_pieces(tokenizer, roles) for roles in (("user",), ("user", "assistant", "user")))
    if one is None or three is None:
        return False
    return "".join(three).count(tokenizer.bos_token) > "".join(one).count(tokenizer.bos_token)


def document_bos(tokenizer: Any) -> bool:
    """Whether a conversation starts with a document BOS: the tokenizer puts one in front of plain text (Llama,
    Mistral, Gemma), or the template writes one at the start that is not turn structure. SmolLM2's `<|im_start|>`
    is its BOS token but only a turn header: it has no document BOS, like Qwen."""
    if tokenizer.bos_token is None:
        return False
    return adds_bos_by_default(tokenizer) or (renders_bos(tokenizer) and not bos_in_turns(tokenizer))


def adds_bos_by_default(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of plain text on its own (Llama, Mistral, Gemma do; Qwen has none)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("hi", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


_SPECIAL_LITERAL = re.compile(r"<\|[A-Za-z0-9_.:-]+\|>")  # <|im_start|>, <|eot_id|>, <|end|>: special-token shaped


def missing_tokens(tokenizer: Any, template: str) -> list[str]:
    """The special-token-shaped literals (`<|...|>`) the template writes that the tokenizer's vocabulary lacks, in the
    order the template first writes them: ChatML's `<|im_start|>` and `<|im_end|>` on a Llama 2 / Mistral base. As
    plain text they would split into pieces, and the end of a turn would be no token a model could stop on."""
    vocab = tokenizer.get_vocab()
    return [t for t in dict.fromkeys(_SPECIAL_LITERAL.findall(template)) if t not in vocab]


def add_tokens(tokenizer: Any, tokens: list[str]) -> None:
    """Add `tokens` (`missing_tokens`) to the tokenizer as special tokens, never split and never normalised; the
    model's embedding and output rows for them are grown (`models.loading.fit_embeddings`) and trained beside LoRA
    (`training.new_tokens`)."""
    if tokens:
        tokenizer.add_tokens(tokens, special_tokens=True)


def resolve_template(tokenizer: Any, strategy: str) -> tuple[str, list[str]]:
    """The chat template `model.chat_template` asks for, made fit to train on; and notes on what was changed.

    - `keep` takes the tokenizer's own, `chatml` the ChatML template, anything else is a jinja file's path. Special
      tokens the template writes and the vocabulary lacks (`missing_tokens`: ChatML on a base model without
      `<|im_start|>`) are for the caller to add and train.
    - A template without `{% generation %}` markers gets TRL's training variant where TRL knows the template (Llama 3,
      Qwen, Gemma, ...); the training masks never depend on markers anyway (`tokenization` derives them from the
      rendered spans), the markers are for those who train on the saved template with TRL.
    - When the tokenizer adds a BOS to plain text by default but the template does not write one, `{{ bos_token }}`
      is prepended: training and a serving engine (which renders the template and adds no special tokens) see the
      same single BOS.
    """
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    notes: list[str] = []
    if strategy == "keep":
        template = tokenizer.chat_template
        if template is None:
            raise SkytuneError("model.chat_template: keep, but the tokenizer has no chat template. Use a chat/instruct "
                             "checkpoint, or chatml, or a templates/<file>.jinja")
        if isinstance(template, dict):
            template = template["default"]
    elif strategy == "chatml":
        template = CHATML_TEMPLATE
    else:
        template = Path(strategy).read_text(encoding="utf-8")
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        if not has_generation_markers(template):
            try:
                marked = get_training_chat_template(tokenizer)
            except (ValueError, KeyError, TypeError):
                marked = None
            if marked:
                template = tokenizer.chat_template = marked
                notes.append("generation markers added (TRL's training variant of this template)")
            else:
                notes.append("no generation markers: none known for this template; loss masks come from the "
                             "rendered spans")
        if adds_bos_by_default(tokenizer) and not renders_bos(tokenizer):
            template = tokenizer.chat_template = "{{ bos_token }}" + template
            notes.append("the tokenizer adds a BOS by default and the template wrote none: the template writes it now")
    finally:
        tokenizer.chat_template = original
    return template, notes


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
           add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`, with the `tools` they may call (none: the template's plain form)."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The text the model sees before it answers: every message but the last assistant one, plus the
    generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(tokenizer, messages, tools, add_generation_prompt=True)


# LLaMA-Factory v1's per-message weight: in a canonical record only as 0, on an assistant turn kept as context (never
# trained; `tokenization.Encoder`). Templates ignore it.
LOSS_WEIGHT = "loss_weight"
PLAIN_KEYS = ("role", "content", LOSS_WEIGHT)  # what a message may hold and still be plain text to a template


def structured(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
    """Whether a conversation carries more than roles and contents (tools, calls, results, reasoning): the
    template then writes text that depends on them, and the fixed-pieces shortcuts do not apply."""
    return bool(tools) or any(key not in PLAIN_KEYS for m in messages for key in m)


_TOOL_PROBE = "probe_\u2063tool"
_REASONING_PROBE = "\u2063probe reasoning\u2063"


def _writes(tokenizer: Any, messages: list[dict[str, Any]], probe: str, tools: list[dict[str, Any]] | None = None,
            ) -> bool:
    try:
        return probe in render(tokenizer, messages, tools)
    except Exception:  # noqa: BLE001 - jinja's own errors and raise_exception(): a template that refuses the role
        return False


def writes_tool_calls(tokenizer: Any) -> bool:
    """Whether the chat template writes the tools (given `tools=`), an assistant's calls and their results: each
    carries its own probe, and all three must appear."""
    described, argument, result = (f"probe_\u2063{what}" for what in ("described", "argument", "result"))
    call = {"type": "function", "function": {"name": _TOOL_PROBE, "arguments": {"x": argument}}}
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": result}, {"role": "assistant", "content": "a"}]
    tools = [{"type": "function", "function": {"name": _TOOL_PROBE, "description": described,
                                               "parameters": {"type": "object"}}}]
    return all(_writes(tokenizer, messages, probe, tools) for probe in (described, argument, result))


def writes_reasoning(tokenizer: Any) -> bool:
    """Whether the chat template writes an assistant's `reasoning_content` (Qwen3-style `<think>` blocks)."""
    messages = [{"role": "user", "content": "u"},
                {"role": "assistant", "content": "a", "reasoning_content": _REASONING_PROBE}]
    return _writes(tokenizer, messages, _REASONING_PROBE)


def check_writes(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 template: str) -> None:
    """Raise a clear error when a conversation has tool calls or reasoning that the chat template (named by
    `template`) has no place for: trained without them, the model would learn answers with their cause cut out."""
    if (tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages)) and not writes_tool_calls(tokenizer):
        raise SkytuneError(f"the data has tool calls, but the chat template ({template}) does not write tools, calls "
                           "and their results. Choose a template with tool support (model.chat_template: "
                           "templates/chatml_tools.jinja for a ChatML tokenizer, another templates/<file>.jinja, or "
                           "a model whose own template has it), or remove the tool-calling sources")
    if any("reasoning_content" in m for m in messages) and not writes_reasoning(tokenizer):
        raise SkytuneError(f"the data has reasoning traces, but the chat template ({template}) has no place for them "
                           "(it drops reasoning_content). Set data.reasoning: drop, or choose a template that "
                           "writes them (Qwen3-style <think> blocks; templates/chatml_tools.jinja for a ChatML "
                           "tokenizer)")


def template_pieces(tokenizer: Any, roles: tuple[str, ...]) -> list[str] | None:
    """The fixed text the chat template writes around the contents of a conversation with these roles: piece 0,
    content 0, piece 1, ..., content n-1, piece n. None when the template does not write the contents in order
    (it moves, drops or repeats one). Found by rendering sentinels in place of the contents."""
    marks = [f"\x02{i}\x03" for i in range(len(roles))]
    text = tokenizer.apply_chat_template([{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)],
                                         tokenize=False)
    pieces = []
    for mark in marks:
        head, found, text = text.partition(mark)
        if not found or any(m in head for m in marks):
            return None
        pieces.append(head)
    return [*pieces, text]


class Renderer:
    """Renders conversations with a tokenizer's chat template, fast and exactly.

    Rendering with jinja costs ~30 us a conversation. Most templates write each message's content verbatim between
    fixed pieces that depend only on the sequence of roles, so the pieces are rendered once per role sequence
    (with sentinels in place of contents) and filled in by string joins. The shortcut is checked against jinja on
    the first `verify` conversations of every role sequence and on every `audit`-th one after; a template that
    transforms contents (trims them, branches on them) fails the check and is rendered with jinja from then on.
    """

    def __init__(self, tokenizer: Any, verify: int = 16, audit: int = 997) -> None:
        self.tokenizer = tokenizer
        self.verify, self.audit = verify, audit
        self.pieces: dict[tuple[str, ...], list[str] | None] = {}
        self.seen: dict[tuple[str, ...], int] = {}

    def jinja(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        return render(self.tokenizer, messages, tools)

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if structured(messages, tools):
            return self.jinja(messages, tools)
        roles = tuple(m["role"] for m in messages)
        if roles not in self.pieces:
            self.pieces[roles] = template_pieces(self.tokenizer, roles)
        pieces = self.pieces[roles]
        if pieces is None:
            return self.jinja(messages)
        text = pieces[0] + "".join(m["content"] + p for m, p in zip(messages, pieces[1:], strict=True))
        count = self.seen[roles] = self.seen.get(roles, 0) + 1
        if count <= self.verify or count % self.audit == 0:
            exact = self.jinja(messages)
            if exact != text:
                log.info("chat template transforms contents for roles %s: rendering with jinja", roles)
                self.pieces[roles] = None
                return exact
        return text
