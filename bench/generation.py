"""Greedy generation throughput: vLLM's server vs transformers' batched generate vs the one-by-one loop, side by side.

    .venv/bin/python bench/generation.py [--model DIR] [--prompts 64] [--batch-size 16] [--max-new-tokens 48]
                                         [--engines vllm,batched,single]

Every engine runs the function the pipeline calls (`generation.generate_greedy_served` on vLLM's server, started from
its own environment as the stages start it; `generation.generate_greedy` batched or one by one), in this one run, on
the same prompts (the instructions of the shipped sample data, rendered by the model's chat template, the same token
ids for all), with the same model in the compute dtype `auto` picks (fp32 on a CPU, bf16 on a GPU): a trained
model directory given with --model
(models/merged of a `make run`: the embedded default, SmolLM2-135M-Instruct), or the built-in model built from the
seed (random weights: every answer runs to max_new_tokens). vLLM's start-up (its server loading the model) is timed
apart from its generation. Prints generated tokens per second of each, the ratios, and how far the answers agree.
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

from skytune.core import vllm_server  # noqa: E402
from skytune.core.atomic import read_jsonl  # noqa: E402
from skytune.core.chat import chat_template  # noqa: E402
from skytune.core.errors import reported  # noqa: E402
from skytune.core.evaluation import generation, scoring  # noqa: E402
from skytune.core.models.builtin import build_builtin  # noqa: E402
from skytune.core.models.devices import compute_dtype  # noqa: E402
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer  # noqa: E402
from skytune.core.params import load_params  # noqa: E402

ENGINES = ("vllm", "batched", "single")


def build_model(out: Path) -> Path:
    params = load_params(REPO / "params.yaml")
    raw = REPO / params.paths.raw_dir
    corpus = [line for f in sorted(raw.glob("*.jsonl")) for line in f.read_text(encoding="utf-8").splitlines()]
    build_builtin(out, corpus, seed=params.base.seed, **dataclasses.asdict(params.model.builtin))
    return out


def main() -> None:
    with reported():
        run()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory with a chat template (default: built-in)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"a comma-separated subset of {ENGINES}")
    args = parser.parse_args()
    engines = args.engines.split(",")
    torch.manual_seed(0)
    params = load_params(REPO / "params.yaml")
    dtype = compute_dtype("auto")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_model(Path(tmp) / "model")
        tokenizer = load_saved_tokenizer(path)
        rows = read_jsonl(REPO / params.paths.raw_dir / "alpaca_tasks.jsonl")
        questions = [(r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")) for r in rows]
        questions = (questions * (args.prompts // len(questions) + 1))[: args.prompts]
        prompts = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
        stops = chat_template.stop_tokens(tokenizer)
        results: dict[str, tuple[list[generation.Generation], float]] = {}
        startup = None
        if "vllm" in engines:
            vllm = vllm_server.Vllm.from_params(params.vllm, str(REPO / params.paths.vllm_env))
            longest = max(map(len, generation.prompt_ids(tokenizer, prompts))) + args.max_new_tokens
            flags = vllm_server.model_flags(name="bench", dtype=str(dtype).removeprefix("torch."),
                                            max_model_len=longest, gpu_memory_utilization=vllm.gpu_memory_utilization)
            start = time.perf_counter()
            with vllm_server.running(vllm, path, flags, what="bench/generation.py") as server:
                startup = time.perf_counter() - start
                generation.generate_greedy_served(server, tokenizer, prompts[:2], stop_tokens=stops, max_new_tokens=4,
                                                  seed=0)  # warm-up, as for transformers below
                start = time.perf_counter()
                answers = generation.generate_greedy_served(server, tokenizer, prompts, stop_tokens=stops, seed=0,
                                                            max_new_tokens=args.max_new_tokens)
                results["vllm"] = (answers, time.perf_counter() - start)
        model = load_full_precision(path, None, dtype)
        generation.generate_greedy(model, tokenizer, prompts[:2], stop_tokens=stops, max_new_tokens=4, batch_size=2)
        for name, batch_size in (("batched", args.batch_size), ("single", 1)):
            if name in engines:
                start = time.perf_counter()
                answers = generation.generate_greedy(model, tokenizer, prompts, stop_tokens=stops,
                                                     max_new_tokens=args.max_new_tokens, batch_size=batch_size)
                results[name] = (answers, time.perf_counter() - start)

    params_count = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model or 'built-in (random)'}, {params_count / 1e6:.1f}M parameters, {dtype}, "
          f"{next(model.parameters()).device}, {torch.get_num_threads()} threads; {len(prompts)} prompts, "
          f"max_new_tokens {args.max_new_tokens}")
    if startup is not None:
        print(f"vLLM's start-up (server up, model loaded): {startup:.1f} s")
    labels = {"vllm": "vLLM server", "batched": f"transformers x{args.batch_size}", "single": "one by one"}
    rate = {}
    print(f"{'engine':>18} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for name, (answers, seconds) in results.items():
        tokens = sum(a.num_tokens + a.stopped for a in answers)  # the stop token is generated too
        rate[name] = tokens / seconds
        print(f"{labels[name]:>18} {tokens:>8} {seconds:>8.2f} {rate[name]:>9.1f}")
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            print(f"{labels[a]} / {labels[b]}: {rate[a] / rate[b]:.2f}x tokens/s; answers agree "
                  f"{scoring.agreement(results[a][0], results[b][0])}")


if __name__ == "__main__":
    main()
