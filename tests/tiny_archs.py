"""Tiny random causal-LM checkpoints of real architecture families, built offline in about a second each.

`build_tiny(family, out)` saves a random model and a byte-level BPE tokenizer (trained here on a small fixed corpus)
whose special tokens, BOS/EOS/pad setup and chat template follow the family's instruct checkpoints:

- "llama3": Llama-3-Instruct: `<|begin_of_text|>` BOS (also added to plain text), `<|eot_id|>` EOS, header tokens,
  unused `<|reserved_special_token_N|>`, TRL's copy of the real Llama-3 template; no pad token unless `pad=True`.
- "qwen2": Qwen2.5-Instruct: no BOS, `<|im_end|>` EOS, `<|endoftext|>` pad (always, as shipped), TRL's Qwen2.5
  template (ChatML with a default system prompt).
- "mistral": Mistral-Instruct: `<s>` BOS (also added to plain text), `</s>` EOS, `<unk>`, `[INST]`/`[/INST]`, the
  `[INST] ... [/INST]reply</s>` template below; no pad token unless `pad=True`.

Not a test module: tests import it (`from tiny_archs import build_tiny`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

FAMILIES: tuple[str, ...] = ("llama3", "qwen2", "mistral")

VOCAB_SIZE = 400
MAX_POSITIONS = 512

# Mistral-Instruct style: a system message goes in front of the first user message; roles must alternate.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', turn=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('Only the first message may be a system message') }}{% endif %}"
    "{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% if (message['role'] == 'user') != (ns.turn % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Only system, user and assistant roles are supported') }}"
    "{% endif %}"
    "{% set ns.turn = ns.turn + 1 %}"
    "{% endif %}"
    "{% endfor %}"
)

_SUBJECTS = ("The cat", "A small dog", "My friend", "The teacher", "Our team", "The assistant", "A user", "She", "He")
_VERBS = ("reads", "writes", "likes", "finds", "answers", "explains", "opens", "builds", "checks", "asks about")
_OBJECTS = (
    "a book",
    "the question",
    "some code",
    "the weather",
    "a short story",
    "the answer",
    "two apples",
    "the system",
    "a new model",
    "the data",
)
_ENDINGS = (".", "!", "?", " today.", " again.", " in 3 minutes.", ", then stops.", " with care.")


def corpus() -> list[str]:
    """A fixed corpus of a few hundred short English sentences (no randomness: same list every call)."""
    sentences = [
        f"{subject} {verb} {obj}{ending}"
        for subject, verb, obj, ending in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
    ]
    return [*sentences[::13], "Hello! How are you?", "I am fine, thank you.", "What is 2 + 2?\nIt is 4."]


def _family_spec(family: str, pad: bool) -> dict[str, Any]:
    """The family's trained special tokens (in vocab order), named tokens, template and model class name."""
    if family == "llama3":
        reserved = [f"<|reserved_special_token_{i}|>" for i in range(4)]
        specials = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            *reserved,
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
        if pad:
            specials.append("<|finetune_right_pad_id|>")  # Llama 3.1's dedicated pad token
        return {
            "specials": specials,
            "names": {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "pad_token": "<|finetune_right_pad_id|>" if pad else None,
            },
            "extra": ["<|end_of_text|>", *reserved, "<|start_header_id|>", "<|end_header_id|>"],
            "add_bos": True,
            "template": _trl_template("llama3.jinja"),
            "model": "LlamaForCausalLM",
        }
    if family == "qwen2":
        return {
            "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "names": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            "extra": ["<|im_start|>"],
            "add_bos": False,
            "template": _trl_template("qwen2_5.jinja"),
            "model": "Qwen2ForCausalLM",
        }
    if family == "mistral":
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        if pad:
            specials.append("<pad>")
        return {
            "specials": specials,
            "names": {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>" if pad else None,
            },
            "extra": ["[INST]", "[/INST]"],
            "add_bos": True,
            "template": MISTRAL_TEMPLATE,
            "model": "MistralForCausalLM",
        }
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _trl_template(name: str) -> str:
    """A chat template file shipped with TRL (`trl/chat_templates/<name>`), read at build time."""
    from importlib.resources import files

    return files("trl").joinpath("chat_templates", name).read_text(encoding="utf-8")


def build_tiny(family: str, out: Path, *, pad: bool = False, seed: int = 0) -> Path:
    """Save a tiny random model + tokenizer of `family` into `out` and return `out`.

    `pad=True` gives llama3/mistral a dedicated pad token (`<|finetune_right_pad_id|>` / `<pad>`); qwen2 always
    has `<|endoftext|>`. `seed` seeds the weights only. Same arguments, same files. No network.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    spec = _family_spec(family, pad)
    bpe = Tokenizer(models.BPE())
    if family == "qwen2":
        # AutoTokenizer always loads a qwen2 checkpoint as Qwen2Tokenizer, which rebuilds the pipeline around the
        # saved vocab and merges (NFC, Qwen's split regex, then bytes): train on that same pipeline.
        from tokenizers import Regex, normalizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        bpe.normalizer = normalizers.NFC()
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer)
    bos = spec["names"]["bos_token"]
    if spec["add_bos"]:  # Llama 3 and Mistral tokenizers put BOS in front of plain text; Qwen has no BOS
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        **{name: token for name, token in spec["names"].items() if token is not None},
        additional_special_tokens=spec["extra"],
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = spec["template"]

    return save_tiny(spec["model"], tokenizer, Path(out), seed=seed, max_positions=MAX_POSITIONS)


def save_tiny(model_class_name: str, tokenizer: Any, out: Path, *, seed: int, max_positions: int,
              tie_embeddings: bool = False, head_dim: int | None = None) -> Path:
    """Save a random 2-layer model of `model_class_name` (a transformers class) covering `tokenizer`'s vocabulary,
    and the tokenizer, into `out`; return `out`. `head_dim`: the attention heads' size, 16 unless given (vLLM's CPU
    attention wants 32 or more)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model_class = getattr(transformers, model_class_name)
    config = model_class.config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
