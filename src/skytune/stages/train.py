"""train: (Q)LoRA supervised fine-tuning with TRL's SFTTrainer, assistant-only loss.

    python -m skytune.stages.train      (normally: dvc repro train, or dvc exp run -S train.lora_r=16)

Loads the base model from the manifest in `paths.base_model_dir` (4-bit NF4 with `train.method: qlora`; where
4-bit cannot run, a warning and `quantization` in the metrics say what ran instead), trains LoRA adapters on
`paths.train_file` with loss on assistant turns only (their end-of-turn token included, and pad != EOS, so the
model learns to stop), evaluates on `paths.val_file` before and after, and writes:
- `paths.adapter_dir`: the adapter, the tokenizer with its chat template, and `training_params.json`;
- `paths.dvclive_dir`: DVCLive metrics and loss plots;
- `paths.train_metrics`: val loss before/after, perplexity, what quantization actually ran, throughput.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from skytune import chat_template, models, packaging
from skytune.atomic import atomic_dir, read_jsonl, write_json
from skytune.params import Params, to_dict
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    from datasets import Dataset
    from dvclive import Live
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import set_seed
    from transformers.integrations import DVCLiveCallback
    from trl import SFTConfig, SFTTrainer

    p = params.train
    seed = params.base.seed
    set_seed(seed)
    base = models.BaseModel.load(params.paths.base_model_dir)
    tokenizer = models.load_tokenizer(base.ref, base.revision)
    eot = chat_template.end_of_turn_token(tokenizer)
    dtype = models.compute_dtype(p.compute_dtype)
    model, quantization = models.load_for_training(
        base, four_bit=p.method == "qlora", quant_type=p.quant_type, double_quant=p.double_quant, dtype=dtype
    )
    if quantization in ("nf4", "fp4"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing)
    on_gpu = torch.cuda.is_available()
    log.info("training on %s, base weights: %s, compute dtype: %s, end of turn: %r, pad: %r",
             "cuda" if on_gpu else "cpu", quantization, dtype, eot, tokenizer.pad_token)

    def load(path: str) -> Dataset:
        return Dataset.from_list([{"messages": r["messages"]} for r in read_jsonl(path)])

    train_ds, val_ds = load(params.paths.train_file), load(params.paths.val_file)
    lora = LoraConfig(
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules),
        task_type="CAUSAL_LM",
    )
    # The trainer's scratch directory: nothing in it outlives the stage (checkpoints are not kept yet).
    Path(params.paths.adapter_dir).parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix=".trainer-", dir=Path(params.paths.adapter_dir).parent)
    output_dir = Path(scratch.name)
    config = SFTConfig(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=p.weight_decay,
        num_train_epochs=p.epochs,
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        max_length=p.max_length,
        assistant_only_loss=True,
        gradient_checkpointing=p.gradient_checkpointing,
        # SFTConfig defaults to bf16=True; honour the compute dtype instead (fp32 on CPU).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_gpu,
        logging_steps=p.logging_steps,
        eval_strategy="steps",
        eval_steps=p.eval_steps,
        save_strategy="no",
        report_to="none",  # DVCLive is attached below with its own directory and without rewriting dvc.yaml
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    # transformers' DVCLive integration (what report_to="dvclive" uses), given a Live that writes to
    # paths.dvclive_dir and leaves dvc.yaml alone (dvc.yaml already declares its metrics and plots).
    live = Live(dir=params.paths.dvclive_dir, dvcyaml=False, save_dvc_exp=False, report=None)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[DVCLiveCallback(live=live)],
    )
    if trainer.model.generation_config is not None:
        trainer.model.generation_config.pad_token_id = tokenizer.pad_token_id
    before = trainer.evaluate()["eval_loss"]
    log.info("val loss before training: %.4f", before)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    log.info("val loss after training: %.4f (before %.4f)", after, before)
    live.end()

    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trained = sum(sum(label != -100 for label in row) for row in trainer.train_dataset["labels"])
    with atomic_dir(params.paths.adapter_dir) as out:
        trainer.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / packaging.TRAINING_PARAMS).write_text(json.dumps({
            "base_model": asdict(base),
            "train": to_dict(params.train),
            "seed": seed,
            "quantization": quantization,
        }, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    scratch.cleanup()
    write_json(params.paths.train_metrics, {
        "val_loss_before": round(before, 6),
        "val_loss_after": round(after, 6),
        "val_perplexity_before": round(math.exp(min(before, 50.0)), 4),
        "val_perplexity_after": round(math.exp(min(after, 50.0)), 4),
        "train_loss": round(result.training_loss, 6),
        "steps": result.global_step,
        "quantization": quantization,
        "device": "cuda" if on_gpu else "cpu",
        "train_seconds": round(seconds, 2),
        "train_samples_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 3),
        "tokens_per_epoch": tokens,
        "trained_tokens_per_epoch": trained,
    })


if __name__ == "__main__":
    run_stage(main)
