"""Chat-template facts: end-of-turn token, pad token, and the fast exact renderer."""

from __future__ import annotations

import random
from pathlib import Path

from skytune.core.chat import chat_template
from skytune.core.models.loading import load_saved_tokenizer

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)


def conversations(n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": f"question {rng.random()}"},
                      {"role": "assistant", "content": f" answer {i} "}]  # padded: trim changes it
        out.append(turns)
    return out


def test_end_of_turn_and_pad_token(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    assert chat_template.end_of_turn_token(tokenizer) == "<|im_end|>"
    tokenizer.pad_token = tokenizer.eos_token  # the classic mistake
    chosen = chat_template.ensure_pad_token(tokenizer)
    assert chosen != tokenizer.eos_token and tokenizer.pad_token == chosen


def test_renderer_matches_jinja_exactly(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    renderer = chat_template.Renderer(tokenizer)
    convs = conversations(300)
    assert [renderer(c) for c in convs] == tokenizer.apply_chat_template(convs, tokenize=False)
    assert all(p is not None for p in renderer.pieces.values())  # the fast path was taken


def test_renderer_falls_back_when_the_template_transforms_contents(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    tokenizer.chat_template = LLAMA3_STYLE
    renderer = chat_template.Renderer(tokenizer)
    convs = conversations(100)
    assert [renderer(c) for c in convs] == tokenizer.apply_chat_template(convs, tokenize=False)
    assert all(p is None for p in renderer.pieces.values())
