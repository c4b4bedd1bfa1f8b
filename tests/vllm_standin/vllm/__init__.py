"""A stand-in for vLLM's offline engine on the CPU, speaking the part of its interface skytune uses (vLLM 0.33:
`LLM(model=..., revision=..., dtype=..., seed=..., max_model_len=..., gpu_memory_utilization=..., enforce_eager=...)`,
`SamplingParams(temperature=..., max_tokens=..., stop_token_ids=..., skip_special_tokens=..., seed=...)`,
`LLM.generate([{"prompt_token_ids": [...]}], sampling, use_tqdm=False)` -> outputs[i].outputs[0].token_ids and
.finish_reason, `llm.llm_engine.engine_core.shutdown()`), answering with transformers' greedy decoding. The tests put
it on sys.path to run the engine choice and the parity metric through the code a GPU node runs
(tests/test_vllm_wiring.py).
It refuses any keyword real vLLM would not take, and records every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CALLS: list[tuple[str, dict[str, Any]]] = []  # what skytune asked of the engine, for the tests


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True
    seed: int | None = None


@dataclass
class CompletionOutput:
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


class _EngineCore:
    def __init__(self) -> None:
        self.stopped = False

    def shutdown(self) -> None:
        self.stopped = True
        CALLS.append(("shutdown", {}))


class _Engine:
    def __init__(self) -> None:
        self.engine_core = _EngineCore()


class LLM:
    def __init__(self, model: str, revision: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        CALLS.append(("LLM", {"model": model, "dtype": dtype, "max_model_len": max_model_len}))
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=getattr(torch, dtype)).eval()
        self.max_model_len = max_model_len
        self.llm_engine = _Engine()

    def generate(self, prompts: list[dict[str, list[int]]], sampling_params: SamplingParams,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        import torch

        assert sampling_params.temperature == 0.0, "the stand-in decodes greedily only"
        CALLS.append(("generate", {"prompts": len(prompts), "stop_token_ids": sampling_params.stop_token_ids}))
        results = []
        for prompt in prompts:
            ids = list(prompt["prompt_token_ids"])
            assert self.max_model_len is None or len(ids) + sampling_params.max_tokens <= self.max_model_len
            out: list[int] = []
            reason = "length"
            with torch.no_grad():
                for _ in range(sampling_params.max_tokens):
                    logits = self.model(torch.tensor([ids + out])).logits[0, -1]
                    token = int(logits.argmax())
                    out.append(token)  # vLLM keeps a stop token id in token_ids
                    if token in sampling_params.stop_token_ids:
                        reason = "stop"
                        break
            results.append(RequestOutput([CompletionOutput(out, reason)]))
        return results
