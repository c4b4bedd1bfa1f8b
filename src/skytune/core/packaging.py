"""Packaging of outputs: a training stage's adapter directory, the file manifest and the model card of an exported
model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from skytune.core.atomic import atomic_dir, file_sha256, write_json
from skytune.core.errors import SkytuneError

TRAINING_PARAMS = "training_params.json"  # beside every adapter: the resolved hyperparameters it was trained with


def tuned_adapter(adapter_dir: str, preference_adapter_dir: str) -> Path:
    """The adapter the stages after training take: the preference stage's when it trained one, else train's."""
    preference = Path(preference_adapter_dir)
    return preference if (preference / TRAINING_PARAMS).is_file() else Path(adapter_dir)


def recipe(training: dict[str, Any]) -> str:
    """What trained the model, in words, from a training stage's `training_params.json`: SFT, SFT then a preference
    method, or a preference method from the base (`train.method: none`)."""
    train, preference = training.get("train", {}), training.get("preference")
    steps = [] if train.get("method") == "none" else [f"SFT, method {train.get('method')}, loss {train.get('loss')}"]
    if preference:  # (from the base: the adapter as it ran, QLoRA where 4-bit ran)
        adapter = "qlora" if training.get("quantization") in ("nf4", "fp4") else "lora"
        start = "" if steps else f" from the base on a new {adapter} adapter"
        steps.append(f"{str(preference.get('method')).upper()}{start}, beta {preference.get('beta')}")
    return "; then ".join(steps)


def tags(training: dict[str, Any]) -> list[str]:
    """The model card's tags: skytune, the adapter as it ran (qlora, lora, or none for a whole model), sft where SFT
    ran, and the preference method where one did."""
    train, preference = training.get("train", {}), training.get("preference")
    quantized = training.get("quantization") in ("nf4", "fp4")
    adapter = ["qlora" if quantized else "lora"] if train.get("method") != "full" or preference else []
    return ["skytune", *adapter, *(["sft"] if train.get("method") != "none" else []),
            *([str(preference.get("method"))] if preference else [])]


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"sha256", "bytes"}}` for every file under `directory`, sorted."""
    return {
        str(path.relative_to(directory)): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def preference_files(preference_dir: str) -> list[Path]:
    """The preference stage's data as merge_data writes it: the train pairs, then the val pairs."""
    return [Path(preference_dir) / f"{part}.jsonl" for part in ("train", "val")]


def data_hash(files: list[Path]) -> str:
    """One sha256 over the given data files, in order: names the exact training data of a model."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


CHAT_TEMPLATE = "chat_template.jinja"  # transformers saves a tokenizer's chat template here; vLLM reads it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORTED_ADAPTER = "adapter"  # the adapter's directory under paths.export_dir (export.formats: adapter)
# What vLLM loads from an adapter (vllm/lora/utils.py parse_fine_tuned_lora_name); anything else it refuses.
LORA_TENSOR = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
TRAINED_ROWS = ".trainable_tokens_delta"  # PEFT's tensors of the rows `trainable_token_indices` trains
PLAIN_LORA_INIT = (True, False, "gaussian")  # PiSSA, OLoRA, CorDA, LoftQ inits change the base weights too


class AdapterError(SkytuneError):
    """An adapter a serving engine would refuse; the message names every problem."""


def stable_adapter_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a PEFT adapter_config.json) with `target_modules` sorted: PEFT writes them in set order, which
    changes from run to run (string hashing is salted), so the same training would give another file and DVC would
    see a changed output."""
    if isinstance(config.get("target_modules"), list):
        return {**config, "target_modules": sorted(config["target_modules"])}
    return config


def write_trained(directory: str | Path, model: Any, tokenizer: Any, training: dict[str, Any],
                  **save_kwargs: Any) -> None:
    """Write a training stage's output `directory` at once: the adapter (a PEFT model) or the whole model (a full
    fine-tune), the tokenizer with its chat template, and `training` as `training_params.json`.

    An adapter is saved without whole embedding matrices: PEFT adds them when the vocabulary grew, but every grown
    row is a token trained beside the adapter and saved with it (`training.new_tokens`), every other row the base's.
    Its `adapter_config.json` is written in a stable order (`stable_adapter_config`)."""
    with atomic_dir(directory) as out:
        if hasattr(model, "peft_config"):
            model.save_pretrained(out, save_embedding_layers=False, **save_kwargs)
            config_file = out / ADAPTER_CONFIG
            write_json(config_file, stable_adapter_config(json.loads(config_file.read_text(encoding="utf-8"))))
        else:
            model.save_pretrained(out, **save_kwargs)
        tokenizer.save_pretrained(out)
        (out / TRAINING_PARAMS).write_text(json.dumps(training, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def vllm_adapter_problems(config: dict[str, Any], tensor_names: list[str], *, max_lora_rank: int,
                          base_vocab_size: int, tokenizer_size: int) -> list[str]:
    """Why vLLM would refuse this PEFT LoRA adapter (empty: it loads). The rules of vLLM's `PEFTHelper` and LoRA
    model loader: LoRA tensors only, no `modules_to_save` (vllm#9280), no DoRA, no trained biases, rank at most
    `--max-lora-rank` (vllm#2847), and no tokens the base model lacks."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    saved = config.get("modules_to_save") or []
    if saved:
        problems.append(f"modules_to_save = {sorted(saved)}: the adapter carries whole copies of these modules, "
                        "which vLLM refuses (vllm#9280); export the merged model instead, or train without them")
    rows = config.get("trainable_token_indices")
    if rows:
        count = len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)
        problems.append(f"trainable_token_indices: the rows of {count} token(s) the base lacked (a chat template's "
                        "tokens, an added pad) trained beside LoRA, which vLLM's LoRA loader does not load: serve the "
                        "merged model (export.formats: merged)")
    others = [n for n in tensor_names if not any(tag in n for tag in (*LORA_TENSOR, TRAINED_ROWS))]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        problems.append(f"{len(others)} tensor(s) that are not LoRA A/B matrices ({shown}): vLLM loads only "
                        "lora_A/lora_B; embeddings or heads saved with the adapter need the merged export")
    ranks = {"r": config.get("r", 0), **{f"rank_pattern[{k}]": v for k, v in (config.get("rank_pattern") or {}).items()}}
    too_big = {k: v for k, v in ranks.items() if v > max_lora_rank}
    if too_big:
        problems.append(f"rank {max(too_big.values())} ({', '.join(sorted(too_big))}) is above export.max_lora_rank "
                        f"= {max_lora_rank}: vLLM refuses it unless served with a higher --max-lora-rank "
                        "(vllm#2847); lower train.lora_r or raise export.max_lora_rank")
    patterns = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if patterns:
        problems.append(f"{' and '.join(patterns)} set: not every vLLM release honours per-module ranks or alphas "
                        "(older ones silently scale every module alike); export the merged model instead")
    if config.get("init_lora_weights", True) not in PLAIN_LORA_INIT:
        problems.append(f"init_lora_weights = {config['init_lora_weights']!r}: this init changes the base weights "
                        "too, so the adapter alone on the original base is not the trained model; vLLM refuses it")
    if config.get("use_dora"):
        problems.append("use_dora is true: vLLM does not serve DoRA adapters; export the merged model instead")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias = {config.get('bias')!r}, lora_bias = {config.get('lora_bias')}: vLLM loads no "
                        "trained biases")
    if tokenizer_size > base_vocab_size:
        problems.append(f"the tokenizer has {tokenizer_size} tokens and the base model {base_vocab_size} "
                        "embedding rows (tokens were added: model.pad_token add, or a chat template's tokens the base "
                        "lacked): the adapter alone cannot serve the new tokens")
    return problems


def model_card(
    *,
    name: str,
    base: dict[str, Any],
    data_sha256: str,
    training: dict[str, Any],
    metrics: dict[str, dict[str, Any]],
    serving: list[tuple[str, str]],
) -> str:
    """A README.md for the exported model: provenance, hyperparameters, metrics and how to serve each format
    (`serving`: (what, shell command) pairs)."""
    revision = base.get("revision") or "(built locally; no hub revision)"
    # The template itself is in chat_template.jinja beside this card.
    shown = {**training, "base_model": {k: v for k, v in base.items() if k != "chat_template"}}
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [{', '.join(tags(training))}]",
        "---",
        f"# {name}",
        "",
        f"Fine-tuned with the skytune DVC pipeline ({recipe(training)}), "
        f"merged in {metrics.get('merge_adapters', {}).get('merge_dtype', 'the compute dtype')} onto the base's "
        f"{metrics.get('merge_adapters', {}).get('merged_onto', 'original')} weights (the merge itself never runs on 4-bit weights).",
        "",
        "## Provenance",
        f"- base model: `{base['name']}` ({base['kind']})",
        f"- base revision: `{revision}`",
        *([f"- base model file: `{base['gguf']['file']}`, sha256 `{base['gguf']['sha256']}` (what "
           "adapter_config.json's base_model_name_or_path names)"] if base.get("gguf") else []),
        f"- training data sha256: `{data_sha256}`",
        "",
        "## Training parameters",
        "```json",
        json.dumps(shown, indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
    ]
    for stage, values in metrics.items():
        lines.append(f"### {stage}")
        for k, v in sorted(values.items()):
            lines += [f"- {k}.{kk}: {vv}" for kk, vv in sorted(v.items())] if isinstance(v, dict) else [f"- {k}: {v}"]
    lines += ["", "## Serving", "", "Commands run from the repository root.", ""]
    for what, command in serving:
        lines += [f"{what}:", "```bash", command, "```", ""]
    lines += [
        "Every format carries the chat template used in training (`chat_template.jinja`), and stops on the "
        "template's end-of-turn token (`generation_config.json` `eos_token_id`).",
        "",
    ]
    return "\n".join(lines)
