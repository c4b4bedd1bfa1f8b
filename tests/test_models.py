"""The built-in model, base-model resolution, and 4-bit QLoRA gradients on CPU (the AVX512-BF16 bug)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from skytune.core.errors import SkytuneError
from skytune.core.models import loading
from skytune.core.models.base import BaseModel, describe_base, load_tokenizer, resolve_base
from skytune.core.models.builtin import build_builtin
from skytune.core.models.loading import (
    load_for_training,
    load_full_precision,
    load_saved_tokenizer,
)

CORPUS = [f"question {i} answer {i * 3}" for i in range(300)]
ARCH = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_builtin_model_is_deterministic_offline(tmp_path: Path) -> None:
    build_builtin(tmp_path / "a", CORPUS, seed=5, **ARCH)
    build_builtin(tmp_path / "b", CORPUS, seed=5, **ARCH)
    build_builtin(tmp_path / "c", CORPUS, seed=6, **ARCH)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a")["model.safetensors"] != digest(tmp_path / "c")["model.safetensors"]
    tokenizer = load_saved_tokenizer(tmp_path / "a")
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.count(tokenizer.bos_token) == 1


def test_resolve_base_kinds(tmp_path: Path, tiny_model: Path) -> None:
    assert resolve_base("builtin:tiny-llama", None, tmp_path)[0] == "builtin"
    with pytest.raises(SkytuneError, match="unknown built-in model 'builtin:nope'"):
        resolve_base("builtin:nope", None, tmp_path)
    kind, _, ref, revision = resolve_base(str(tiny_model), None, tmp_path)
    assert (kind, revision) == ("local", None)
    base = describe_base(kind, str(tiny_model), ref, revision, template="keep", pad_token="auto")
    assert base.chat_template == load_saved_tokenizer(tiny_model).chat_template


def test_hub_id_resolves_to_the_commit_from_the_local_cache(tmp_path: Path, tiny_model: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hub code path, offline: a hub-layout cache holding the tiny model under refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--skytune-test--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    kind, _, ref, revision = resolve_base("skytune-test/tiny", "main", tmp_path)
    assert (kind, ref, revision) == ("hub", "skytune-test/tiny", commit)
    base = describe_base(kind, "skytune-test/tiny", ref, revision, template="keep", pad_token="auto")
    assert load_tokenizer(base).pad_token not in (None, load_tokenizer(base).eos_token)
    with pytest.raises(SkytuneError, match="not in the local Hugging Face cache"):
        resolve_base("skytune-test/absent", "main", tmp_path)


# ------------------------------------------------------------------------------- 4-bit LoRA gradients on CPU


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"what {i} plus {i}"},
                                            {"role": "assistant", "content": f"it is {2 * i}"}], tokenize=False)
             for i in range(4)]
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  lora_dropout=0.0, init_lora_weights="gaussian"))
    for name, param in peft_model.named_parameters():  # B = 0 by default would hide errors in A's gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return peft_model


def _grads_after_eval_pass(model, batch) -> tuple[dict[str, torch.Tensor], float]:
    model.eval()
    with torch.no_grad():  # what Trainer.evaluate() and generate() do before training resumes
        model(**batch)
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, loss.item()


def _twin_grads(tiny_model: Path, quantized, batch) -> dict[str, torch.Tensor]:
    """Gradients of an fp32 model whose linear weights are the dequantized 4-bit ones, same LoRA weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    twin = load_full_precision(tiny_model, None, torch.float32)
    # LoRA wraps each 4-bit layer: `q_proj.base_layer` holds the quantized weight.
    modules = {n.removesuffix(".base_layer"): m for n, m in quantized.base_model.model.named_modules()}
    replaced = 0
    with torch.no_grad():
        for name, module in twin.named_modules():
            q = modules.get(name)
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float())
                replaced += 1
    assert replaced == 14  # 7 linear layers x 2 blocks
    twin = _lora(twin)
    twin.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    grads, _ = _grads_after_eval_pass(twin, batch)
    return grads


def _max_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def _load_4bit(tiny_model: Path):
    base = describe_base("local", str(tiny_model), str(tiny_model), None, template="keep", pad_token="auto")
    model, ran = load_for_training(base, four_bit=True, quant_type="nf4", double_quant=True,
                                          dtype=torch.float32)
    assert ran == "nf4"
    return model


def test_4bit_lora_gradients_match_fp32_twin_after_eval_pass(tiny_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Forces the AVX512-BF16 code path (as on a CPU that has it) and checks the loader's workaround holds."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    quantized = _load_4bit(tiny_model)
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    quantized = _lora(quantized)
    tokenizer = load_saved_tokenizer(tiny_model)
    batch = _batch(tokenizer)
    grads, _ = _grads_after_eval_pass(quantized, batch)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert _max_rel_error(grads, _twin_grads(tiny_model, quantized, batch)) < 1e-3


@pytest.mark.skipif(not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
                    reason="the CPU has no AVX512-BF16: the bitsandbytes repack path cannot run here")
def test_without_the_workaround_gradients_are_wrong(tiny_model: Path) -> None:
    """The bug the workaround exists for is real on this CPU: re-enable the repack and gradients go wrong."""
    import bitsandbytes as bnb

    quantized = _load_4bit(tiny_model)
    for module in quantized.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    quantized = _lora(quantized)
    batch = _batch(load_saved_tokenizer(tiny_model))
    grads, _ = _grads_after_eval_pass(quantized, batch)
    assert _max_rel_error(grads, _twin_grads(tiny_model, quantized, batch)) > 0.1


def test_without_4bit_support_lora_runs_in_full_precision_and_says_so(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(loading, "four_bit_supported", lambda: (False, "no kernels on this device"))
    base = describe_base("local", str(tiny_model), str(tiny_model), None, template="keep", pad_token="auto")
    with caplog.at_level("WARNING"):
        model, ran = load_for_training(base, four_bit=True, quant_type="nf4", double_quant=True,
                                              dtype=torch.float32)
    assert ran == "float32"
    assert "4-bit QLoRA is not available here (no kernels on this device)" in caplog.text
    import bitsandbytes as bnb

    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_an_architecture_transformers_cannot_quantize_is_one_message(tmp_path: Path) -> None:
    """Falcon's layers are its own FalconLinear: transformers' bitsandbytes integration leaves them unquantized
    (it only warns), and QLoRA would then die in transformers. The loader says so, with the way out."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    FalconForCausalLM(config).save_pretrained(tmp_path / "falcon")
    base = BaseModel(kind="local", name="my-falcon", ref=str(tmp_path / "falcon"), revision=None, chat_template="",
                     pad_token="auto")
    with pytest.raises(SkytuneError, match=r"^model.base my-falcon: transformers cannot quantize FalconForCausalLM "
                                           r"to 4 bits .*FalconLinear.* Set train.method: lora"):
        load_for_training(base, four_bit=True, quant_type="nf4", double_quant=True, dtype=torch.float32)
    model, ran = load_for_training(base, four_bit=False, quant_type="nf4", double_quant=True, dtype=torch.float32)
    assert ran == "float32" and type(model).__name__ == "FalconForCausalLM"  # the way out works
