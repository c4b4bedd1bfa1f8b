"""LoRA dropout moved into lora_A: PEFT's outputs and gradients, with a 1-byte mask kept for backward instead of the
dropped input and the dropout's float noise."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from skytune.core.training import lora_dropout

P = 0.2


def _pair(tiny_model: Path, four_bit: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """PEFT's LoRA model on the tiny Llama (its base in 4-bit NF4 or fp32), and a copy with the dropout moved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)} if four_bit else {}
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, **quantized)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=P, target_modules="all-linear",
                                           init_lora_weights=False))  # B != 0: every gradient is non-zero
    ours = copy.deepcopy(peft)
    assert lora_dropout.install(ours) == 2 * 7  # two layers, q k v o gate up down
    assert ours.state_dict().keys() == peft.state_dict().keys()  # the adapter saves as PEFT's does
    return peft.train(), ours.train()


def _step(model: torch.nn.Module, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach(), grads


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_moved_dropout_gives_peft_outputs_and_gradients(tiny_model: Path, four_bit: bool) -> None:
    peft, ours = _pair(tiny_model, four_bit)
    ids = torch.arange(40).reshape(2, 20) % 300 + 5
    for seed in (1, 2):  # the same generator calls draw the same masks: the forward is PEFT's to the bit
        expected, expected_grads = _step(peft, ids, seed)
        logits, grads = _step(ours, ids, seed)
        assert torch.equal(logits, expected)
        assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 2 * 7
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # A different seed draws different masks (the dropout is live), and evaluation drops nothing, as PEFT's.
    assert not torch.equal(_step(ours, ids, 3)[0], expected)
    peft.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, peft(input_ids=ids).logits)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward: each storage once, as memory holds it."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    model.zero_grad()
    return sum(storages.values())


def test_backward_keeps_what_no_dropout_keeps_and_a_byte_per_dropped_element(tiny_model: Path) -> None:
    """Independent count: with no dropout at all (PEFT's dropout 0: lora_A keeps its input, which is the layer's),
    autograd keeps some bytes; the moved dropout keeps those and a boolean mask per adapted layer's input, and PEFT's
    dropout keeps more (on the CPU, its float noise and the dropped input: up to 8 bytes an element)."""
    from peft.tuners.lora import LoraLayer

    peft, ours = _pair(tiny_model, four_bit=True)
    ids = torch.arange(64).reshape(2, 32) % 300 + 5
    elements: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: elements.append(args[0].numel()))
             for m in ours.modules() if isinstance(m, LoraLayer)]
    moved = _saved_bytes(ours, ids)
    for hook in hooks:
        hook.remove()
    with_peft = _saved_bytes(peft, ids)
    for module in peft.modules():
        if isinstance(module, LoraLayer):
            module.lora_dropout["default"] = torch.nn.Identity()
    assert len(elements) == 14 and moved == _saved_bytes(peft, ids) + sum(elements)
    assert with_peft - moved > 4 * sum(elements)  # measured: 4.2 bytes an element less


@pytest.mark.parametrize("shape", [(24, 16), (2, 12, 16)], ids=["2d", "3d"])
def test_under_bf16_autocast_the_gradients_are_dropouts(shape: tuple[int, ...]) -> None:
    """The function alone, under CPU bf16 autocast (what a bf16 run's linear layers compute in), against autograd
    through `F.linear(F.dropout(x), W)`: the same forward, the same gradients (the scale is x's, not bf16's)."""
    x0, w0 = torch.randn(*shape), torch.randn(4, 16)
    results = []
    for moved in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (lora_dropout._DroppedLinear.apply(x, w, 0.05) if moved
                   else torch.nn.functional.linear(torch.nn.functional.dropout(x, 0.05), w))
        out.float().square().sum().backward()
        results.append((out, x.grad, w.grad))
    for ours, theirs in zip(results[1], results[0], strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_trainer_moves_the_dropout_when_it_trains_in_fp32_only(tiny_model: Path, tmp_path: Path,
                                                                    dtype: torch.dtype) -> None:
    """The train stage's trainer (build_trainer) installs it where it was measured, fp32, and leaves bf16 to PEFT."""
    import dataclasses

    from conftest import REPO
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skytune.core.chat.tokenization import Encoded
    from skytune.core.params import load_params
    from skytune.core.training.sft import build_trainer

    p = dataclasses.replace(load_params(REPO / "params.yaml").train, method="lora", lora_dropout=0.05)
    records = [Encoded(str(i), "t", "", list(range(5, 25)), [-100] * 10 + list(range(15, 25)), []) for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    trainer = build_trainer(model, AutoTokenizer.from_pretrained(tiny_model), records, records, p,
                            output_dir=tmp_path, seed=0, dtype=dtype, save=False)
    moved = sum(isinstance(m, lora_dropout.DeferredDropout) for m in trainer.model.modules())
    assert moved == (2 * 7 if dtype == torch.float32 else 0)
