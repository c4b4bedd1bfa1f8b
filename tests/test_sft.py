"""The trainer's loss: computed on the trained positions only, it equals the cross-entropy of the full logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skytune.core.chat.tokenization import IGNORE
from skytune.core.training import head_loss
from skytune.core.training.head_loss import HEAD_IS_LAST, trained_positions_loss
from skytune.core.training.sft import final_eval_loss


def _batch(tokenizer: object) -> dict[str, torch.Tensor]:
    """A padding-free batch of three sequences as TRL's collator builds it, some positions trained."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for i, length in enumerate((7, 12, 5)):
        ids = [(17 * i + 3 * j) % 300 + 20 for j in range(length)]
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "labels": labels})
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


def _reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Independent: the full logits, shifted, mean cross-entropy over the trained labels, and its gradients.
    (use_cache=False, as any training forward: with a cache transformers does not split a padding-free row.)"""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=IGNORE)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return expected.detach(), grads


def _assert_same_loss_and_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    expected, grads = _reference(model, batch)
    loss = trained_positions_loss(model, dict(batch))
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-6), name
    model.zero_grad()


@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3"])
def test_trained_positions_loss_equals_the_full_logits_loss_and_its_gradients(
        tiny_model: Path, chunk_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if chunk_rows:  # the head and loss fused over several chunks of positions
        monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * chunk_rows)
    batch = _batch(None)
    assert (batch["labels"] != IGNORE).sum() < batch["labels"].numel() // 2 + 3  # most positions are not trained
    _assert_same_loss_and_gradients(model, batch)
    assert getattr(model.get_output_embeddings(), HEAD_IS_LAST) is True  # the fused path ran

    # With the whole optimizer step's token count (gradient accumulation), the sum is divided by it instead.
    expected, _ = _reference(model, batch)
    total = int((batch["labels"][:, 1:] != IGNORE).sum()) * 3
    scaled = trained_positions_loss(model, dict(batch), num_items_in_batch=torch.tensor(total))
    assert torch.allclose(scaled * 3, expected, rtol=1e-5)


def test_a_trained_output_head_gets_the_gradients_of_the_full_logits(tiny_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """train.method: full: the head's weight (tied to the embeddings here) is trained, through the fused loss too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * model.config.vocab_size * 4)
    assert model.get_output_embeddings().weight.requires_grad
    _assert_same_loss_and_gradients(model, _batch(None))


def test_a_model_that_soft_caps_its_logits_after_the_head_keeps_the_plain_loss() -> None:
    """Gemma 2 soft-caps its logits (tanh) after the head: the fused loss would be wrong, so it is not used. (A
    scale after the head, Cohere's, passes through the identity head and the linear head alike: fused, correct.)"""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=1.0, attn_logit_softcapping=None,
                                           pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2))
    _assert_same_loss_and_gradients(model, _batch(None))
    assert getattr(model.get_output_embeddings(), HEAD_IS_LAST) is False


def test_the_val_loss_after_training_is_the_one_logged_at_the_last_step() -> None:
    """transformers evaluates at the last step: that value is reused; an eval logged at another step is not."""
    history = [{"loss": 2.0, "step": 25}, {"eval_loss": 1.5, "step": 25}, {"loss": 1.0, "step": 46},
               {"eval_loss": 0.75, "step": 46}, {"train_runtime": 9.0, "step": 46}]
    assert final_eval_loss(history, 46) == 0.75
    assert final_eval_loss(history[:3], 46) is None  # the last eval was at step 25: evaluate again
    assert final_eval_loss([], 0) is None
