"""evaluate_base: the base model's benchmark scores and general text, computed once per base.

    python -m skytune.stages.evaluate_base      (normally: dvc repro evaluate_base)

Scores the base on `evaluate.tasks` with lm-eval (`core.evaluation.harness`), then writes the general text: its greedy
answers to the first `evaluate.general_text.prompts` of `paths.general_prompts`, and its perplexity on them
(`core.evaluation.general_text`). It depends only on the base, the tasks, the evaluate settings and the lm-eval pin,
so an experiment that changes training never runs it again: DVC skips it, and its outputs are cached, so a clone
restores them from the remote. Writes `paths.base_scores_dir`: scores.json and general_text.jsonl, which the
evaluate stage compares the tuned model with.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from skytune.core.atomic import atomic_dir, write_json, write_jsonl
from skytune.core.evaluation import general_text, harness
from skytune.core.models.base import BaseModel, load_tokenizer, location
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import fit_embeddings, load_full_precision
from skytune.core.params import Params
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
    dtype = compute_dtype(params.train.compute_dtype)

    def load() -> Any:
        model = load_full_precision(location(base), base.revision, dtype)
        fit_embeddings(model, tokenizer)
        return model

    scores, model = harness.score(load, tokenizer, source=location(base), revision=base.revision, ev=ev,
                                  vllm=Vllm.from_params(params.vllm, paths.vllm_env),
                                  tasks_dir=Path(paths.eval_tasks_dir), pin_file=Path(paths.lm_eval_pin),
                                  dtype=str(dtype).removeprefix("torch."), seed=params.base.seed)
    texts = general_text.write(model, tokenizer, prompts, max_new_tokens=ev.general_text.max_new_tokens,
                               batch_size=ev.batch_size)
    ppl, tokens = general_text.perplexity(model, tokenizer, texts, batch_size=ev.batch_size) if texts else (None, 0)
    seconds = round(time.monotonic() - start, 1)
    log.info("base: %s; general text: perplexity %s on %d tokens (%.0f s)", scores.tasks, ppl, tokens, seconds)
    with atomic_dir(paths.base_scores_dir) as out:
        general = {"perplexity": ppl, "tokens": tokens}
        write_json(out / harness.SCORES_FILE, scores.to_json() | {"general_text": general, "seconds": seconds})
        write_jsonl(out / general_text.FILE, texts)


if __name__ == "__main__":
    run_stage(main)
