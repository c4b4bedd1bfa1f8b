"""Loading models and saved tokenizers: the base for (Q)LoRA training, a model unquantized for merging and scoring."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from skytune.core.chat import chat_template
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, location
from skytune.core.models.devices import device_map
from skytune.core.models.quantization import (
    disable_cpu_inference_repack,
    four_bit_supported,
)

log = logging.getLogger(__name__)


def load_saved_tokenizer(directory: str | Path) -> Any:
    """A tokenizer saved by a training stage (adapter, merged model): template and pad token travel with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.chat_template is None:
        raise SkytuneError(f"{directory}: the saved tokenizer has no chat template; re-run the train stage")
    chat_template.ensure_pad_token(tokenizer, "auto")
    return tokenizer


def fit_embeddings(model: Any, tokenizer: Any) -> bool:
    """Grow the model's embeddings when the tokenizer has more tokens than rows (`model.pad_token: add`, a chat
    template's tokens the base lacks); new rows are drawn around the old ones' mean, with their covariance
    (transformers' `mean_resizing`). Returns whether they grew."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    log.info("embeddings grown from %d to %d rows for the tokens added to the tokenizer", rows, len(tokenizer))
    return True


def load_for_training(
    base: BaseModel,
    *,
    four_bit: bool,
    quant_type: str,
    double_quant: bool,
    dtype: torch.dtype,
) -> tuple[Any, str]:
    """Load the base model for (Q)LoRA; return it and what actually ran ("nf4", "fp4" or the dtype name)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"revision": base.revision, "dtype": dtype, "device_map": device_map()}
    ran = str(dtype).removeprefix("torch.")
    if four_bit:
        ok, why = four_bit_supported()
        if ok:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=dtype,
            )
            ran = quant_type
        else:
            log.warning("4-bit QLoRA is not available here (%s): training plain LoRA in %s instead", why, ran)
    try:
        model = AutoModelForCausalLM.from_pretrained(location(base), **kwargs)
    except (RuntimeError, ImportError) as exc:  # bitsandbytes present but without kernels for this device
        if "quantization_config" not in kwargs:
            raise
        del kwargs["quantization_config"]
        ran = str(dtype).removeprefix("torch.")
        log.warning("4-bit QLoRA failed to load here (%s): training plain LoRA in %s instead", exc, ran)
        model = AutoModelForCausalLM.from_pretrained(location(base), **kwargs)
    if ran in ("nf4", "fp4"):
        check_quantized(model, base)
    if ran in ("nf4", "fp4") and not torch.cuda.is_available():
        n = disable_cpu_inference_repack(model)
        log.info("4-bit on CPU: disabled the AVX512-BF16 inference repack on %d layers (bitsandbytes bug)", n)
    return model, ran


def load_dequantized(base: BaseModel, *, quant_type: str, double_quant: bool, dtype: torch.dtype) -> tuple[Any, str]:
    """The base as 4-bit training saw it, in full precision: quantized as `load_for_training` quantizes it, then
    dequantized to `dtype` (what merge_adapters merges a QLoRA adapter onto, peft#2105). Returns the model and what
    it is: "dequantized nf4" (or fp4), or "original" where 4-bit does not run here (the base's own weights)."""
    model, ran = load_for_training(base, four_bit=True, quant_type=quant_type, double_quant=double_quant, dtype=dtype)
    if ran not in ("nf4", "fp4"):
        log.warning("4-bit does not run here: the original weights stand for the quantized base")
        return load_full_precision(location(base), base.revision, dtype), "original"
    model = model.dequantize()
    model.eval()
    return model, f"dequantized {ran}"


def check_quantized(model: Any, base: BaseModel) -> None:
    """QLoRA needs the base's linear layers in 4 bits. transformers' bitsandbytes integration quietly leaves an
    architecture whose layers are its own Linear subclass (Falcon's FalconLinear) unquantized, and training on
    then fails deep inside transformers: say so once, with the way out."""
    import bitsandbytes as bnb

    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        return
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    linear = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    raise SkytuneError(f"model.base {base.name}: transformers cannot quantize {architecture} to 4 bits (none of its "
                       f"linear layers, {', '.join(linear) or 'none'}, became 4-bit), so train.method qlora cannot "
                       "train it. Set train.method: lora (LoRA on the unquantized base) and run again.")


def load_full_precision(source: str | Path, revision: str | None, dtype: torch.dtype) -> Any:
    """Load a model unquantized in `dtype`, on the GPU if there is one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), revision=revision, dtype=dtype, device_map=device_map())
    model.eval()
    return model
