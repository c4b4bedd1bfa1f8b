"""The tiny-architecture helper: each family builds offline, loads through the Auto classes, and behaves like its
instruct checkpoints (special tokens, chat template, BOS handling, pad token)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tiny_archs import FAMILIES, build_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello! How are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
]
MODEL_CLASS = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>"}
MARKERS = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\n"),
    "qwen2": ("<|im_start|>system\nBe brief.<|im_end|>\n", "<|im_start|>user\n"),
    "mistral": ("<s>[INST] Be brief.\n\nHello! How are you? [/INST]", "[INST] What is 2 + 2? [/INST]"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


def _digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_renders_and_runs(built: dict[str, Path], family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[family])
    model = AutoModelForCausalLM.from_pretrained(built[family])
    assert type(model).__name__ == MODEL_CLASS[family]
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert not model.config.tie_word_embeddings

    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    for marker in MARKERS[family]:
        assert marker in text
    for reply in ("I am fine, thank you.", "It is 4."):  # each reply is closed by the family's end-of-turn token
        assert reply + END_OF_TURN[family] in text
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)

    batch = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    offsets = batch.pop("offset_mapping")[0].tolist()
    assert tokenizer.decode(batch["input_ids"][0]) == text
    assert "".join(text[start:end] for start, end in offsets) == text  # ASCII text: the offsets tile it exactly
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_bos_and_pad_follow_the_family(built: dict[str, Path]) -> None:
    llama, qwen, mistral = (AutoTokenizer.from_pretrained(built[family]) for family in ("llama3", "qwen2", "mistral"))
    assert (llama.bos_token, llama.pad_token) == ("<|begin_of_text|>", None)
    assert (mistral.bos_token, mistral.unk_token, mistral.pad_token) == ("<s>", "<unk>", None)
    assert (qwen.bos_token, qwen.pad_token) == (None, "<|endoftext|>")
    for tokenizer in (llama, mistral):  # BOS in front of plain text; the template writes its own
        assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    assert qwen("hi")["input_ids"] == qwen("hi", add_special_tokens=False)["input_ids"]
    text = qwen.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")  # Qwen2.5's default system prompt
    assert "<|reserved_special_token_0|>" in llama.all_special_tokens


@pytest.mark.parametrize(("family", "pad_token"), [("llama3", "<|finetune_right_pad_id|>"), ("mistral", "<pad>")])
def test_pad_option_adds_a_distinct_pad_token(tmp_path: Path, family: str, pad_token: str) -> None:
    out = build_tiny(family, tmp_path / family, pad=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.pad_token == pad_token != tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id < model.config.vocab_size


def test_same_inputs_same_files(built: dict[str, Path], tmp_path: Path) -> None:
    assert _digests(build_tiny("qwen2", tmp_path / "again")) == _digests(built["qwen2"])
    reseeded = _digests(build_tiny("qwen2", tmp_path / "reseeded", seed=1))
    assert reseeded["model.safetensors"] != _digests(built["qwen2"])["model.safetensors"]
    assert reseeded["tokenizer.json"] == _digests(built["qwen2"])["tokenizer.json"]


def test_loaded_tokenizer_matches_the_trained_one(built: dict[str, Path]) -> None:
    """AutoTokenizer rebuilds qwen2's pipeline (Qwen2Tokenizer): it must split text as the trained tokenizer did."""
    from tokenizers import Tokenizer

    text = "A cafe\u0301 at 10 o'clock!\n\n  IT'S\tok?"  # a decomposed é: Qwen2Tokenizer normalizes to NFC
    for family in FAMILIES:
        raw = Tokenizer.from_file(str(built[family] / "tokenizer.json"))
        loaded = AutoTokenizer.from_pretrained(built[family])
        assert loaded(text)["input_ids"] == raw.encode(text).ids, family


def test_mistral_template_rules(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["mistral"])
    plain = tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert plain == "<s>[INST] Hello! How are you? [/INST]I am fine, thank you.</s>"
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([CONVERSATION[1], CONVERSATION[3]], tokenize=False)
    with pytest.raises(Exception, match="system"):
        tokenizer.apply_chat_template([*CONVERSATION[1:3], CONVERSATION[0]], tokenize=False)


def test_template_whitespace(built: dict[str, Path]) -> None:
    """Llama 3's template trims message content; Qwen2.5's and the Mistral one keep it verbatim."""
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": " ok \n"}]
    rendered = {
        family: AutoTokenizer.from_pretrained(built[family]).apply_chat_template(messages, tokenize=False)
        for family in FAMILIES
    }
    assert "<|end_header_id|>\n\nok<|eot_id|>" in rendered["llama3"]
    assert "<|im_start|>assistant\n ok \n<|im_end|>" in rendered["qwen2"]
    assert rendered["mistral"] == "<s>[INST]  hi  [/INST] ok \n</s>"
