"""Batched greedy generation on the engine chosen at run time: transformers in this process, or vLLM's server
(`core.vllm_server`, in vLLM's own environment).

Both engines get the same token ids: prompts are rendered by the model's chat template (which writes the BOS)
and tokenized here with no special tokens added; both stop on the same token ids, and both are decoded here with the
same tokenizer. So a difference in their answers is a difference of the engines, not of the inputs (what
`scoring.agreement` measures).
"""

from __future__ import annotations

import gc
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from skytune.core import vllm_server
from skytune.core.errors import SkytuneError
from skytune.core.params.schema import Engine
from skytune.core.vllm_server import Vllm

log = logging.getLogger(__name__)

ENGINES = typing.get_args(Engine)


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    stopped: bool  # ended with an end-of-turn/EOS token rather than running out of max_new_tokens


def resolve_engine(requested: str, vllm: Vllm, key: str = "sanity_check.engine") -> str:
    """`auto` -> `vllm` where it is the better engine: a GPU, and vLLM's environment beside the pipeline's (a GPU
    node); on a CPU transformers, which needs no start-up. `vllm` runs wherever its environment is, a CPU included;
    asked for where it is not, it is an error naming the params `key` that asked for it."""
    if requested not in ENGINES:
        raise SkytuneError(f"{key}: unknown engine {requested!r}; one of {', '.join(ENGINES)}")
    ok, why = vllm.available()
    if requested == "vllm" and not ok:
        raise SkytuneError(f"{key} is vllm but {why}. Use auto or transformers.")
    if requested == "auto":
        return "vllm" if ok and torch.cuda.is_available() else "transformers"
    return requested


def engine_for_base(engine: str, added_tokens: list[str]) -> str:
    """The engine that answers for a base: `engine`, except where the base lacks the template's tokens
    (`BaseModel.added_tokens`). Its prompts then hold ids the base's own checkpoint has no rows for, which vLLM
    refuses: transformers answers, the embeddings grown as training grew them."""
    if engine == "transformers" or not added_tokens:
        return engine
    log.info("the base is answered by transformers, not %s: its vocabulary lacks %s", engine, added_tokens)
    return "transformers"


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
    ids = prompt_ids(tokenizer, prompts)
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


def prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """The token ids of rendered prompts, as both engines get them: the template wrote the BOS, so no special tokens
    are added."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def generate_greedy_vllm(
    vllm: Vllm,
    source: str | Path,
    revision: str | None,
    tokenizer: Any,
    prompts: list[str],
    *,
    stop_tokens: list[str],
    max_new_tokens: int,
    dtype: torch.dtype,
    seed: int,
) -> list[Generation]:
    """Greedy completions with vLLM on the model at `source` (a directory, or a hub id at `revision`): its server is
    started for these prompts and stopped after them (`vllm_server.running`)."""
    longest = max(len(i) for i in prompt_ids(tokenizer, prompts)) + max_new_tokens
    flags = vllm_server.model_flags(name=vllm_server.SERVED_NAME, dtype=str(dtype).removeprefix("torch."),
                                    max_model_len=longest, gpu_memory_utilization=vllm.gpu_memory_utilization,
                                    revision=revision, seed=seed)
    with vllm_server.running(vllm, source, flags, what=f"greedy answers of {source}") as server:
        return generate_greedy_served(server, tokenizer, prompts, stop_tokens=stop_tokens,
                                      max_new_tokens=max_new_tokens, seed=seed)


def generate_greedy_served(server: vllm_server.Server, tokenizer: Any, prompts: list[str], *, stop_tokens: list[str],
                           max_new_tokens: int, seed: int, model: str | None = None) -> list[Generation]:
    """Greedy completions from a running vLLM server (`model`: a name it serves, by default its model), fed the token
    ids `tokenizer` gives and stopping on the same tokens as `generate_greedy`."""
    stop_ids = stop_token_ids(tokenizer, stop_tokens)
    done = vllm_server.complete(server, prompt_ids(tokenizer, prompts), max_tokens=max_new_tokens,
                                stop_token_ids=stop_ids, seed=seed, model=model)
    return [_finish(tokenizer, c.token_ids, stop_ids, c.finish_reason == "stop") for c in done]


def release_memory() -> None:
    """Give freed GPU memory back to the device: vLLM's server sizes its cache from what the device reports free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
