"""The trainer's loss: computed on the trained positions only, it equals the cross-entropy of the full logits."""

from __future__ import annotations

from pathlib import Path

import torch

from skytune.core.chat.tokenization import IGNORE
from skytune.core.training.sft import trained_positions_loss


def _batch(tokenizer: object) -> dict[str, torch.Tensor]:
    """A padding-free batch of three sequences as TRL's collator builds it, some positions trained."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for i, length in enumerate((7, 12, 5)):
        ids = [(17 * i + 3 * j) % 300 + 20 for j in range(length)]
        labels = [IGNORE] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "labels": labels})
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


def test_trained_positions_loss_equals_the_full_logits_loss_and_its_gradients(tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _batch(None)
    assert (batch["labels"] != IGNORE).sum() < batch["labels"].numel() // 2 + 3  # most positions are not trained

    # Independent: the full logits, shifted, mean cross-entropy over the trained labels. (use_cache=False, as any
    # training forward: with a cache transformers does not split a padding-free row into its sequences.)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    loss = trained_positions_loss(model, dict(batch))
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-6), name

    # With the whole optimizer step's token count (gradient accumulation), the sum is divided by it instead.
    total = int((batch["labels"][:, 1:] != IGNORE).sum()) * 3
    scaled = trained_positions_loss(model, dict(batch), num_items_in_batch=torch.tensor(total))
    assert torch.allclose(scaled * 3, expected, rtol=1e-5)
