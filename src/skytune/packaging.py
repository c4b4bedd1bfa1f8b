"""Packaging of outputs: the file manifest and the model card of an exported model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TRAINING_PARAMS = "training_params.json"  # beside every adapter: the resolved hyperparameters it was trained with


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"sha256", "bytes"}}` for every file under `directory`, sorted."""
    return {
        str(path.relative_to(directory)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def data_hash(files: list[Path]) -> str:
    """One sha256 over the given data files, in order: names the exact training data of a model."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def model_card(
    *,
    name: str,
    base: dict[str, Any],
    data_sha256: str,
    training: dict[str, Any],
    metrics: dict[str, dict[str, Any]],
) -> str:
    """A README.md for the exported model: provenance, hyperparameters, metrics and how to serve it."""
    revision = base.get("revision") or "(built locally; no hub revision)"
    train = training.get("train", {})
    # The template itself is in chat_template.jinja beside this card.
    shown = {**training, "base_model": {k: v for k, v in base.items() if k != "chat_template"}}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [skytune, qlora, sft]",
        "---",
        f"# {name}",
        "",
        f"Fine-tuned with the skytune DVC pipeline (SFT, method {train.get('method')}, loss {train.get('loss')}), "
        "merged into a full-precision copy of the base model.",
        "",
        "## Provenance",
        f"- base model: `{base['name']}` ({base['kind']})",
        f"- base revision: `{revision}`",
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
        lines += [f"- {k}: {v}" for k, v in sorted(values.items()) if not isinstance(v, dict)]
    lines += [
        "",
        "## Serving",
        "```bash",
        "vllm serve <this directory>            # OpenAI-compatible /v1/chat/completions",
        "transformers serve --force-model <this directory>   # CPU stand-in",
        "```",
        "The chat template in `tokenizer_config.json`/`chat_template.jinja` is the one used in training; "
        "`generation_config.json` stops on the template's end-of-turn token.",
        "",
    ]
    return "\n".join(lines)
