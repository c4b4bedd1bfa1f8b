"""The sanity check's metrics catch what they are there to catch, and generation is the same batched or not."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, PipelineRun

from skytune.core.atomic import read_jsonl
from skytune.core.chat import chat_template, tokenization
from skytune.core.data import identity
from skytune.core.evaluation import generation, scoring
from skytune.core.models.base import BaseModel, load_tokenizer
from skytune.core.models.loading import (
    load_for_training,
    load_full_precision,
    load_saved_tokenizer,
)
from skytune.core.params import load_params
from skytune.core.training.sft import build_trainer


def _answers(model: object, tokenizer: object, questions: list[str], max_new_tokens: int = 32,
             batch_size: int = 8) -> list[generation.Generation]:
    prompts = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    stops = sorted({tokenizer.eos_token, chat_template.end_of_turn_token(tokenizer)})
    return generation.generate_greedy(model, tokenizer, prompts, stop_tokens=stops, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)


def test_ends_with_eot_falls_when_pad_is_eos(pipeline: PipelineRun, tmp_path: Path) -> None:
    """The classic broken setup (the ancestor's): the tokenizer's pad token is EOS, and the language-modelling
    collator masks every pad token out of the loss, which masks every real end-of-turn token too (ChatML's
    end-of-turn is EOS), so the model never learns to stop. Train the same model on the same data both ways; the
    metric must tell them apart."""
    from transformers import DataCollatorForLanguageModeling

    root = pipeline.root
    paths = load_params(root / "params.yaml").paths
    manifest = BaseModel.load(root / paths.base_model_dir)
    base = BaseModel(**{**manifest.__dict__, "ref": str(root / manifest.ref)})
    records = [r for r in read_jsonl(root / paths.train_file) if r["source"] == identity.SOURCE]
    train = dataclasses.replace(load_params(REPO / "params.yaml").train, method="lora", epochs=6, eval_steps=1000,
                                logging_steps=50)
    questions = [*identity.WHO_QUESTIONS, *identity.CREATOR_QUESTIONS]
    stopped = {}
    for name in ("correct", "pad_is_eos"):
        tokenizer = load_tokenizer(base)
        assert chat_template.end_of_turn_token(tokenizer) == tokenizer.eos_token  # ChatML: <|im_end|> is both
        encoded = tokenization.Encoder(tokenizer, "assistant_only").encode(records)
        if name == "pad_is_eos":
            tokenizer.pad_token = tokenizer.eos_token
            collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels: input ids, pad masked
            masked = [collate([{"input_ids": e.input_ids}])["labels"][0].tolist() for e in encoded]
            encoded = [dataclasses.replace(e, labels=[label if keep != tokenization.IGNORE else keep
                                                      for label, keep in zip(e.labels, m, strict=True)])
                       for e, m in zip(encoded, masked, strict=True)]
            assert all(tokenizer.eos_token_id not in [x for x in e.labels if x != tokenization.IGNORE]
                       for e in encoded)
        model, _ = load_for_training(base, four_bit=False, quant_type="nf4", double_quant=False,
                                            dtype=torch.float32)
        trainer = build_trainer(model, tokenizer, encoded, encoded[:8], train, output_dir=tmp_path / name, seed=0,
                                    dtype=torch.float32, save=False)
        trainer.train()
        stopped[name] = scoring.answer_stats(_answers(trainer.model.eval(), tokenizer, questions))["ends_with_eot"]
    print(f"ends_with_eot after training: {stopped}")
    assert stopped["correct"] == 1.0
    assert stopped["pad_is_eos"] <= 0.5, stopped


def test_batched_generation_gives_the_one_by_one_answers(pipeline: PipelineRun) -> None:
    root = pipeline.root
    paths = load_params(root / "params.yaml").paths
    merged = root / paths.merged_dir
    tokenizer = load_saved_tokenizer(merged)
    model = load_full_precision(merged, None, torch.float32)
    questions = [r["messages"][-2]["content"] for r in read_jsonl(root / paths.val_file)[:12]]
    questions += [*identity.WHO_QUESTIONS[:2]]
    batched = _answers(model, tokenizer, questions, batch_size=8)
    single = _answers(model, tokenizer, questions, batch_size=1)
    agree = scoring.agreement(batched, single)
    assert agree["stop_agreement"] == 1.0 and agree["exact_match"] >= 0.9, agree
    assert [g.text for g in batched][-2:] == [g.text for g in single][-2:]  # order kept after length sorting


def test_agreement_counts_differences() -> None:
    a = [generation.Generation("x", 1, True), generation.Generation("y", 2, False)]
    b = [generation.Generation("x", 1, True), generation.Generation("z", 2, True)]
    assert scoring.agreement(a, b) == {"exact_match": 0.5, "stop_agreement": 0.5}
    with pytest.raises(ValueError):
        scoring.agreement(a, b[:1])


def test_perplexity_is_over_the_labelled_tokens_only(tiny_model: Path) -> None:
    tokenizer = load_saved_tokenizer(tiny_model)
    model = load_full_precision(tiny_model, None, torch.float32)
    record = {"id": "r", "source": "s", "messages": [{"role": "user", "content": "what is 2 plus 3?"},
                                                      {"role": "assistant", "content": "5"}]}
    full = tokenization.Encoder(tokenizer, "full").encode([record])
    answer = tokenization.Encoder(tokenizer, "assistant_only").encode([record])
    ppl_full, n_full = scoring.perplexity(model, full, pad_id=tokenizer.pad_token_id, batch_size=4)
    ppl_answer, n_answer = scoring.perplexity(model, answer, pad_id=tokenizer.pad_token_id, batch_size=4)
    assert n_full == len(full[0].input_ids) - 1 and n_answer == 2  # "5" and <|im_end|>
    assert ppl_full != ppl_answer
    # Padding does not change it: the same record in a batch with a longer one.
    longer = {**record, "id": "q", "messages": [{"role": "user", "content": "hello " * 20},
                                                 {"role": "assistant", "content": "hi"}]}
    both = tokenization.Encoder(tokenizer, "assistant_only").encode([record, longer])
    alone = scoring.perplexity(model, both[1:], pad_id=tokenizer.pad_token_id, batch_size=4)
    together = scoring.perplexity(model, both, pad_id=tokenizer.pad_token_id, batch_size=4)
    separately = scoring.perplexity(model, both, pad_id=tokenizer.pad_token_id, batch_size=1)
    assert together[1] == alone[1] + n_answer and together[0] == pytest.approx(separately[0], rel=1e-5)


def _records(count: int, vocab: int) -> list[tokenization.Encoded]:
    """Sequences of several lengths, a labelled tail each (one with no label at all)."""
    out = []
    for i in range(count):
        ids = [(31 * i + 7 * j) % (vocab - 10) + 5 for j in range(4 + 3 * i)]
        labels = [tokenization.IGNORE] * (len(ids) // 2) + ids[len(ids) // 2:] if i != 1 else [tokenization.IGNORE] * len(ids)
        out.append(tokenization.Encoded(id=str(i), source="s", text="", input_ids=ids, labels=labels, offsets=[]))
    return out


def _gemma2() -> torch.nn.Module:
    """A tiny Gemma 2: it soft-caps its logits after the head, so the head and loss are not fused for it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=1.0, attn_logit_softcapping=None, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.parametrize("kind", ["llama", "llama-chunks-of-3-and-small-batches", "gemma2-soft-capped"])
def test_perplexity_is_the_cross_entropy_of_the_full_logits(tiny_model: Path, kind: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Against an independent computation: each record alone, its full logits, the cross-entropy over its labelled
    next tokens; summed over records, divided by their labelled tokens."""
    from skytune.core.training import head_loss

    model = _gemma2() if kind.startswith("gemma2") else load_full_precision(tiny_model, None, torch.float32)
    if "chunks" in kind:  # the head over several chunks of positions, the records over several batches
        monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 3)
        monkeypatch.setattr(scoring, "PERPLEXITY_TOKENS", 40)
    records = _records(7, model.config.vocab_size)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            logits = model(input_ids=torch.tensor([r.input_ids])).logits[0, :-1].float()
            targets = torch.tensor(r.labels[1:])
            nll += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            n += int((targets != -100).sum())
    assert scoring.perplexity(model, records, pad_id=0, batch_size=4) == (pytest.approx(math.exp(nll / n),
                                                                                         rel=1e-5), n)


def test_retained_is_the_fraction_of_what_the_base_knew_that_the_tuned_model_still_knows() -> None:
    from skytune.stages.sanity_check import _retained

    def probe(base: bool, tuned: bool, kind: str = "retained", half: str = "heldout") -> dict:
        return {"kind": kind, "base_match": base, "tuned_match": tuned, "half": half}

    # 4 held-out probes the base knows, 3 of them kept; a probe only the tuned model knows, and other kinds, do not
    # count; the dev half's probes are counted apart (1 of 2 kept).
    rows = [probe(True, True), probe(True, False), probe(True, True), probe(True, True), probe(False, True),
            probe(True, False, kind="identity"), probe(True, False, kind="val"), probe(True, False, half="dev"),
            probe(True, True, half="dev"), probe(False, False, half="dev")]
    assert _retained(rows) == {"retained": 0.75, "retained_probes_base_correct": 4, "retained_dev": 0.5,
                               "retained_dev_probes_base_correct": 2}
    assert _retained([probe(False, True), probe(False, False)]) == {}  # nothing known: no fraction to report
