"""merge_adapters: merge the LoRA adapter into a full-precision copy of the base model.

    python -m skytune.stages.merge_adapters      (normally: dvc repro merge_adapters)

Never merges onto a 4-bit base (peft#2105: measured max logit difference 5.96 against 1e-5). The base is loaded
in the compute dtype (fp32 on CPU, bf16/fp16 on GPU) and merged with `safe_merge`, onto either
- `dequantized` (`merge_adapters.onto`, when the adapter trained on a 4-bit base, as its training_params.json
  records): that 4-bit base, dequantized to the compute dtype, so the merged model answers like the model that
  trained; or
- `original`: the base checkpoint's own weights (what `lora` and `full` always use).
Writes `paths.merged_dir` (sharded safetensors, the tokenizer with its chat template, and a generation config
whose eos ids include the template's end-of-turn token) and `paths.merge_metrics`, on the first
`merge_adapters.logit_check_records` val records:
- the max absolute logit difference between base+adapter and the merged model (the merge itself: ~1e-6 in fp32);
- for QLoRA, how far the merged model is from the model as it trained (4-bit base + adapter): max and mean
  absolute logit difference and top-1 token agreement.
Idempotent: the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from skytune.core import packaging
from skytune.core.atomic import atomic_dir, read_jsonl, write_json
from skytune.core.chat import chat_template
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, location
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import (
    fit_embeddings,
    load_dequantized,
    load_for_training,
    load_full_precision,
    load_saved_tokenizer,
)
from skytune.core.params import Params
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def _logits(model: Any, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.to(model.device)).logits.float().cpu()


def _compare(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """Max and mean absolute difference and top-1 agreement of two logit tensors over the unmasked positions."""
    diff = (a - b).abs()[mask]
    top1 = (a.argmax(-1) == b.argmax(-1))[mask].float().mean().item()
    return diff.max().item(), diff.mean().item(), top1


def _load_four_bit(base: BaseModel, trained: dict[str, Any], dtype: torch.dtype) -> tuple[Any, str]:
    """The 4-bit base exactly as the adapter trained on it (quantization settings from training_params.json)."""
    return load_for_training(base, four_bit=True, quant_type=trained["quantization"],
                                    double_quant=trained["train"]["double_quant"], dtype=dtype)


def _load_base(base: BaseModel, onto: str, trained: dict[str, Any], dtype: torch.dtype) -> tuple[Any, str]:
    if onto == "dequantized":
        return load_dequantized(base, quant_type=trained["quantization"], double_quant=trained["train"]["double_quant"],
                                dtype=dtype)
    return load_full_precision(location(base), base.revision, dtype), "original"


def main(params: Params) -> None:
    base = BaseModel.load(params.paths.base_model_dir)
    adapter_dir = packaging.tuned_adapter(params.paths.adapter_dir, params.paths.preference_adapter_dir)
    tokenizer = load_saved_tokenizer(adapter_dir)
    dtype = compute_dtype(params.train.compute_dtype)  # the dtype training computed in
    records = read_jsonl(params.paths.val_file)[: params.merge_adapters.logit_check_records]
    if not records:
        raise SkytuneError(f"{params.paths.val_file} is empty: merge_adapters checks the merge on val records "
                           "(split.val_fraction must leave some)")
    tokenizer.padding_side = "right"
    batch = tokenizer([chat_template.render(tokenizer, r["messages"], r.get("tools")) for r in records],
                      return_tensors="pt", padding=True, add_special_tokens=False)
    metrics: dict[str, Any] = {"merge_dtype": str(dtype).removeprefix("torch."), "logit_check_records": len(records)}
    if not (adapter_dir / packaging.ADAPTER_CONFIG).is_file():  # train.method: full saved the whole model
        merged = load_full_precision(adapter_dir, None, dtype)
        metrics.update(merged_onto="nothing to merge (train.method: full)", max_abs_logit_diff=0.0)
        log.info("%s holds a fully fine-tuned model: nothing to merge", adapter_dir)
    else:
        merged = _merge(params, base, adapter_dir, tokenizer, batch, dtype, metrics)
    _set_generation_tokens(merged, tokenizer)
    with atomic_dir(params.paths.merged_dir) as out:
        merged.save_pretrained(out, max_shard_size=params.merge_adapters.max_shard_size)
        tokenizer.save_pretrained(out)
    write_json(params.paths.merge_metrics, metrics)


def _merge(params: Params, base: BaseModel, adapter_dir: Path, tokenizer: Any, batch: Any, dtype: torch.dtype,
           metrics: dict[str, Any]) -> Any:
    """The adapter merged into the base, checked against base + adapter unmerged (and, after QLoRA, against the 4-bit
    model as it trained); the checks go into `metrics`."""
    from peft import PeftModel

    # What really trained (a QLoRA run falls back to plain LoRA where 4-bit cannot run), not what was asked for.
    trained = json.loads((adapter_dir / packaging.TRAINING_PARAMS).read_text(encoding="utf-8"))
    qlora = trained["quantization"] in ("nf4", "fp4")
    model, metrics["merged_onto"] = _load_base(base, params.merge_adapters.onto if qlora else "original", trained,
                                               dtype)
    fit_embeddings(model, tokenizer)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    unmerged = _logits(model, batch)
    merged = model.merge_and_unload(safe_merge=True)
    after = _logits(merged, batch)
    metrics["max_abs_logit_diff"] = _compare(unmerged, after, batch["attention_mask"].bool())[0]
    log.info("merged onto %s weights; max |logit difference| base+adapter vs merged: %.3g over %d records",
             metrics["merged_onto"], metrics["max_abs_logit_diff"], len(batch["input_ids"]))
    if qlora:
        metrics.update(_quantized_drift(base, adapter_dir, tokenizer, batch, after, trained, dtype))
    return merged


def _set_generation_tokens(merged: Any, tokenizer: Any) -> None:
    """The template's end-of-turn token is added to the stop ids the base already has (Llama 3.1 also stops on
    <|eom_id|> and <|end_of_text|>), never put in their place; pad and BOS as training used them."""
    known = merged.generation_config.eos_token_id
    known = [known] if isinstance(known, int) else list(known or [])
    merged.generation_config.eos_token_id = sorted(
        {*known, *tokenizer.convert_tokens_to_ids(chat_template.stop_tokens(tokenizer))})
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.bos_token_id = tokenizer.bos_token_id
    merged.config.pad_token_id = tokenizer.pad_token_id


def _quantized_drift(base: BaseModel, adapter_dir: Path, tokenizer: Any, batch: Any, merged_logits: torch.Tensor,
                     trained: dict[str, Any], dtype: torch.dtype) -> dict[str, float | str]:
    """How the merged model's logits differ from those of the model as it trained (4-bit base + adapter)."""
    from peft import PeftModel

    model, ran = _load_four_bit(base, trained, dtype)
    if ran not in ("nf4", "fp4"):
        return {"vs_4bit": f"not measured: 4-bit does not run here ({ran})"}
    fit_embeddings(model, tokenizer)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    worst, average, top1 = _compare(_logits(model, batch), merged_logits, batch["attention_mask"].bool().cpu())
    log.info("4-bit (as trained) vs merged: max |logit difference| %.3g, mean %.3g, top-1 agreement %.4f",
             worst, average, top1)
    return {"max_abs_logit_diff_vs_4bit": worst, "mean_abs_logit_diff_vs_4bit": average,
            "top1_agreement_vs_4bit": round(top1, 6)}


if __name__ == "__main__":
    run_stage(main)
