"""train: supervised fine-tuning (QLoRA, LoRA or full) that is checked before it starts and survives preemption.

    python -m skytune.core.processes skytune.stages.train
        (normally: dvc repro train, or dvc exp run -S train.lora_r=16; the process launcher starts one process per
        GPU and node)

1. Tokenizes `paths.train_file` and `paths.val_file` with the base model's chat template and labels the tokens of
   `train.loss`, then runs the tokenization gate (`tokenization.gate`): one BOS, every trained assistant turn ending
   with its end-of-turn token inside the loss, pad never a stop token, no empty turn. It writes
   `paths.train_samples` (sequences with the trained spans marked) and fails before the model is loaded.
2. Loads the base (4-bit NF4/FP4 with `method: qlora`; where 4-bit cannot run, a warning and `quantization` in the
   metrics say what ran instead) and trains with TRL's SFTTrainer, `train.batching` padding-free by default.
3. Every `train.save_steps` steps writes a checkpoint under `$SKYTUNE_CHECKPOINT_DIR` or `paths.checkpoint_dir`, in a
   directory keyed by the fingerprint of the training inputs (params, base, data, code, library versions), marked
   complete only once fully written. On start it resumes from the newest complete one (torn ones are skipped),
   DVCLive logs included. SIGTERM saves a checkpoint and exits with `checkpoints.PREEMPTED_EXIT_CODE` (75), which
   SkyPilot's `recover_on_exit_codes` relaunches.
4. Writes `paths.adapter_dir` (the adapter, or the whole model with `method: full`, plus the tokenizer with its chat
   template and `training_params.json`), `paths.dvclive_dir` and `paths.train_metrics`, then removes the run's
   checkpoints: a forced re-run (`dvc exp run -f`) trains again.

With `method: none` it trains nothing: each output says so, and the preference stage trains from the base.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from skytune.core import cloud_node, job_ledger, packaging
from skytune.core.atomic import (
    atomic_dir,
    atomic_file,
    file_sha256,
    read_jsonl,
    write_json,
)
from skytune.core.chat import tokenization
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, load_tokenizer
from skytune.core.models.devices import compute_dtype, fsdp_enabled
from skytune.core.params import Params, to_dict
from skytune.core.training import checkpoints, new_tokens
from skytune.core.training.callbacks import (
    STATE_FILE,
    Checkpointing,
    StopOnPreemption,
    train_resumably,
)
from skytune.core.training.live import LiveLog, perplexity, start_live
from skytune.core.training.mfu import mfu
from skytune.core.training.sft import build_trainer, final_eval_loss, load_model
from skytune.stages import run_stage

log = logging.getLogger(__name__)

NO_SFT_FILE = "train.json"  # what paths.adapter_dir holds with method none


def _tokenize(params: Params, tokenizer: Any, rank: int) -> tuple[list, list, dict[str, Any]]:
    p = params.train
    encoder = tokenization.Encoder(tokenizer, p.loss)
    train = encoder.encode(read_jsonl(params.paths.train_file))
    val = encoder.encode(read_jsonl(params.paths.val_file))
    if rank == 0:
        with atomic_file(params.paths.train_samples) as fh:
            fh.write(tokenization.render_samples(train, p.gate_samples, loss=p.loss))
    reports = {name: tokenization.gate(tokenizer, records, max_length=p.max_length, loss=p.loss, where=path)
               for name, records, path in (("train", train, params.paths.train_file),
                                           ("val", val, params.paths.val_file))}
    log.info("tokenization gate passed: %s", {k: r.as_metrics() for k, r in reports.items()})
    return train, val, {k: r.as_metrics() for k, r in reports.items()}


def _fingerprint(params: Params, base: BaseModel) -> str:
    """Everything that determines the trained weights (not the number of processes: total_batch_size holds): the
    params, the base, the data, this package's code and the training libraries' versions."""
    files = [params.paths.train_file, params.paths.val_file]
    return checkpoints.fingerprint({"train": to_dict(params.train), "seed": params.base.seed, "base": asdict(base),
                                    "data": [file_sha256(Path(f)) for f in files],
                                    "code": checkpoints.code_digest(), "versions": checkpoints.library_versions()})


def main(params: Params) -> None:
    if params.train.method == "none":
        if int(os.environ.get("RANK", "0")) == 0:  # (one process writes what every process would)
            _skip(params)
        return
    with checkpoints.PreemptionNotice() as notice:
        _train(params, notice)


def _skip(params: Params) -> None:
    """`method: none`: no SFT (the preference stage trains from the base). Every output says so, DVC wanting each one
    there; the adapter directory holds no adapter, so the stages after train never take it."""
    paths = params.paths
    for directory in (paths.adapter_dir, paths.dvclive_dir):
        with atomic_dir(directory) as out:
            write_json(out / NO_SFT_FILE, {"method": "none"})
    with atomic_file(paths.train_samples) as fh:
        fh.write("train.method is none: no supervised fine-tuning, so no sequences were trained\n")
    write_json(paths.train_metrics, {"method": "none"})
    log.info("train.method none: no supervised fine-tuning (the preference stage trains from the base)")


def _train(params: Params, notice: checkpoints.PreemptionNotice) -> None:
    from transformers import set_seed

    p, paths = params.train, params.paths
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    set_seed(params.base.seed)
    base = BaseModel.load(paths.base_model_dir)
    tokenizer = load_tokenizer(base)
    train, val, gate_metrics = _tokenize(params, tokenizer, rank)

    run_dir = checkpoints.root(paths.checkpoint_dir) / _fingerprint(params, base)
    if world_size > 1:
        from accelerate import PartialState

        PartialState()  # the process group, up before the Trainer: the processes agree on the checkpoint to resume
    resume = checkpoints.newest_complete(run_dir)
    state: dict[str, Any] = json.loads((resume / STATE_FILE).read_text()) if resume else {}
    # Wall time on cloud nodes, all attempts of a preempted run together (each up to its last checkpoint).
    started, earlier = float(os.environ.get(job_ledger.RUN_STARTED_ENV) or time.time()), state.get("node_seconds", 0.0)
    if notice.received:
        checkpoints.exit_preempted()
    dtype = compute_dtype(p.compute_dtype)
    model, quantization = load_model(params.train, base, tokenizer, dtype)
    log.info("training on %s x%d, method %s, base weights %s, compute dtype %s, batching %s, loss %s; %s",
             "cuda" if torch.cuda.is_available() else "cpu", world_size, p.method, quantization, dtype, p.batching,
             p.loss, f"resuming from {resume}" if resume else f"checkpoints in {run_dir}")
    live = start_live(Path(paths.dvclive_dir), resume, rank)
    stop = StopOnPreemption(notice)
    callbacks = [*([LiveLog(live)] if live else []), stop,
                 Checkpointing(Path(paths.dvclive_dir),
                               lambda: {**state, "node_seconds": earlier + time.time() - started},
                               checkpoints.keep_count(p.save_total_limit))]
    added = new_tokens.new_token_ids(base, tokenizer)
    if added and fsdp_enabled():
        if base.added_tokens:
            raise SkytuneError(f"train.distributed fsdp_qlora cannot train the rows of the tokens the base lacks "
                               f"{base.added_tokens} (model.chat_template): FSDP flattens them with the frozen "
                               "embedding into one parameter, which must be all trainable or all frozen. Use "
                               "train.distributed: ddp, or a template the base's vocabulary covers")
        added = []  # an added pad's row: never a target, it stays as grown, as FSDP runs always had it
    if added:
        log.info("training the rows of %d token(s) the base lacked: %s", len(added),
                 tokenizer.convert_ids_to_tokens(added))
    trainer = build_trainer(model, tokenizer, train, val, p, output_dir=run_dir, seed=params.base.seed, dtype=dtype,
                            world_size=world_size, callbacks=callbacks, added=added)
    if "val_loss_before" not in state:
        state["val_loss_before"] = trainer.evaluate()["eval_loss"]
        if world_size > 1 and not fsdp_enabled():  # (FSDP wraps the model for evaluation already)
            # evaluate() marks the model prepared (accelerate 1.15 prepare_model, evaluation mode), and train() then
            # leaves it out of DistributedDataParallel: each process would train alone, never averaging gradients.
            trainer.model._is_accelerate_prepared = False
    start_step, seconds = train_resumably(trainer, resume, stop)
    after = final_eval_loss(trainer.state.log_history, trainer.state.global_step)
    after = trainer.evaluate()["eval_loss"] if after is None else after
    log.info("val loss after training: %.4f (before %.4f)", after, state["val_loss_before"])
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective under FSDP
    if live is None:
        return
    live.end()
    _write_outputs(params, base, trainer, tokenizer, quantization, weights)
    _write_metrics(params, trainer, train, gate_metrics, state["val_loss_before"], after, quantization,
                   seconds, start_step, world_size, cloud_node.describe(earlier + time.time() - started),
                   tokenizer.convert_ids_to_tokens(added))
    checkpoints.finished(run_dir)


def _write_outputs(params: Params, base: BaseModel, trainer: Any, tokenizer: Any, quantization: str,
                   weights: dict[str, Any]) -> None:
    packaging.write_trained(params.paths.adapter_dir, trainer.accelerator.unwrap_model(trainer.model), tokenizer,
                            {"base_model": asdict(base), "train": to_dict(params.train), "seed": params.base.seed,
                             "quantization": quantization}, state_dict=weights)


def _write_metrics(params: Params, trainer: Any, train: list, gate_metrics: dict[str, Any], before: float,
                   after: float, quantization: str, seconds: float, start_step: int, world_size: int,
                   cloud: dict[str, Any] | None, added_tokens: list[str]) -> None:
    state = trainer.state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    tokens_per_epoch = sum(len(r.input_ids) for r in train)
    steps_run = max(state.global_step - start_step, 0)
    tokens_run = tokens_per_epoch * params.train.epochs * steps_run / max(state.max_steps, 1)
    tokens_per_second = tokens_run / seconds if seconds > 0 else 0.0
    model = trainer.model
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    total = getattr(model, "get_base_model", lambda: model)().num_parameters()  # 4-bit weights counted unpacked
    metrics: dict[str, Any] = {
        "val_loss_before": round(before, 6),
        "val_loss_after": round(after, 6),
        "val_perplexity_before": round(perplexity(before), 4),
        "val_perplexity_after": round(perplexity(after), 4),
        "train_loss": round(sum(losses) / len(losses), 6) if losses else None,  # mean of the logged losses
        "steps": state.global_step,
        "resumed_from_step": start_step,
        "steps_this_run": steps_run,
        "world_size": trainer.args.world_size,
        "distributed": params.train.distributed if world_size > 1 else "none",
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "quantization": quantization,
        "method": params.train.method,
        "batching": params.train.batching,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_per_second, 1),
        "tokens_per_epoch": tokens_per_epoch,
        "trainable_parameters": trainable,
        "added_tokens": added_tokens,  # trained as new rows (training.new_tokens)
        "gate": gate_metrics,
    }
    if torch.cuda.is_available():
        metrics["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        utilization = mfu(tokens_per_second, total, trainable, world_size)
        if utilization is not None:
            metrics["mfu"] = round(utilization, 4)
    if cloud is not None:  # on a SkyPilot node: what it ran on, its wall and GPU hours, and its cost where priced
        metrics["cloud"] = cloud
    write_json(params.paths.train_metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
