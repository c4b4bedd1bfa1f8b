"""Training throughput: padding-free and packed batches against the ancestor's pad-to-longest batches, side by side.

    .venv/bin/python bench/train_throughput.py [--conversations 96] [--method qlora] [--device cpu|cuda]

A ~10M-parameter Llama (the built-in model, made bigger) trains one epoch on synthetic chat conversations whose
token lengths spread like real chat data (log-normal, median ~150, p90 ~590, capped at max_length 1024), once per
`train.batching` mode, in this one process, through the pipeline's own code (`tokenization.Encoder`,
`sft.build_trainer`) with params.yaml's train section; only max_length, epochs and the batching mode are changed.
Prints non-pad tokens per second, the padding efficiency of the batches (real tokens / tokens computed), the final
val loss of each mode, and the speed-up over the padded baseline. On a GPU machine it runs on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from skytune import models, sft, tokenization  # noqa: E402
from skytune.params import load_params  # noqa: E402

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "vo", "ri", "na", "pe", "zu", "do", "fa")
         for b in ("n", "ra", "le", "mo", "st", "ck", "ve", "th", "ph", "x", "ng", "rd")]


def conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat records with log-normal answer lengths (median ~150 tokens, p90 ~590) and short questions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = min(int(rng.lognormvariate(math.log(100), 1.07)) + 3, 690)
        answer = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "?"
        out.append({"id": f"c{i}", "source": "bench", "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


class CountingCollator:
    """Counts real and computed tokens of every batch the trainer builds."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.real, self.computed = inner, 0, 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.computed += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else sum(len(e["input_ids"]) for e in examples)
        return batch


def run(mode: str, base: models.BaseModel, tokenizer: Any, train: list, val: list, args: argparse.Namespace,
        workdir: Path) -> dict[str, float]:
    # With packing a batch is `batch_size` rows of max_length tokens: give it the tokens per step the other modes
    # get on average (a packed row of batch_size x max_length tokens is one dense attention block on CPU).
    mean = sum(len(e.input_ids) for e in train) / len(train)
    batch = max(1, round(args.batch_size * mean / args.max_length)) if mode == "packing" else args.batch_size
    p = dataclasses.replace(load_params(REPO / "params.yaml").train, batching=mode, max_length=args.max_length,
                            epochs=1, method=args.method, eval_steps=10_000, logging_steps=10_000,
                            batch_size=batch, total_batch_size=batch)
    dtype = models.compute_dtype(p.compute_dtype)
    model, ran = models.load_for_training(base, four_bit=p.method == "qlora", quant_type=p.quant_type,
                                          double_quant=p.double_quant, dtype=dtype)
    torch.manual_seed(0)
    trainer = sft.build_trainer(model, tokenizer, train, val, p, output_dir=workdir / mode, seed=0, dtype=dtype,
                                save=False)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    loss = trainer.evaluate()["eval_loss"]
    return {"seconds": seconds, "tokens_per_second": counter.real / seconds, "efficiency": counter.real /
            counter.computed, "steps": trainer.state.global_step, "val_loss": loss, "real": counter.real,
            "quantization": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora", "full"])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        records = conversations(args.conversations + 16, seed=0)
        corpus = [m["content"] for r in records for m in r["messages"]]
        models.build_builtin(workdir / "base", corpus, vocab_size=1024, hidden_size=args.hidden,
                             intermediate_size=args.hidden * 8 // 3, num_layers=args.layers, num_heads=6,
                             num_kv_heads=2, max_position_embeddings=args.max_length, seed=0)
        base = models.describe_base("local", "bench", str(workdir / "base"), None, template="keep", pad_token="auto")
        tokenizer = models.load_tokenizer(base)
        encoded = tokenization.Encoder(tokenizer, "assistant_only").encode(records)
        encoded = [e for e in encoded if len(e.input_ids) <= args.max_length]
        train, val = encoded[:args.conversations], encoded[args.conversations:]
        lengths = sorted(len(e.input_ids) for e in train)
        params = sum(t.numel() for t in models.load_full_precision(base.ref, None, torch.float32).parameters())
        print(f"model: {params / 1e6:.1f}M parameters, method {args.method}; data: {len(train)} conversations, "
              f"{sum(lengths)} tokens, length median {lengths[len(lengths) // 2]}, "
              f"p90 {lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]}; batch {args.batch_size}, "
              f"max_length {args.max_length}, {torch.get_num_threads()} threads")
        results = {mode: run(mode, base, tokenizer, train, val, args, workdir)
                   for mode in ("padded", "padding_free", "packing")}
    baseline = results["padded"]["tokens_per_second"]
    print(f"{'batching':<14}{'steps':>6}{'seconds':>9}{'tokens/s':>10}{'padding eff.':>14}{'val loss':>10}"
          f"{'speed-up':>10}")
    for mode, r in results.items():
        print(f"{mode:<14}{r['steps']:>6}{r['seconds']:>9.1f}{r['tokens_per_second']:>10.0f}"
              f"{r['efficiency']:>13.0%}{r['val_loss']:>10.4f}{r['tokens_per_second'] / baseline:>9.2f}x")
    default = load_params(REPO / "params.yaml").train.batching
    print(f"params.yaml default batching: {default}, "
          f"{results[default]['tokens_per_second'] / baseline:.2f}x the padded baseline")


if __name__ == "__main__":
    main()
