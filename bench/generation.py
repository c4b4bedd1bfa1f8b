"""Generation throughput: the sanity check's batched greedy generation against the one-by-one loop, side by side.

    .venv/bin/python bench/generation.py [--prompts 64] [--batch-size 16] [--max-new-tokens 48] [--model DIR]

Both sides run `generation.generate_greedy` (the function the sanity check and the parity check call) in this one
process, on the same prompts (the instructions of the shipped sample data, rendered by the model's chat template),
with the same model: the built-in model built from the seed (random weights: every answer runs to max_new_tokens,
so both sides generate the same number of tokens), or a trained model directory given with --model (the merged
model of a `make run`). Prints generated tokens per second of each, the speed-up, and whether the answers agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from skytune import scoring  # noqa: E402
from skytune.core.atomic import read_jsonl  # noqa: E402
from skytune.core.chat import chat_template
from skytune.core.evaluation import generation
from skytune.core.models.builtin import build_builtin
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer
from skytune.core.params import load_params  # noqa: E402


def build_model(out: Path) -> Path:
    params = load_params(REPO / "params.yaml")
    raw = REPO / params.paths.raw_dir
    corpus = [line for f in sorted(raw.glob("*.jsonl")) for line in f.read_text(encoding="utf-8").splitlines()]
    build_builtin(out, corpus, seed=params.base.seed, **dataclasses.asdict(params.model.builtin))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", type=Path, help="a model directory with a chat template (default: built-in)")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_model(Path(tmp) / "model")
        tokenizer = load_saved_tokenizer(path)
        model = load_full_precision(path, None, compute_dtype("auto"))
        params = load_params(REPO / "params.yaml")
        rows = read_jsonl(REPO / params.paths.raw_dir / "alpaca_tasks.jsonl")
        questions = [(r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")) for r in rows]
        questions = (questions * (args.prompts // len(questions) + 1))[: args.prompts]
        prompts = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
        stops = sorted({tokenizer.eos_token, chat_template.end_of_turn_token(tokenizer)})
        generation.generate_greedy(model, tokenizer, prompts[:2], stop_tokens=stops, max_new_tokens=4, batch_size=2)

        results = {}
        for name, batch_size in (("one by one", 1), (f"batched x{args.batch_size}", args.batch_size)):
            start = time.perf_counter()
            answers = generation.generate_greedy(model, tokenizer, prompts, stop_tokens=stops,
                                                 max_new_tokens=args.max_new_tokens, batch_size=batch_size)
            seconds = time.perf_counter() - start
            tokens = sum(a.num_tokens + a.stopped for a in answers)  # the stop token is generated too
            results[name] = (answers, tokens, seconds)

    params_count = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model or 'built-in (random)'}, {params_count / 1e6:.1f}M parameters, "
          f"{next(model.parameters()).device}; {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}")
    print(f"{'mode':>14} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for name, (_, tokens, seconds) in results.items():
        print(f"{name:>14} {tokens:>8} {seconds:>8.2f} {tokens / seconds:>9.1f}")
    (single, t1, s1), (batched, t2, s2) = results.values()
    print(f"batched / one-by-one tokens/s: {(t2 / s2) / (t1 / s1):.2f}x")
    print(f"answers agree: {scoring.agreement(single, batched)}")


if __name__ == "__main__":
    main()
