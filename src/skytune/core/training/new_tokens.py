"""Tokens a run adds to the base's vocabulary, trained as rows beside the adapter.

ChatML on a base without `<|im_start|>`/`<|im_end|>` (`BaseModel.added_tokens`), or `model.pad_token: add`, gives
the tokenizer ids the base never trained. Their embedding and output rows are grown around the others' mean
(`models.loading.fit_embeddings`): a model would never emit them, and could not learn to stop. Under LoRA and QLoRA
those rows, input and output, are trained through PEFT's `trainable_token_indices` (the field's answer: TRL's
`setup_chat_format` and axolotl's `tokens:` add the tokens and train their rows). The adapter saves those rows alone,
PEFT's merge writes them into the merged model, and full fine-tuning trains every row anyway.
"""

from __future__ import annotations

from typing import Any

from skytune.core.models.base import BaseModel, load_base_tokenizer


def new_token_ids(base: BaseModel, tokenizer: Any) -> list[int]:
    """The ids `tokenizer` (a stage's, `load_tokenizer`) has beyond the base's own tokenizer: new tokens are
    appended, so these are the ids from the base tokenizer's length on."""
    return list(range(len(load_base_tokenizer(base)), len(tokenizer)))


def trainable_token_indices(model: Any, ids: list[int]) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for `ids` on `model`: the input embedding's rows, and the output head's
    where the head is its own matrix (a head tied to the embedding follows it: PEFT ties the two). None: no ids."""
    if not ids:
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {module: name.rpartition(".")[2] for name, module in model.named_modules()}
    targets = {names[embedding]: list(ids)}
    if head is not None and head.weight is not embedding.weight:
        targets[names[head]] = list(ids)
    return targets


def expose_head_bias(model: Any) -> int:
    """Give each of PEFT's `TrainableTokensWrapper`s its layer's `bias`. The wrapper answers `.weight` (its trained
    rows merged in) but not `.bias`, which TRL's fused LM head reads from the output head (`add_fused_lm_head`, in
    SFT on CUDA and in DPO and KTO everywhere): without it, training fails on the first batch. A plain attribute,
    not a second registered parameter. Returns how many wrappers it set."""
    from peft.utils.other import TrainableTokensWrapper

    count = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            module.__dict__["bias"] = getattr(module.token_adapter.base_layer, "bias", None)
            count += 1
    return count


def copy_reference_rows(model: Any) -> int:
    """Make the frozen `ref` adapter's trained rows those of the adapter being trained (`default`). TRL's DPO builds
    its reference by copying every parameter named `.default.` to `.ref.`, which misses the rows
    (`...trainable_tokens_delta.default`, no dot after): the reference would score the new tokens with their
    untrained rows. Returns how many were copied."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    count = 0
    for module in model.modules():
        rows = module.trainable_tokens_delta if isinstance(module, TrainableTokensLayer) else {}
        if "ref" in rows and "default" in rows:
            rows["ref"].data.copy_(rows["default"].data)
            count += 1
    return count
