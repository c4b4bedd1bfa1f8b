"""Preference training (DPO, KTO, ORPO, SimPO) through TRL's own trainers, on sequences tokenized here.

Every answer is rendered after its prompt through the chat template training uses, and its tokens are those the SFT
loss would train as the conversation's last assistant turn (`tokenization.Encoder`, `completion_only`: the answer and
its end-of-turn token); the gate checks every rendered sequence before the model is loaded. TRL gets token ids only
and batches and scores them, so what is compared is what SFT would have trained:

- DPO (`trl.DPOTrainer`): `prompt_ids` / `chosen_ids` / `rejected_ids`; the reference is the adapter as it starts (SFT's,
  or a new one, which is the base), frozen: TRL copies a pretrained adapter to a `ref` adapter;
- KTO (`trl.KTOTrainer`): `prompt_ids` / `completion_ids` / `label`: each pair as a desirable and an undesirable
  answer, plus the rows labelled undesirable;
- ORPO and SimPO (`trl.experimental`'s ORPOTrainer, and CPOTrainer with `loss_type: simpo`): reference-free, fed
  their `prompt_*` / `chosen_*` / `rejected_*` ids, masks and labels.

TRL 1.16's DPO has padding-free batches switched off ("temporarily unavailable"), and the other three never had
them: every method runs padded batches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from skytune.core.chat import tokenization
from skytune.core.params import PreferenceParams
from skytune.core.training import new_tokens
from skytune.core.training.sft import grad_accum, keep_adapter_fp32

IGNORE = tokenization.IGNORE
# TRL's own log keys, as DVCLive names them (LiveLog).
LIVE_NAMES = {"rewards/margins": "train/reward_margin", "rewards/accuracies": "train/reward_accuracy",
              "eval_rewards/margins": "eval/reward_margin", "eval_rewards/accuracies": "eval/reward_accuracy"}


@dataclass(frozen=True)
class Pair:
    """A preference pair as token ids: the prompt (as the template renders it before an answer) and both answers."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class Completion:
    """One answer labelled desirable or not (KTO)."""

    id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass
class Encoded:
    """A preference file as token ids: the pairs, the rows labelled undesirable, what was skipped (by reason) and
    the gate's report."""

    pairs: list[Pair] = field(default_factory=list)
    undesirable: list[Completion] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    gate: dict[str, Any] = field(default_factory=dict)

    def completions(self) -> list[Completion]:
        """KTO's rows: each pair's chosen answer (desirable) and rejected one (not), then the undesirable rows."""
        return [c for p in self.pairs for c in (Completion(p.id, p.prompt_ids, p.chosen_ids, True),
                                                  Completion(p.id, p.prompt_ids, p.rejected_ids, False))
                ] + self.undesirable


def _split(sequence: tokenization.Encoded) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a sequence whose last assistant turn alone is trained."""
    trained = [i for i, label in enumerate(sequence.labels) if label != IGNORE]
    return sequence.input_ids[:trained[0]], sequence.input_ids[trained[0]:trained[-1] + 1]


def encode(tokenizer: Any, records: list[dict[str, Any]], *, max_length: int, where: str) -> Encoded:
    """Preference records (`{"id", "prompt", "chosen", "rejected", "tools"?}`, or `{"id", "prompt", "completion",
    "label": false}`) -> token ids, through the gate (GateError on a broken invariant). Skipped, by reason: an
    answer of more than one message (`multi_message_answer`: calls and results), a prompt the template renders
    differently before the two answers (`prompt_tokens_differ`), a pair longer than `max_length` (`too_long`)."""
    out = Encoded()
    kept, conversations = [], []
    for record in records:
        keys = ("chosen", "rejected") if "chosen" in record else ("completion",)
        if any(len(record[k]) != 1 for k in keys):
            out.skipped["multi_message_answer"] += 1
            continue
        kept.append(record)
        tools = {"tools": record["tools"]} if record.get("tools") else {}
        conversations += [{"id": f"{record['id']}/{k}", "source": record.get("source", ""),
                           "messages": record["prompt"] + record[k], **tools} for k in keys]
    sequences = tokenization.Encoder(tokenizer, "completion_only").encode(conversations) if conversations else []
    if sequences:
        report = tokenization.gate(tokenizer, sequences, max_length=max(len(s.input_ids) for s in sequences),
                                   loss="completion_only", where=where)
        out.gate = report.as_metrics()
    answers = iter(map(_split, sequences))
    for record in kept:
        parts = [next(answers) for _ in (("chosen", "rejected") if "chosen" in record else ("completion",))]
        if any(len(prompt) + len(answer) > max_length for prompt, answer in parts):
            out.skipped["too_long"] += 1
        elif len(parts) == 1:
            out.undesirable.append(Completion(record["id"], *parts[0], bool(record.get("label", False))))
        elif parts[0][0] != parts[1][0]:
            out.skipped["prompt_tokens_differ"] += 1
        else:
            out.pairs.append(Pair(record["id"], parts[0][0], parts[0][1], parts[1][1]))
    return out


@torch.no_grad()
def answer_logps(model: Any, pairs: list[Pair], pad_id: int, batch_size: int = 8) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) log-probability under `model`: the sum over the answer's tokens given the
    prompt, as DPO scores them."""
    rows = [(p.prompt_ids, answer) for p in pairs for answer in (p.chosen_ids, p.rejected_ids)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(prompt) + len(answer) for prompt, answer in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (prompt, answer) in enumerate(batch):
            n = len(prompt) + len(answer)
            ids[i, :n] = torch.tensor(prompt + answer)
            labels[i, len(prompt):n] = torch.tensor(answer)
            mask[i, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        targets = labels[:, 1:].to(device)
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums += (logps * (targets != IGNORE)).sum(dim=1).tolist()
    model.train(was_training)
    return list(zip(sums[0::2], sums[1::2], strict=True))


def scores(pairs: list[Pair], before: list[tuple[float, float]], after: list[tuple[float, float]],
           beta: float) -> dict[str, float]:
    """Val-pair metrics, before and after:
    - `preference_accuracy`: the share of pairs whose chosen answer has the higher log-probability per token (per
      token, so that the shorter answer does not win by its length alone: SimPO's measure);
    - `logp_margin`: the mean of chosen minus rejected log-probability (summed over the answer, as DPO sums);
    and after, DPO's implicit reward against the model before (SFT's, or the base): beta x ((chosen - its before) -
    (rejected - its before)), its mean (`reward_margin`) and the share above 0 (`reward_accuracy`)."""
    n = max(len(pairs), 1)
    sizes = [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    rewards = [beta * ((ca - cb) - (ra - rb)) for (cb, rb), (ca, ra) in zip(before, after, strict=True)]
    out: dict[str, float] = {"val_pairs": len(pairs)}
    for when, logps in (("before", before), ("after", after)):
        out[f"val_preference_accuracy_{when}"] = sum(
            c / nc > r / nr for (c, r), (nc, nr) in zip(logps, sizes, strict=True)) / n
        out[f"val_logp_margin_{when}"] = sum(c - r for c, r in logps) / n
    return out | {"val_reward_margin": sum(rewards) / n, "val_reward_accuracy": sum(r > 0 for r in rewards) / n}


def _dataset(method: str, data: Encoded) -> Any:
    from datasets import Dataset

    if method == "kto":
        rows = data.completions()
        return Dataset.from_dict({"prompt_ids": [c.prompt_ids for c in rows],
                                  "completion_ids": [c.completion_ids for c in rows],
                                  "label": [c.label for c in rows]})
    if method == "dpo":
        return Dataset.from_dict({k: [getattr(p, k) for p in data.pairs]
                                  for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    columns: dict[str, list[list[int]]] = {}  # ORPO/CPO: the legacy DPO columns their collator pads
    for p in data.pairs:
        rows = {"prompt_": (p.prompt_ids, []), "chosen_": (p.prompt_ids, p.chosen_ids),
                "rejected_": (p.prompt_ids, p.rejected_ids)}
        for prefix, (prompt, answer) in rows.items():
            ids = prompt + answer
            columns.setdefault(f"{prefix}input_ids", []).append(ids)
            columns.setdefault(f"{prefix}attention_mask", []).append([1] * len(ids))
            if answer:
                columns.setdefault(f"{prefix}labels", []).append([IGNORE] * len(prompt) + answer)
    return Dataset.from_dict(columns)


def _trainer_class(method: str) -> type:
    """TRL's trainer for `method`, fed the ids made here instead of tokenizing text itself."""
    if method == "dpo":
        from trl import DPOTrainer

        class Dpo(DPOTrainer):
            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset  # tokenized by `encode`

        return Dpo
    if method == "kto":
        from trl import KTOTrainer

        class Kto(KTOTrainer):
            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                if not self.calculate_KL:
                    return dataset
                # As TRL's own: the KL term's mismatched pairs, each batch's completions rotated by one.
                return dataset.map(lambda b: {"KL_completion_ids": [b["completion_ids"][-1]] + b["completion_ids"][:-1]},
                                   batched=True, batch_size=args.per_device_train_batch_size)

        return Kto
    if method == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Legacy
    else:
        from trl.experimental.cpo import CPOTrainer as Legacy

    class Tokenized(Legacy):
        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
            return feature  # tokenized by `encode`

    return Tokenized


def _config(method: str, p: PreferenceParams, *, output_dir: Path, seed: int, dtype: torch.dtype, world_size: int,
            gradient_checkpointing: bool, evaluate: bool) -> Any:
    common = {
        "output_dir": str(output_dir), "seed": seed, "data_seed": seed, "learning_rate": p.learning_rate,
        "lr_scheduler_type": p.lr_scheduler, "warmup_steps": p.warmup_ratio, "num_train_epochs": p.epochs,
        "per_device_train_batch_size": p.batch_size, "per_device_eval_batch_size": p.batch_size,
        "gradient_accumulation_steps": grad_accum(p.total_batch_size, p.batch_size, world_size),
        "activation_checkpointing": gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        "activation_checkpointing_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
        "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": False, "logging_steps": p.logging_steps,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": p.eval_steps, "save_strategy": "steps", "save_steps": p.save_steps,
        "save_total_limit": None,  # pruned by Checkpointing, only after a newer checkpoint is complete
        "report_to": "none", "dataloader_num_workers": 0, "remove_unused_columns": False}
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig(beta=p.beta, loss_type=["sigmoid"], max_length=None, **common)
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig(beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                         max_length=None, **common)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(beta=p.beta, max_length=p.max_length, **common)
    from trl.experimental.cpo import CPOConfig

    return CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=p.beta, simpo_gamma=p.simpo_gamma,
                     max_length=p.max_length, **common)


def build_trainer(method: str, model: Any, tokenizer: Any, train: Encoded, val: Encoded, p: PreferenceParams, *,
                  output_dir: Path, seed: int, dtype: torch.dtype, world_size: int, gradient_checkpointing: bool,
                  callbacks: list[Any]) -> Any:
    """TRL's trainer of `method` on the encoded pairs; `model` carries the trainable adapter (SFT's, or a new one)."""
    evaluate = bool(val.completions() if method == "kto" else val.pairs)
    config = _config(method, p, output_dir=output_dir, seed=seed, dtype=dtype, world_size=world_size,
                     gradient_checkpointing=gradient_checkpointing, evaluate=evaluate)
    trainer = _trainer_class(method)(model=model, args=config, train_dataset=_dataset(method, train),
                                     eval_dataset=_dataset(method, val) if evaluate else None,
                                     processing_class=tokenizer, callbacks=callbacks)
    keep_adapter_fp32(trainer.model)
    new_tokens.expose_head_bias(trainer.model)
    new_tokens.copy_reference_rows(trainer.model)
    return trainer
