"""Supervised fine-tuning with TRL's SFTTrainer on pre-tokenized sequences: the trainer built from the train params,
and the callbacks that make a run observable and resumable.

The trainer receives `input_ids` and `labels` made by `tokenization.Encoder`, so what is trained is exactly what the
gate checked; TRL only batches them (padded, padding-free, or packed best-fit-decreasing).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from skytune import attention, checkpoints, models
from skytune.params import TrainParams
from skytune.tokenization import IGNORE, Encoded

log = logging.getLogger(__name__)

STATE_FILE = "skytune_state.json"  # what the stage needs back on resume, saved inside each checkpoint
LIVE_SNAPSHOT = "dvclive"  # the DVCLive directory as of the checkpoint, restored on resume
# Dense bf16 peak of one GPU, for MFU (FIELD_NOTES performance anchors; vendor datasheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
                   "A10": 125e12}


def grad_accum(total_batch_size: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps that keep `total_batch_size` sequences per optimizer step on `world_size`
    processes; raises when it cannot be held exactly."""
    per_step = batch_size * world_size
    if total_batch_size % per_step:
        raise ValueError(f"params.yaml train.total_batch_size ({total_batch_size}) is not a multiple of batch_size "
                         f"({batch_size}) x {world_size} process(es): choose a batch_size that divides "
                         f"{total_batch_size // world_size if total_batch_size >= world_size else 1}")
    return total_batch_size // per_step


def lora_config(p: TrainParams) -> Any:
    """The PEFT LoRA config of `p`, or None for `method: full`."""
    from peft import LoraConfig

    if p.method == "full":
        return None
    return LoraConfig(
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        target_modules=p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules),
        use_rslora=p.use_rslora,
        use_dora=p.use_dora,
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


def trained_positions_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
    """The next-token cross-entropy over the trained tokens, with the output head applied only where the next label
    is trained (`logits_to_keep`): the head of a 49k-150k vocabulary is a large share of a small model's compute, and
    assistant tokens are often a quarter of a sequence. Summed, then divided by `num_items_in_batch` (the trained
    tokens of the whole optimizer step, as transformers counts them) or this batch's trained tokens."""
    targets = inputs["labels"][:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()  # positions whose next token is trained, in any row
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep, use_cache=False)
    kept = targets[:, keep]
    logits = outputs.logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (kept != IGNORE).sum().clamp(min=1)
    return loss / count


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


def build_trainer(model: Any, tokenizer: Any, train: list[Encoded], val: list[Encoded], p: TrainParams, *,
                  output_dir: Path, seed: int, dtype: torch.dtype, world_size: int = 1, save: bool = True,
                  callbacks: list[Any] | None = None) -> Any:
    """An SFTTrainer on pre-tokenized sequences with the batching, method and knobs of `p`."""
    if p.batching != "padded" and attention.use_varlen_sdpa(model):
        log.info("padding-free batches: attention runs per sequence (%s)", attention.NAME)
    trainer = _trainer_class()(
        model=model,
        args=sft_config(p, output_dir=output_dir, seed=seed, dtype=dtype, world_size=world_size, save=save),
        train_dataset=dataset(train),
        eval_dataset=dataset(val),
        processing_class=tokenizer,
        peft_config=lora_config(p),
        callbacks=callbacks or [],
    )
    if p.method != "full" and not models.fsdp_enabled():
        # (Under FSDP the adapter stays in the storage dtype: one flat parameter cannot mix dtypes.)
        # TRL casts the adapter of a 4-bit model to bf16, but PEFT loads it back in fp32 when training resumes from a
        # checkpoint: keep it in fp32 from the start (PEFT's own default) so a resumed run computes exactly what an
        # uninterrupted one does (measured on CPU: val loss off by 5e-3 otherwise). LoRA weights are a few MB.
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    if trainer.model.generation_config is not None:
        trainer.model.generation_config.pad_token_id = tokenizer.pad_token_id
    return trainer


def _logged_steps(live_dir: Path) -> dict[str, int]:
    """The last step of every metric already in a DVCLive directory (after a resume)."""
    last: dict[str, int] = {}
    plots = live_dir / "plots" / "metrics"
    for tsv in plots.rglob("*.tsv") if plots.is_dir() else []:
        lines = tsv.read_text(encoding="utf-8").strip().splitlines()
        if len(lines) > 1:
            header = lines[0].split("\t")
            last[str(tsv.relative_to(plots).with_suffix(""))] = int(lines[-1].split("\t")[header.index("step")])
    return last


class LiveLog(TrainerCallback):
    """DVCLive metrics keyed by the optimizer step: train loss, learning rate and grad norm every logging step, val
    loss and perplexity every eval. A metric is never logged twice at a step, also across a resume (dvclive#781)."""

    NAMES: ClassVar[dict[str, str]] = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
             "eval_loss": "eval/loss"}

    def __init__(self, live: Any) -> None:
        self.live = live
        self.last = _logged_steps(Path(live.dir))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        values = {self.NAMES[k]: float(v) for k, v in logs.items() if k in self.NAMES}
        if "eval/loss" in values:
            values["eval/perplexity"] = math.exp(min(values["eval/loss"], 50.0))
        step = state.global_step
        fresh = {k: v for k, v in values.items() if self.last.get(k, -1) < step}
        if not fresh:
            return
        self.live.step = step
        for name, value in fresh.items():
            self.live.log_metric(name, value)
            self.last[name] = step
        self.live.make_summary()


class Checkpointing(TrainerCallback):
    """After the Trainer writes `checkpoint-<step>`: add the DVCLive snapshot and the stage's state, write the
    completion marker, and prune old checkpoints (main process, after every process has written its part)."""

    def __init__(self, live_dir: Path, state: Callable[[], dict[str, Any]], keep: int) -> None:
        self.live_dir, self.state, self.keep = live_dir, state, keep

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import json

        _barrier()
        if state.is_world_process_zero:
            run_dir = Path(args.output_dir)
            directory = run_dir / f"checkpoint-{state.global_step}"
            if self.live_dir.is_dir():
                shutil.copytree(self.live_dir, directory / LIVE_SNAPSHOT, dirs_exist_ok=True)
            (directory / STATE_FILE).write_text(json.dumps(self.state(), sort_keys=True), encoding="utf-8")
            checkpoints.mark_complete(directory)
            checkpoints.prune(run_dir, self.keep)
            log.info("checkpoint %s complete", directory)
        _barrier()


class StopOnPreemption(TrainerCallback):
    """Ends training at the end of the step in which any process got SIGTERM, asking the Trainer to save first."""

    def __init__(self, notice: checkpoints.PreemptionNotice) -> None:
        self.notice = notice
        self.stopped = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if _any_process(self.notice.received):
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True


def restore_live(checkpoint: Path, live_dir: Path) -> None:
    """Put back the DVCLive directory as it was at `checkpoint` (later steps, logged before a kill, are dropped)."""
    shutil.rmtree(live_dir, ignore_errors=True)
    if (checkpoint / LIVE_SNAPSHOT).is_dir():
        shutil.copytree(checkpoint / LIVE_SNAPSHOT, live_dir)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _any_process(flag: bool) -> bool:
    if not _distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def mfu(tokens_per_second: float, params: int, trainable: int, world_size: int) -> float | None:
    """Model FLOPs utilization: useful FLOPs/s over the GPUs' dense bf16 peak. Forward 2N, backward 2N for the
    activation gradients plus 2 x trainable for the weight gradients; None off GPU or on an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    return tokens_per_second * (4 * params + 2 * trainable) / (peak * world_size)
