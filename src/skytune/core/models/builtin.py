"""The built-in model: a random Llama with a byte-level BPE tokenizer trained on the sample data and a ChatML
template, built deterministically from the seed, offline. What most tests train, and the one-minute run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from skytune.core.chat import chat_template

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-llama",)


def build_builtin(
    out_dir: Path,
    corpus: Iterable[str],
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    seed: int,
) -> None:
    """Build the built-in model into `out_dir`: a random Llama with a byte-level BPE tokenizer trained on
    `corpus` and a ChatML template with generation markers. Same inputs and seed, same files. No network."""
    import torch  # here: the launcher's preflight imports this module for BUILTIN_PREFIX, and needs no torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = [*chat_template.CHATML_SPECIAL_TOKENS.values(), *chat_template.CHATML_EXTRA_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    special = chat_template.CHATML_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special["pad"],
        additional_special_tokens=chat_template.CHATML_EXTRA_TOKENS,
        model_max_length=max_position_embeddings,
    )
    tokenizer.chat_template = chat_template.CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
