"""The tokenization gate and the loss masks, on tiny random Llama, Qwen2 and Mistral models with their families'
templates (Llama 3, Qwen2.5's ChatML, Mistral [INST]) and ours (ChatML with generation markers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from tiny_archs import FAMILIES, build_tiny

from skytune.core.chat import chat_template, tokenization
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, describe_base, load_tokenizer
from skytune.core.models.loading import load_for_training, load_saved_tokenizer
from skytune.core.params import load_params
from skytune.core.training.sft import build_trainer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def record(messages: list[dict[str, str]], rid: str = "r1") -> dict[str, Any]:
    return {"id": rid, "source": "test", "messages": messages}


@pytest.fixture(scope="module", params=[*FAMILIES, "builtin-chatml"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           tiny_model: Path) -> tuple[str, Any]:
    """(family, tokenizer) set up as the pipeline sets it up: template resolved, pad token chosen."""
    name = request.param
    path = tiny_model if name == "builtin-chatml" else build_tiny(name, tmp_path_factory.mktemp(name))
    base = describe_base("local", name, str(path), None, template="keep", pad_token="auto")
    return name, load_tokenizer(base)


def trained_text(tokenizer: Any, encoded: tokenization.Encoded) -> str:
    return tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
                             if label != tokenization.IGNORE])


def test_every_invariant_holds_for_each_family(family: tuple[str, Any]) -> None:
    name, tokenizer = family
    [encoded] = tokenization.Encoder(tokenizer, "assistant_only").encode([record(CONVERSATION)])
    report = tokenization.gate(tokenizer, [encoded], max_length=512, loss="assistant_only", where="test")
    eot = chat_template.end_of_turn_token(tokenizer)
    # Exactly one BOS, first, where the family uses one (Qwen has none).
    if name == "qwen2":
        assert tokenizer.bos_token is None
    else:
        assert encoded.input_ids.count(tokenizer.bos_token_id) == 1 and encoded.input_ids[0] == tokenizer.bos_token_id
    # Both assistant turns are trained, each up to and including its end-of-turn token, and nothing else is.
    assert report.assistant_turns == 2
    assert trained_text(tokenizer, encoded).replace(" ", "") == f"It is 4.{eot}It is 6.{eot}".replace(" ", "")
    for turn in encoded.turns:
        assert encoded.input_ids[turn.eot] == tokenizer.convert_tokens_to_ids(eot)
        assert turn.end > turn.start
    # Pad is neither EOS nor the end-of-turn token.
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot), None)


def test_loss_modes(family: tuple[str, Any]) -> None:
    tokenizer = family[1]
    eot = chat_template.end_of_turn_token(tokenizer)
    counts = {}
    for loss in tokenization.LOSS_MODES:
        [encoded] = tokenization.Encoder(tokenizer, loss).encode([record(CONVERSATION)])
        tokenization.gate(tokenizer, [encoded], max_length=512, loss=loss, where="test")
        counts[loss] = sum(label != tokenization.IGNORE for label in encoded.labels)
        if loss == "completion_only":
            assert trained_text(tokenizer, encoded).replace(" ", "") == f"It is 6.{eot}".replace(" ", "")
        if loss == "full":
            assert encoded.labels == encoded.input_ids
    assert counts["full"] > counts["assistant_only"] > counts["completion_only"] > 0


def test_an_assistant_turn_with_loss_weight_0_is_context_under_every_loss(family: tuple[str, Any]) -> None:
    """LLaMA-Factory v1's `loss_weight: 0`: the first answer is context; the rest is trained as the loss says."""
    tokenizer = family[1]
    eot = chat_template.end_of_turn_token(tokenizer)
    first_untrained = [*CONVERSATION[:2], {**CONVERSATION[2], "loss_weight": 0}, *CONVERSATION[3:]]
    last_untrained = [*CONVERSATION[:4], {**CONVERSATION[4], "loss_weight": 0}]
    for messages, loss, expected in [(first_untrained, "assistant_only", f"It is 6.{eot}"),
                                     (first_untrained, "completion_only", f"It is 6.{eot}"),
                                     (last_untrained, "assistant_only", f"It is 4.{eot}"),
                                     (last_untrained, "completion_only", f"It is 4.{eot}")]:
        [encoded] = tokenization.Encoder(tokenizer, loss).encode([record(messages)])
        tokenization.gate(tokenizer, [encoded], max_length=512, loss=loss, where="test")
        assert trained_text(tokenizer, encoded).replace(" ", "") == expected.replace(" ", ""), (loss, messages)
    [full] = tokenization.Encoder(tokenizer, "full").encode([record(first_untrained)])
    [everything] = tokenization.Encoder(tokenizer, "full").encode([record(CONVERSATION)])
    [answer] = tokenization.Encoder(tokenizer, "completion_only").encode([record(CONVERSATION[:3])])
    left_out = sum(label != tokenization.IGNORE for label in answer.labels)  # "It is 4." and its end of turn
    trained = trained_text(tokenizer, full)
    assert "It is 4." not in trained and "It is 6." in trained and "2 plus 2" in trained
    assert sum(label != tokenization.IGNORE for label in full.labels) == len(everything.input_ids) - left_out


def test_pad_strategies(tmp_path: Path) -> None:
    llama = build_tiny("llama3", tmp_path / "llama3")
    mistral = build_tiny("mistral", tmp_path / "mistral")

    def pad(path: Path, strategy: str) -> str:
        base = describe_base("local", "x", str(path), None, template="keep", pad_token=strategy)
        return load_tokenizer(base).pad_token

    assert pad(llama, "auto").startswith("<|reserved_special_token_")  # an unused special token, not EOS
    assert pad(llama, "bos") == "<|begin_of_text|>"
    assert pad(mistral, "auto") == "<unk>"
    assert pad(mistral, "add") == chat_template.PAD_TOKEN_ADDED
    with pytest.raises(SkytuneError, match="model.pad_token: unk"):
        pad(llama, "unk")  # Llama 3 has no UNK


def gate_error(tokenizer: Any, records: list[dict[str, Any]], loss: str = "assistant_only",
               max_length: int = 512) -> str:
    encoded = tokenization.Encoder(tokenizer, loss).encode(records)
    with pytest.raises(tokenization.GateError) as err:
        tokenization.gate(tokenizer, encoded, max_length=max_length, loss=loss, where="data/train.jsonl")
    return str(err.value)


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_gate_catches_pad_equal_to_eos(name: str, tmp_path: Path) -> None:
    base = describe_base("local", name, str(build_tiny(name, tmp_path)), None, template="keep",
                                pad_token="auto")
    tokenizer = load_tokenizer(base)
    tokenizer.pad_token = tokenizer.eos_token  # the ancestor's setup
    message = gate_error(tokenizer, [record(CONVERSATION)])
    assert "pad_is_stop_token: 1 sequence(s), e.g. test/r1" in message and "data/train.jsonl" in message


def test_gate_catches_double_bos_empty_turns_and_overlong_sequences(family: tuple[str, Any]) -> None:
    tokenizer = family[1]
    if tokenizer.bos_token is not None:
        smuggled = [{"role": "user", "content": f"{tokenizer.bos_token}hi"}, {"role": "assistant", "content": "yo"}]
        assert "bos_count: 1 sequence(s), e.g. test/bos (2 BOS, the template writes 1)" in gate_error(
            tokenizer, [record(smuggled, "bos")])
    empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert "empty_assistant_turn: 1 sequence(s), e.g. test/empty (assistant turn 0)" in gate_error(
        tokenizer, [record(empty, "empty")])
    assert "too_long: 1 sequence(s)" in gate_error(tokenizer, [record(CONVERSATION, "long")], max_length=8)


def test_gate_catches_a_template_that_drops_the_end_of_turn_of_earlier_answers(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    tokenizer.chat_template = (  # only the last answer is closed with <|im_end|>: earlier ones never teach stopping
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] != 'assistant' or loop.last %}<|im_end|>{% endif %}\n{% endfor %}")
    message = gate_error(tokenizer, [record(CONVERSATION)])
    assert "end_of_turn_not_trained: 1 sequence(s), e.g. test/r1 (assistant turn 0)" in message


def test_a_template_that_never_ends_a_turn_is_refused(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(SkytuneError, match="could not learn to stop"):
        tokenization.Encoder(tokenizer, "assistant_only")


def test_a_template_that_reorders_messages_is_refused(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    tokenizer.chat_template = "{% for m in messages | reverse %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(tokenization.TemplateError, match="does not write the messages"):
        tokenization.Encoder(tokenizer, "assistant_only").encode([record(CONVERSATION)])


def test_template_strategies(tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    llama = AutoTokenizer.from_pretrained(build_tiny("llama3", tmp_path / "llama3"))
    template, notes = chat_template.resolve_template(llama, "keep")
    assert has_generation_markers(template) and "generation markers added" in notes[0]
    qwen = AutoTokenizer.from_pretrained(build_tiny("qwen2", tmp_path / "qwen2"))
    assert chat_template.resolve_template(qwen, "chatml")[0] == chat_template.CHATML_TEMPLATE
    mistral_dir = build_tiny("mistral", tmp_path / "mistral")
    mistral = AutoTokenizer.from_pretrained(mistral_dir)
    chatml, _ = chat_template.resolve_template(mistral, "chatml")  # a base without ChatML's tokens: they are added
    assert chat_template.missing_tokens(mistral, chatml) == ["<|im_start|>", "<|im_end|>"]
    assert chat_template.missing_tokens(qwen, chatml) == []
    zephyr, _ = chat_template.resolve_template(mistral, str(REPO / "templates/zephyr.jinja"))
    base = BaseModel("local", "m", str(mistral_dir), None, zephyr, "auto")
    tokenizer = load_tokenizer(base)
    [encoded] = tokenization.Encoder(tokenizer, "assistant_only").encode([record(CONVERSATION)])
    tokenization.gate(tokenizer, [encoded], max_length=512, loss="assistant_only", where="test")
    assert trained_text(tokenizer, encoded).replace(" ", "") == "Itis4.</s>Itis6.</s>"


def test_a_bos_the_tokenizer_adds_by_default_is_written_by_the_template(tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny("mistral", tmp_path))
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    template, notes = chat_template.resolve_template(tokenizer, "keep")
    assert template.startswith("{{ bos_token }}") and any("BOS" in n for n in notes)


def test_samples_mark_the_trained_spans(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    encoded = tokenization.Encoder(tokenizer, "assistant_only").encode([record(CONVERSATION)])
    text = tokenization.render_samples(encoded, 4, loss="assistant_only")
    assert "⟦It is 4.<|im_end|>⟧" in text and "⟦It is 6.<|im_end|>⟧" in text
    sample = text.split("## test/r1")[1]
    assert "⟦" not in sample.split("⟦It is 4.")[0]  # the system and user turns are context only


@pytest.mark.parametrize("name", FAMILIES)
def test_each_architecture_trains_on_the_gated_sequences(name: str, tmp_path: Path) -> None:
    path = build_tiny(name, tmp_path / name)
    base = describe_base("local", name, str(path), None, template="keep", pad_token="auto")
    tokenizer = load_tokenizer(base)
    records = [record([{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"It is {2 * i}."}], f"r{i}") for i in range(16)]
    encoded = tokenization.Encoder(tokenizer, "assistant_only").encode(records)
    tokenization.gate(tokenizer, encoded, max_length=512, loss="assistant_only", where="test")
    params = dataclasses.replace(load_params(REPO / "params.yaml").train, method="lora", epochs=2, batch_size=4,
                                 total_batch_size=4, eval_steps=100, logging_steps=1)
    model, _ = load_for_training(base, four_bit=False, quant_type="nf4", double_quant=False,
                                        dtype=torch.float32)
    trainer = build_trainer(model, tokenizer, encoded, encoded[:4], params, output_dir=tmp_path / "out",
                                seed=0, dtype=torch.float32, save=False)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
