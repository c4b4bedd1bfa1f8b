"""Batched greedy generation behind one function, on the engine chosen at run time: transformers or vLLM.

Both engines get the same token ids: prompts are rendered by the model's chat template (which writes the BOS)
and tokenized here with no special tokens added, and both decode with the same tokenizer. So a difference in
their answers is a difference of the engines, not of the inputs (what `scoring.agreement` measures).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skytune.core.errors import SkytuneError
from skytune.core.params.schema import Engine

log = logging.getLogger(__name__)

ENGINES = typing.get_args(Engine)


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    stopped: bool  # ended with an end-of-turn/EOS token rather than running out of max_new_tokens


def vllm_available() -> tuple[bool, str]:
    """Whether vLLM can run here, and why not if it cannot (its wheel is CUDA-only)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (it belongs in a GPU node's environment)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def resolve_engine(requested: str, key: str = "sanity_check.engine") -> str:
    """`auto` -> `vllm` where it can run, else `transformers`; `vllm` where it cannot run is an error (naming the
    params `key` that asked for it)."""
    if requested not in ENGINES:
        raise SkytuneError(f"{key}: unknown engine {requested!r}; one of {', '.join(ENGINES)}")
    ok, why = vllm_available()
    if requested == "vllm" and not ok:
        raise SkytuneError(f"{key} is vllm but vLLM cannot run here: {why}. Use auto or transformers.")
    if requested == "auto":
        return "vllm" if ok else "transformers"
    return requested


def stop_token_ids(tokenizer: Any, stop_tokens: list[str]) -> list[int]:
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in stop_tokens})


def _finish(tokenizer: Any, row: list[int], stop_ids: list[int], stopped: bool = False) -> Generation:
    """Cut a completion at its first stop token and decode it. `stopped`: the engine says it stopped on a stop
    token it left out of `row`."""
    end = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
    tokens = row if end is None else row[:end]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(text=text.strip(), num_tokens=len(tokens), stopped=stopped or end is not None)


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    stop_tokens: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[Generation]:
    """Greedy completions of already-rendered prompts with transformers, in left-padded batches.

    Prompts are batched in order of length, so a batch holds similar lengths and little padding; the results come
    back in the order of `prompts`. `batch_size=1` is the one-by-one loop (`bench/generation.py` compares them).
    """
    stop_ids = stop_token_ids(tokenizer, stop_tokens)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    results: dict[int, Generation] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt").to(device)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
            results[i] = _finish(tokenizer, row, stop_ids)
    return [results[i] for i in range(len(prompts))]


def generate_greedy_vllm(
    source: str | Path,
    revision: str | None,
    tokenizer: Any,
    prompts: list[str],
    *,
    stop_tokens: list[str],
    max_new_tokens: int,
    dtype: torch.dtype,
    seed: int,
    gpu_memory_utilization: float = 0.85,
) -> list[Generation]:
    """Greedy completions with vLLM's offline engine on the model at `source` (a directory or a hub id at
    `revision`), fed the token ids `tokenizer` gives, so its inputs are exactly the transformers engine's.

    The engine is shut down before returning, so a second model can load in the same process.
    """
    from vllm import LLM, SamplingParams

    stop_ids = stop_token_ids(tokenizer, stop_tokens)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    longest = max(len(i) for i in ids) + max_new_tokens
    llm = LLM(model=str(source), revision=revision, dtype=str(dtype).removeprefix("torch."), seed=seed,
              max_model_len=longest, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=True)
    try:
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_ids,
                                  skip_special_tokens=False, seed=seed)
        outputs = llm.generate([{"prompt_token_ids": i} for i in ids], sampling, use_tqdm=False)
        return [_finish(tokenizer, list(out.outputs[0].token_ids), stop_ids, out.outputs[0].finish_reason == "stop")
                for out in outputs]
    finally:
        shutdown(llm)


def shutdown(llm: Any) -> None:
    """Stop a vLLM engine and give its GPU memory back (vllm#6544), so the next model fits."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:  # older vLLM
        release_memory()
    else:
        cleanup_dist_env_and_memory()


def release_memory() -> None:
    """Give freed GPU memory back to the device: vLLM sizes its cache from what the device reports free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
