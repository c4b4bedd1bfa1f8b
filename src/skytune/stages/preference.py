"""preference: preference training (DPO, KTO, ORPO, SimPO) after SFT, continuing from its adapter (or from the base).

    python -m skytune.stages.preference
        (normally: dvc exp run -S preference.method=dpo, or -S preference.beta=0.2: this stage and the ones after it;
        one process: on a multi-node job it runs on the head node, whose first GPU it uses)

With `preference.method: none` it writes only `preference.json` saying so into `paths.preference_adapter_dir`, and
the stages after it take train's adapter (`packaging.tuned_adapter`): their outputs are what they would be without
this stage. Otherwise:

1. Tokenizes the pairs of `paths.preference_dir` (train.jsonl, val.jsonl) through the chat template SFT saved with
   its adapter (the base's, with `train.method: none`), each answer masked as SFT's loss would train it, through
   the tokenization gate (`core.training.preference.encode`); skipped pairs are counted by reason.
2. Loads the base as train did (4-bit with `train.method: qlora`) with the SFT adapter, trainable, and trains it with
   TRL's trainer for the method. DPO and KTO compare with the SFT adapter itself, frozen (TRL's `ref` copy).
   With `train.method: none` (no SFT) it starts from the base instead: a new adapter of `preference.adapter` (qlora
   or lora) shaped by train's lora_* keys, the rows of tokens the base lacked trained beside it as train would, and
   the base's own tokenizer; DPO and KTO then compare with the base.
3. Checkpoints, resume and SIGTERM -> 75 as in train, under a fingerprint of this stage's inputs (the SFT adapter,
   where there is one, among them).
4. Writes the adapter (with the tokenizer and `training_params.json`), DVCLive logs and `paths.preference_metrics`:
   the val pairs' preference accuracy and log-probability margin before and after, and the implicit reward margin.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from skytune.core import cloud_node, job_ledger, packaging
from skytune.core.atomic import atomic_dir, file_sha256, read_jsonl, write_json
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, load_tokenizer
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import load_saved_tokenizer
from skytune.core.params import Params, adapter_method, to_dict
from skytune.core.training import checkpoints, new_tokens, preference
from skytune.core.training.callbacks import (
    STATE_FILE,
    Checkpointing,
    StopOnPreemption,
    train_resumably,
)
from skytune.core.training.live import LiveLog, start_live
from skytune.core.training.sft import load_model, lora_config
from skytune.stages import run_stage

log = logging.getLogger(__name__)

METHOD_FILE = "preference.json"  # what paths.preference_adapter_dir holds when no preference training ran
# The train settings this stage reads: the base loaded as train loaded it, checkpoints kept as train keeps them, and
# with method none, the new adapter's shape.
TRAIN_KEYS = ("method", "quant_type", "double_quant", "compute_dtype", "gradient_checkpointing", "save_total_limit",
              "lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora")


def _encode(params: Params, tokenizer: Any) -> tuple[preference.Encoded, preference.Encoded]:
    directory, p = Path(params.paths.preference_dir), params.preference
    parts = {part: preference.encode(tokenizer, read_jsonl(directory / f"{part}.jsonl"), max_length=p.max_length,
                                     where=str(directory / f"{part}.jsonl")) for part in ("train", "val")}
    train = parts["train"]
    if not (train.completions() if p.method == "kto" else train.pairs):
        raise SkytuneError(
            f"preference.method is {p.method} but {directory}/train.jsonl holds no usable "
            f"{'rows' if p.method == 'kto' else 'pairs'} (skipped: {dict(train.skipped) or 'none'}): add a "
            "data.sources entry of format preference, or set preference.method: none")
    log.info("preference data: %s", {k: {"pairs": len(v.pairs), "undesirable": len(v.undesirable),
                                         "skipped": dict(v.skipped)} for k, v in parts.items()})
    return train, parts["val"]


def _fingerprint(params: Params, settings: dict[str, Any], base: BaseModel, adapter: Path) -> str:
    """Everything that determines the trained weights: this stage's settings, the base, the SFT adapter (none with
    `train.method: none`), the data, this package's code and the training libraries' versions."""
    sft = [adapter / packaging.ADAPTER_WEIGHTS] if params.train.method != "none" else []
    files = sft + packaging.preference_files(params.paths.preference_dir)
    return checkpoints.fingerprint({**settings, "base": asdict(base), "data": [file_sha256(f) for f in files],
                                    "code": checkpoints.code_digest(), "versions": checkpoints.library_versions()})


def main(params: Params) -> None:
    # Every param the stage declares, read whatever the method: dvc.yaml re-runs the stage when any of them changes.
    settings = {"preference": to_dict(params.preference), "seed": params.base.seed,
                "train": {key: getattr(params.train, key) for key in TRAIN_KEYS}}
    if params.preference.method == "none":  # every output says so (DVC wants each one there)
        for directory in (params.paths.preference_adapter_dir, params.paths.preference_dvclive_dir):
            with atomic_dir(directory) as out:
                write_json(out / METHOD_FILE, {"method": "none"})
        write_json(params.paths.preference_metrics, {"method": "none"})
        return
    with checkpoints.PreemptionNotice() as notice:
        _train(params, settings, notice)


def _load(params: Params, base: BaseModel, adapter: Path, tokenizer: Any) -> tuple[Any, str]:
    """The base as train loaded it, with the SFT adapter on it, trainable; with `train.method: none`, the base as
    `preference.adapter` loads it, with a new adapter (and the rows of the tokens it lacked) to train."""
    from peft import PeftModel, get_peft_model

    method = adapter_method(params.train, params.preference)
    model, quantization = load_model(params.train, base, tokenizer, compute_dtype(params.train.compute_dtype),
                                     method=method)
    if params.train.method != "none":
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True), quantization
    rows = new_tokens.trainable_token_indices(model, new_tokens.new_token_ids(base, tokenizer))
    return get_peft_model(model, lora_config(params.train, rows, method=method)), quantization


def _tokenizer(params: Params, base: BaseModel, adapter: Path) -> Any:
    """The tokenizer SFT saved with its adapter, or with `train.method: none` the base's as every stage sees it."""
    return load_tokenizer(base) if params.train.method == "none" else load_saved_tokenizer(adapter)


def _train(params: Params, settings: dict[str, Any], notice: checkpoints.PreemptionNotice) -> None:
    from transformers import set_seed

    p, paths = params.preference, params.paths
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    set_seed(params.base.seed)
    base, adapter = BaseModel.load(paths.base_model_dir), Path(paths.adapter_dir)
    if params.train.method != "none" and not (adapter / packaging.ADAPTER_CONFIG).is_file():
        raise SkytuneError(f"preference.method {p.method} continues from a LoRA adapter, and {adapter} holds a whole "
                           "model (train.method: full): use train.method qlora or lora, or preference.method none")
    tokenizer = _tokenizer(params, base, adapter)
    train, val = _encode(params, tokenizer)
    run_dir = checkpoints.root(paths.checkpoint_dir) / _fingerprint(params, settings, base, adapter)
    resume = checkpoints.newest_complete(run_dir)
    state: dict[str, Any] = json.loads((resume / STATE_FILE).read_text()) if resume else {}
    started, earlier = float(os.environ.get(job_ledger.RUN_STARTED_ENV) or time.time()), state.get("node_seconds", 0.0)
    if notice.received:
        checkpoints.exit_preempted()
    model, quantization = _load(params, base, adapter, tokenizer)
    if "before" not in state:  # the SFT model's (or the base's) log-probabilities of the val answers: DPO's reference
        state["before"] = preference.answer_logps(model, val.pairs, tokenizer.pad_token_id)
    log.info("preference training (%s, beta %g) on %d train pairs, %d undesirable rows; %s", p.method, p.beta,
             len(train.pairs), len(train.undesirable), f"resuming from {resume}" if resume else f"checkpoints in {run_dir}")
    live = start_live(Path(paths.preference_dvclive_dir), resume, rank)
    stop = StopOnPreemption(notice)
    callbacks = [*([LiveLog(live, preference.LIVE_NAMES)] if live else []), stop,
                 Checkpointing(Path(paths.preference_dvclive_dir),
                               lambda: {**state, "node_seconds": earlier + time.time() - started},
                               checkpoints.keep_count(params.train.save_total_limit))]
    trainer = preference.build_trainer(
        p.method, model, tokenizer, train, val, p, output_dir=run_dir, seed=params.base.seed,
        dtype=compute_dtype(params.train.compute_dtype), world_size=world_size,
        gradient_checkpointing=params.train.gradient_checkpointing, callbacks=callbacks)
    start_step, seconds = train_resumably(trainer, resume, stop)
    after = preference.answer_logps(trainer.model, val.pairs, tokenizer.pad_token_id)
    if live is None:
        return
    live.end()
    _write_adapter(params, base, trainer, tokenizer, quantization)
    metrics = {"method": p.method, "beta": p.beta, "from": "base" if params.train.method == "none" else "sft",
               "quantization": quantization, "device": str(next(trainer.model.parameters()).device.type),
               "train_pairs": len(train.pairs),
               "train_undesirable": len(train.undesirable), "train_rows": trainer.train_dataset.num_rows,
               "skipped": {k: dict(v.skipped) for k, v in (("train", train), ("val", val))},
               **{k: round(v, 6) for k, v in preference.scores(val.pairs, state["before"], after, p.beta).items()},
               "steps": trainer.state.global_step, "resumed_from_step": start_step, "train_seconds": round(seconds, 2),
               "gate": {"train": train.gate, "val": val.gate}}
    cloud = cloud_node.describe(earlier + time.time() - started)
    write_json(paths.preference_metrics, metrics | ({"cloud": cloud} if cloud is not None else {}))
    log.info("val pairs: %s", {k: v for k, v in metrics.items() if k.startswith("val_")})
    checkpoints.finished(run_dir)


def _write_adapter(params: Params, base: BaseModel, trainer: Any, tokenizer: Any, quantization: str) -> None:
    """The trained adapter alone (not TRL's frozen `ref` copy), its tokenizer and `training_params.json`."""
    packaging.write_trained(params.paths.preference_adapter_dir, trainer.accelerator.unwrap_model(trainer.model),
                            tokenizer, {"base_model": asdict(base), "train": to_dict(params.train),
                                        "preference": to_dict(params.preference), "seed": params.base.seed,
                                        "quantization": quantization}, selected_adapters=["default"])


if __name__ == "__main__":
    run_stage(main)
