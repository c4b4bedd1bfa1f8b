"""Chat templates and the tokenizer facts that training and serving must agree on.

The pad token must never be the end-of-turn/EOS token: the collator masks pad positions out of the loss, so a
model trained with pad == EOS never learns to stop (trl#976, alignment-handbook#127, the ancestor's defect 5).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# ChatML with `{% generation %}` markers around each assistant reply *and* its end-of-turn token, so that
# TRL's assistant-only loss trains the model to emit `<|im_end|>`. The BOS is written once by the template;
# the tokenizer adds no special tokens of its own, so there is never a second one.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
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
    raise ValueError(
        f"the chat template writes {after[:40]!r} after an assistant reply, which starts with no special token: "
        "the model could not learn to stop. Use a template that ends each assistant turn with an EOS/EOT token."
    )


def ensure_pad_token(tokenizer: Any) -> str:
    """Give the tokenizer a pad token that is not its EOS or end-of-turn token; return which was chosen.

    Prefers the tokenizer's own pad token, then UNK, then BOS (padding positions are masked from both the loss and
    attention, so reusing BOS there is harmless), so the vocabulary and the embeddings never grow.
    """
    stops = {tokenizer.eos_token, end_of_turn_token(tokenizer)}
    for candidate in (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate and candidate not in stops:
            if candidate != tokenizer.pad_token:
                log.info("pad token: %r (was %r, which is an end token or unset)", candidate, tokenizer.pad_token)
            tokenizer.pad_token = candidate
            return candidate
    raise ValueError(
        "the tokenizer has no pad, unk or bos token distinct from its EOS/end-of-turn token; add a pad token"
    )


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text the model sees before it answers: every message but the last assistant one, plus the
    generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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

    def jinja(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _pieces(self, roles: tuple[str, ...]) -> list[str] | None:
        marks = [f"\x02{i}\x03" for i in range(len(roles))]
        text = self.jinja([{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)])
        pieces = []
        for mark in marks:
            head, found, text = text.partition(mark)
            if not found or any(m in head for m in marks):
                return None
            pieces.append(head)
        return pieces + [text]

    def __call__(self, messages: list[dict[str, str]]) -> str:
        roles = tuple(m["role"] for m in messages)
        if roles not in self.pieces:
            self.pieces[roles] = self._pieces(roles)
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
