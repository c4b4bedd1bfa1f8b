"""Supervised fine-tuning with TRL's SFTTrainer on pre-tokenized sequences, built from the train params.

The trainer receives `input_ids` and `labels` made by `tokenization.Encoder`, so what is trained is exactly what the
gate checked; TRL only batches them (padded, padding-free, or packed best-fit-decreasing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from skytune.core.chat.tokenization import Encoded
from skytune.core.errors import SkytuneError
from skytune.core.models import attention
from skytune.core.models.base import BaseModel
from skytune.core.models.devices import fsdp_enabled
from skytune.core.models.loading import fit_embeddings, load_for_training
from skytune.core.params import TrainParams
from skytune.core.training import lora_dropout, new_tokens
from skytune.core.training.head_loss import trained_positions_loss

log = logging.getLogger(__name__)


def load_model(p: TrainParams, base: BaseModel, tokenizer: Any, dtype: torch.dtype,
               method: str | None = None) -> tuple[Any, str]:
    """The base as `p` trains it (4-bit with `method: qlora`, ready for k-bit training), its embeddings grown to the
    tokenizer; and the quantization that ran. `method`: in place of `p.method` (`params.adapter_method`)."""
    from peft import prepare_model_for_kbit_training

    model, quantization = load_for_training(
        base, four_bit=(method or p.method) == "qlora", quant_type=p.quant_type, double_quant=p.double_quant,
        dtype=dtype)
    fit_embeddings(model, tokenizer)
    if quantization in ("nf4", "fp4") and not fsdp_enabled():  # FSDP+QLoRA keeps the storage dtype
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing)
    return model, quantization


def grad_accum(total_batch_size: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps that keep `total_batch_size` sequences per optimizer step on `world_size`
    processes; raises when it cannot be held exactly."""
    per_step = batch_size * world_size
    if total_batch_size % per_step:
        raise SkytuneError(f"params.yaml train.total_batch_size ({total_batch_size}) is not a multiple of batch_size "
                         f"({batch_size}) x {world_size} process(es): choose a batch_size that divides "
                         f"{total_batch_size // world_size if total_batch_size >= world_size else 1}")
    return total_batch_size // per_step


def lora_config(p: TrainParams, token_rows: dict[str, list[int]] | None = None, method: str | None = None) -> Any:
    """The PEFT LoRA config of `p`, or None for `method: full`; `token_rows`: embedding rows trained beside it
    (`new_tokens.trainable_token_indices`); `method`: in place of `p.method` (`params.adapter_method`)."""
    from peft import LoraConfig

    if (method or p.method) == "full":
        return None
    return LoraConfig(
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules),
        use_rslora=p.use_rslora,
        use_dora=p.use_dora,
        trainable_token_indices=token_rows,
        task_type="CAUSAL_LM",
    )


def sft_config(p: TrainParams, *, output_dir: Path, seed: int, dtype: torch.dtype, world_size: int,
               save: bool = True) -> Any:
    """The SFTConfig of the train params. `save=False` disables checkpoints (benchmarks)."""
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
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
        gradient_accumulation_steps=grad_accum(p.total_batch_size, p.batch_size, world_size),
        # Sequences arrive tokenized and within max_length (merge_data saw to it, the gate checked it); TRL needs
        # the length only to size packed rows.
        max_length=p.max_length if p.batching == "packing" else None,
        packing=p.batching == "packing",
        packing_strategy="bfd",
        padding_free=p.batching == "padding_free",
        eval_packing=False,  # val loss per conversation, comparable across batching modes
        assistant_only_loss=False,  # the labels already carry the loss mask
        completion_only_loss=False,
        activation_checkpointing=p.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if p.gradient_checkpointing else None,
        # SFTConfig defaults to bf16=True; honour the compute dtype instead (fp32 on CPU).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        logging_steps=p.logging_steps,
        eval_strategy="steps",
        eval_steps=p.eval_steps,
        save_strategy="steps" if save else "no",
        save_steps=p.save_steps,
        save_total_limit=None,  # pruned by Checkpointing, only after a newer checkpoint is complete
        report_to="none",  # DVCLive is attached by LiveLog, keyed by the optimizer step
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def dataset(records: list[Encoded]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in records], "labels": [r.labels for r in records]})


def final_eval_loss(log_history: list[dict[str, Any]], step: int) -> float | None:
    """The val loss the Trainer already logged at `step` (transformers evaluates at the last step of an
    `eval_strategy: steps` run), or None: the weights have not changed since, so evaluating again gives the same."""
    return next((e["eval_loss"] for e in reversed(log_history) if "eval_loss" in e and e.get("step") == step), None)


def _trainer_class() -> type:
    """TRL's SFTTrainer, with the loss of `trained_positions_loss` where TRL's own fused head scores every position.

    TRL's fused head (`add_fused_lm_head`) scores only the trained positions on Triton devices (CUDA, XPU); elsewhere
    it scores every position and also computes each token's entropy and top-1 accuracy for the logs: measured on 2
    CPU cores with SmolLM2-135M, 38% of a training step. There, the loss is computed on the trained positions only
    (same value, same gradients); the logs lose TRL's entropy and token accuracy."""
    from trl import SFTTrainer
    from trl.kernels.chunked_logprob import _use_triton

    class Trainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if return_outputs or _use_triton(self.args.device):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = trained_positions_loss(model, inputs, num_items_in_batch)
            # As transformers' Trainer: num_items_in_batch counts every rank's tokens, and DDP averages gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

    return Trainer


def keep_adapter_fp32(model: Any) -> None:
    """TRL's trainers cast the adapter of a 4-bit model to bf16, but PEFT loads it back in fp32 when training resumes
    from a checkpoint: keep it in fp32 from the start (PEFT's own default) so a resumed run computes exactly what an
    uninterrupted one does (measured on CPU: SFT's val loss off by 5e-3, DPO's reward margin by 3x otherwise). LoRA
    weights are a few MB."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def build_trainer(model: Any, tokenizer: Any, train: list[Encoded], val: list[Encoded], p: TrainParams, *,
                  output_dir: Path, seed: int, dtype: torch.dtype, world_size: int = 1, save: bool = True,
                  callbacks: list[Any] | None = None, added: list[int] | None = None) -> Any:
    """An SFTTrainer on pre-tokenized sequences with the batching, method and knobs of `p`; `added`: ids the
    base never trained (`new_tokens.new_token_ids`), whose rows train beside the adapter."""
    if p.batching != "padded" and attention.use_varlen_sdpa(model):
        log.info("padding-free batches: attention runs per sequence (%s)", attention.NAME)
    trainer = _trainer_class()(
        model=model,
        args=sft_config(p, output_dir=output_dir, seed=seed, dtype=dtype, world_size=world_size, save=save),
        train_dataset=dataset(train),
        eval_dataset=dataset(val),
        processing_class=tokenizer,
        peft_config=lora_config(p, new_tokens.trainable_token_indices(model, added or [])),
        callbacks=callbacks or [],
    )
    new_tokens.expose_head_bias(trainer.model)
    if p.method != "full" and not fsdp_enabled():
        # (Under FSDP the adapter stays in the storage dtype: one flat parameter cannot mix dtypes.)
        keep_adapter_fp32(trainer.model)
        if dtype == torch.float32 and (moved := lora_dropout.install(trainer.model)):
            log.info("LoRA dropout on %d layers keeps a 1-byte mask for backward, not a copy of the input", moved)
    if trainer.model.generation_config is not None:
        trainer.model.generation_config.pad_token_id = tokenizer.pad_token_id
    return trainer
