"""merge_adapters: merge the LoRA adapter into a full-precision copy of the base model.

    python -m skytune.stages.merge_adapters      (normally: dvc repro merge_adapters)

Never merges onto a 4-bit base (peft#2105: measured max logit difference 5.96 against 1e-5): the base is reloaded
in the compute dtype (fp32 on CPU, bf16/fp16 on GPU) and merged with `safe_merge`. Writes `paths.merged_dir`
(safetensors, tokenizer with its chat template, and a generation config whose eos ids include the template's
end-of-turn token) and `paths.merge_metrics` with the max absolute logit difference between base+adapter and
the merged model on the first `merge_adapters.logit_check_records` val records.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from skytune import chat_template, models
from skytune.atomic import atomic_dir, read_jsonl, write_json
from skytune.params import Params
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    from peft import PeftModel

    base = models.BaseModel.load(params.paths.base_model_dir)
    adapter_dir = Path(params.paths.adapter_dir)
    tokenizer = models.load_saved_tokenizer(adapter_dir)
    dtype = models.compute_dtype(params.train.compute_dtype)  # the dtype training computed in
    records = read_jsonl(params.paths.val_file)[: params.merge_adapters.logit_check_records]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    tokenizer.padding_side = "right"

    if not (adapter_dir / "adapter_config.json").is_file():  # train.method: full saved the whole model
        merged = models.load_full_precision(adapter_dir, None, dtype)
        max_diff = 0.0
        log.info("%s holds a fully fine-tuned model: nothing to merge", adapter_dir)
    else:
        model = models.load_full_precision(base.ref, base.revision, dtype)
        models.fit_embeddings(model, tokenizer)
        model = PeftModel.from_pretrained(model, adapter_dir)
        model.eval()
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            unmerged = model(**batch).logits.float()
            merged = model.merge_and_unload(safe_merge=True)
            after = merged(**batch).logits.float()
        mask = batch["attention_mask"].bool()
        max_diff = (unmerged - after).abs()[mask].max().item()
        log.info("max |logit difference| base+adapter vs merged: %.3g over %d records", max_diff, len(records))

    eot = chat_template.end_of_turn_token(tokenizer)
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot)})
    merged.generation_config.eos_token_id = stop_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.bos_token_id = tokenizer.bos_token_id
    merged.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(params.paths.merged_dir) as out:
        merged.save_pretrained(out, max_shard_size="2GB")
        tokenizer.save_pretrained(out)
    write_json(params.paths.merge_metrics, {
        "max_abs_logit_diff": max_diff,
        "merge_dtype": str(dtype).removeprefix("torch."),
        "logit_check_records": len(records),
    })


if __name__ == "__main__":
    run_stage(main)
