"""evaluate_base: the base model's benchmark scores and general text, and the control's: computed once per base and
training method.

    python -m skytune.stages.evaluate_base      (normally: dvc repro evaluate_base)

Scores the base on `evaluate.tasks` with lm-eval (`core.evaluation.harness`; the per-item scores kept for paired
tests), then writes the general text: its greedy answers to the first `evaluate.general_text.prompts` of
`paths.general_prompts`, and its perplexity on them (`core.evaluation.general_text`), text by text. Then the same for
the control: the base as the tuned model is merged onto it, with no adapter. After QLoRA (`train.method: qlora`, or
`preference.adapter: qlora` with `train.method: none`; and `merge_adapters.onto: dequantized`) that is the base
quantized as training quantizes it and dequantized, scored like the base (its perplexity on the base's own texts);
otherwise it is the base itself, not scored twice. The evaluate stage splits each change into quantization
(control - base) and training (tuned - control).

It depends only on the base, the tasks, the evaluate settings, the quantization settings and the lm-eval pin, so an
experiment that changes training otherwise never runs it again: DVC skips it, and its outputs are cached, so a clone
restores them from the remote. Writes `paths.base_scores_dir`: scores.json, control.json and general_text.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skytune.core.atomic import atomic_dir, write_json, write_jsonl
from skytune.core.evaluation import general_text, generation, harness, scoring
from skytune.core.models.base import BaseModel, load_tokenizer, location
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import (
    fit_embeddings,
    load_dequantized,
    load_full_precision,
)
from skytune.core.params import Params, adapter_method
from skytune.core.vllm_server import Vllm
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    from transformers import set_seed

    set_seed(params.base.seed)
    paths, ev = params.paths, params.evaluate
    prompts = general_text.read_prompts(paths.general_prompts, ev.general_text.prompts)
    start = time.monotonic()
    base = BaseModel.load(paths.base_model_dir)
    tokenizer = load_tokenizer(base)
    if (engine := generation.engine_for_base(ev.engine, base.added_tokens)) != ev.engine:
        ev = dataclasses.replace(ev, engine=engine)
    dtype = compute_dtype(params.train.compute_dtype)
    vllm = Vllm.from_params(params.vllm, paths.vllm_env)
    score = functools.partial(harness.score, tokenizer=tokenizer, ev=ev, vllm=vllm,
                              tasks_dir=Path(paths.eval_tasks_dir), pin_file=Path(paths.lm_eval_pin),
                              dtype=str(dtype).removeprefix("torch."), seed=params.base.seed)
    scores, model = score(lambda: _fitted(load_full_precision(location(base), base.revision, dtype), tokenizer),
                          source=location(base), revision=base.revision)
    texts = general_text.write(model, tokenizer, prompts, max_new_tokens=ev.general_text.max_new_tokens,
                               batch_size=ev.batch_size)
    general = _general_text(model, tokenizer, texts)
    seconds = round(time.monotonic() - start, 1)
    log.info("base: %s; general text: perplexity %s on %d tokens (%.0f s)", scores.tasks, general["perplexity"],
             general["tokens"], seconds)
    del model
    generation.release_memory()  # vLLM's server sizes its cache from the memory the device reports free
    control = _control(params, base, tokenizer, texts, score)
    with atomic_dir(paths.base_scores_dir) as out:
        write_json(out / harness.SCORES_FILE, scores.to_json() | {"general_text": general, "seconds": seconds})
        write_json(out / harness.CONTROL_FILE, control)
        write_jsonl(out / general_text.FILE, texts)


def _fitted(model: Any, tokenizer: Any) -> Any:
    fit_embeddings(model, tokenizer)
    return model


def _general_text(model: Any, tokenizer: Any, texts: list[dict[str, Any]]) -> dict[str, Any]:
    """The model's perplexity on the general text, and per text its summed NLL and tokens (the paired test's items)."""
    losses = general_text.losses(model, tokenizer, texts)
    ppl, tokens = scoring.perplexity_of(losses) if texts else (None, 0)
    return {"perplexity": ppl, "tokens": tokens, "losses": losses}


def _control(params: Params, base: BaseModel, tokenizer: Any, texts: list[dict[str, Any]],
             score: Callable[..., tuple[harness.Scores, Any]]) -> dict[str, Any]:
    """The control's scores (`model`: what it is), or `{"model": "base"}` where the tuned model is merged onto the
    base's own weights (LoRA, full fine-tuning, `merge_adapters.onto: original`, or 4-bit not running here)."""
    train = params.train
    if adapter_method(train, params.preference) != "qlora" or params.merge_adapters.onto != "dequantized":
        return {"model": harness.BASE_IS_CONTROL}
    start = time.monotonic()
    model, what = load_dequantized(base, quant_type=train.quant_type, double_quant=train.double_quant,
                                   dtype=compute_dtype(train.compute_dtype))
    if what == "original":
        return {"model": harness.BASE_IS_CONTROL}
    model = _fitted(model, tokenizer)
    engine = generation.resolve_engine(params.evaluate.engine, Vllm.from_params(params.vllm, params.paths.vllm_env),
                                       "evaluate.engine")
    with tempfile.TemporaryDirectory(prefix="skytune-control-") as saved:
        load: Callable[[], Any] = lambda: model  # the transformers engine scores the model in memory
        if engine != "transformers":  # vLLM's server loads it from disk, with the device free of this copy
            model.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            del model
            generation.release_memory()
            dtype = compute_dtype(train.compute_dtype)
            load = lambda: load_full_precision(saved, None, dtype)  # reloaded after vLLM lets go
        scores, model = score(load, source=saved, revision=None)
    general = _general_text(model, tokenizer, texts)
    log.info("control (%s base): %s; general text: perplexity %s", what, scores.tasks, general["perplexity"])
    return {"model": what, **scores.to_json(), "general_text": general,
            "seconds": round(time.monotonic() - start, 1)}


if __name__ == "__main__":
    run_stage(main)
