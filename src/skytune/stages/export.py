"""export: what serving engines load, in the formats `export.formats` names, with a model card and a manifest.

    python -m skytune.stages.export      (normally: dvc repro export)

Writes `paths.export_dir`:
- for `merged`: nothing is copied. The merged model is `paths.merged_dir` (safetensors, tokenizer, chat template,
  generation config stopping on the end-of-turn token), which `vllm serve`, TGI and `AutoModelForCausalLM` load as
  it is; the card's serving commands point there and the manifest holds the sha256 of each of its files. It is not
  cached by DVC (an experiment keeps its adapter, ~1000x smaller): `dvc repro` rebuilds it, byte-identical, from the
  base and the adapter (`make merged`), so the workspace holds one copy of it and an experiment stays small;
- `adapter/`: the LoRA adapter alone, checked against vLLM's rules first (LoRA tensors only, no
  `modules_to_save`, no DoRA, rank at most `export.max_lora_rank`): a failing check stops the stage and names
  every problem; the tokenizer, chat template and generation config go with it. Skipped, with the reason
  reported, when the model has tokens the base lacks (ChatML added to a base, `model.pad_token: add`): their
  trained rows are no LoRA tensor vLLM loads, and the merged model serves them;
- `gguf/`: llama.cpp's `convert_hf_to_gguf.py` run on the merged model (with $LLAMA_CPP_PYTHON), where the
  converter is found ($LLAMA_CPP_DIR or PATH; `make gguf-tools` builds both); when it is not found, or refuses
  the model (it knows only the tokenizers of known model families), the format is skipped and the reason is
  reported in the metrics and the card;
- `README.md`: the model card (base + revision, training-data hash, params, metrics, the exact serving commands);
- `manifest.json`: sha256 and size of every file, the merged model's under `merged/`.
And `paths.export_metrics`: the formats written and skipped, and, where `export.parity` asks for it (on a GPU node by
default), train/serve parity: vLLM's greedy answers on `merged/` compared with transformers' on the sanity prompts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from skytune.core import packaging, vllm_server
from skytune.core.atomic import atomic_dir, read_jsonl, write_json
from skytune.core.chat import chat_template
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import generation, scoring
from skytune.core.models.base import BaseModel, adapter_base, location
from skytune.core.models.devices import compute_dtype
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer
from skytune.core.params import Params
from skytune.core.training import new_tokens
from skytune.core.vllm_server import Vllm
from skytune.stages import run_stage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SERVING_FILES = ("tokenizer.json", "tokenizer_config.json", packaging.CHAT_TEMPLATE, "special_tokens_map.json",
                 "generation_config.json")
GGUF_CONVERTER = "convert_hf_to_gguf.py"


def _json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def gguf_converter() -> Path | None:
    """llama.cpp's HF-to-GGUF converter: $LLAMA_CPP_DIR/convert_hf_to_gguf.py, else one on PATH."""
    home = os.environ.get("LLAMA_CPP_DIR")
    if home and (Path(home) / GGUF_CONVERTER).is_file():
        return Path(home) / GGUF_CONVERTER
    found = shutil.which(GGUF_CONVERTER)
    return Path(found) if found else None


def _export_adapter(params: Params, base: BaseModel, out: Path) -> dict[str, Any]:
    """Copy the adapter after checking it against vLLM's rules; raise AdapterError naming every problem."""
    from safetensors import safe_open
    from transformers import AutoConfig

    adapter_dir = packaging.tuned_adapter(params.paths.adapter_dir, params.paths.preference_adapter_dir)
    merged_dir = Path(params.paths.merged_dir)
    config_file = adapter_dir / packaging.ADAPTER_CONFIG
    if not config_file.is_file():
        raise packaging.AdapterError(
            f"export.formats names 'adapter' but {adapter_dir} holds no LoRA adapter (a train.method: full run "
            "saves the whole model): export 'merged' instead")
    config = _json(config_file)
    with safe_open(adapter_dir / packaging.ADAPTER_WEIGHTS, framework="pt") as fh:
        names = list(fh.keys())
    tokenizer = load_saved_tokenizer(adapter_dir)
    vocab = AutoConfig.from_pretrained(location(base), revision=base.revision).get_text_config().vocab_size
    problems = packaging.vllm_adapter_problems(config, names, max_lora_rank=params.export.max_lora_rank,
                                               base_vocab_size=vocab, tokenizer_size=len(tokenizer))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise packaging.AdapterError(f"{config_file}: vLLM would refuse this adapter (export.formats: adapter):\n"
                                     f"{lines}")
    out.mkdir()
    # The base as a user can get it (the hub id and commit, or the GGUF as params.yaml names it), not the local
    # path training saw; the module list in a stable order.
    config["base_model_name_or_path"] = adapter_base(base)
    config["revision"] = base.revision
    write_json(out / packaging.ADAPTER_CONFIG, packaging.stable_adapter_config(config))
    base.save(out)  # the base's manifest beside it: what make serve SERVE=adapter resolves a GGUF base by
    shutil.copy2(adapter_dir / packaging.ADAPTER_WEIGHTS, out / packaging.ADAPTER_WEIGHTS)
    for name in (*SERVING_FILES, packaging.TRAINING_PARAMS):
        source = merged_dir / name if name == "generation_config.json" else adapter_dir / name
        if source.is_file():
            shutil.copy2(source, out / name)
    return {"adapter_rank": config["r"], "adapter_tensors": len(names)}


def _added_tokens(params: Params, base: BaseModel) -> list[str]:
    """The tokens a trained LoRA adapter has beyond the base's vocabulary (`training.new_tokens`); none for a whole
    model (`train.method: full`, which `_export_adapter` refuses by name)."""
    adapter = packaging.tuned_adapter(params.paths.adapter_dir, params.paths.preference_adapter_dir)
    if not (adapter / packaging.ADAPTER_CONFIG).is_file():
        return []
    tokenizer = load_saved_tokenizer(adapter)
    return tokenizer.convert_ids_to_tokens(new_tokens.new_token_ids(base, tokenizer))


def _export_gguf(merged_dir: str, outtype: str, target: Path) -> str | None:
    """Convert the merged model to GGUF at `target`; the reason it was skipped, or None when written."""
    converter = gguf_converter()
    if converter is None:
        return (f"llama.cpp's {GGUF_CONVERTER} not found: set LLAMA_CPP_DIR to a llama.cpp checkout or put it on "
                "PATH")
    target.parent.mkdir()
    python = os.environ.get("LLAMA_CPP_PYTHON") or sys.executable  # the converter's own environment (make gguf-tools)
    command = [python, str(converter), merged_dir, "--outfile", str(target), "--outtype", outtype]
    log.info("$ %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(target.parent)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("%s failed (exit %d):\n%s", converter, done.returncode, done.stderr[-4000:])
        return f"{converter} failed (exit {done.returncode}): {last}"
    return None


def _parity(params: Params) -> dict[str, Any]:
    """Train/serve parity: vLLM's greedy answers on the exported merged model vs transformers' (one by one: no
    padding on the reference side) on the sanity prompts, the same token ids in. `export.parity` auto measures it
    where vLLM is the engine auto picks (a GPU node), true wherever vLLM's environment is."""
    vllm = Vllm.from_params(params.vllm, params.paths.vllm_env)
    dtype = compute_dtype(params.train.compute_dtype)
    max_new_tokens, seed = params.sanity_check.max_new_tokens, params.base.seed
    if params.export.parity is False:
        return {"serve_parity": "off (export.parity: false)"}
    if params.export.parity == "auto" and generation.resolve_engine("auto", vllm, "export.parity") != "vllm":
        return {"serve_parity": "not measured: export.parity auto measures it where vLLM is the engine auto picks "
                                "(a GPU and vLLM's environment); set it to true to measure it here"}
    ok, why = vllm.available()
    if not ok:
        raise SkytuneError(f"export.parity is true but {why}. Set it to auto or false.")
    merged = Path(params.paths.merged_dir)
    tokenizer = load_saved_tokenizer(merged)
    stops = chat_template.stop_tokens(tokenizer)
    prompts = [chat_template.render_prompt(tokenizer, r.get("messages") or [{"role": "user", "content": r["prompt"]}])
               for r in read_jsonl(params.paths.sanity_prompts)]
    model = load_full_precision(merged, None, dtype)
    hf = generation.generate_greedy(model, tokenizer, prompts, stop_tokens=stops, max_new_tokens=max_new_tokens,
                                    batch_size=1)
    del model
    generation.release_memory()
    served = generation.generate_greedy_vllm(vllm, merged, None, tokenizer, prompts, stop_tokens=stops,
                                             max_new_tokens=max_new_tokens, dtype=dtype, seed=seed)
    agree = scoring.agreement(hf, served)
    log.info("train/serve parity (vLLM vs transformers, %d prompts): %s", len(prompts), agree)
    return {"serve_parity": "vllm vs transformers", "serve_parity_prompts": len(prompts),
            **{f"serve_parity_{k}": v for k, v in agree.items()}}


def main(params: Params) -> None:
    paths, ex = params.paths, params.export
    base = BaseModel.load(paths.base_model_dir)
    training = _json(packaging.tuned_adapter(paths.adapter_dir, paths.preference_adapter_dir) / packaging.TRAINING_PARAMS)
    metrics: dict[str, Any] = {"formats": [], "skipped": {}}
    export_dir = Path(paths.export_dir)
    with atomic_dir(export_dir) as out:
        serving = _export_formats(params, base, out, metrics)
        metrics["formats"] = [f for f in ex.formats if f not in metrics["skipped"]]
        metrics.update(_parity(params) if "merged" in ex.formats else {"serve_parity": "not measured: no merged"})
        card = packaging.model_card(
            name=export_dir.name,
            base=training["base_model"],
            data_sha256=packaging.data_hash(_trained_on(paths, training)),
            training=training,
            metrics={"train": _json(paths.train_metrics),
                     **({"preference": _json(paths.preference_metrics)} if "preference" in training else {}),
                     "merge_adapters": _json(paths.merge_metrics), "sanity_check": _json(paths.sanity_metrics),
                     "export": metrics},
            serving=serving,
        )
        (out / "README.md").write_text(card, encoding="utf-8")
        manifest = packaging.file_manifest(out)
        if "merged" in ex.formats:
            manifest |= {f"merged/{k}": v for k, v in packaging.file_manifest(Path(paths.merged_dir)).items()}
        write_json(out / MANIFEST, dict(sorted(manifest.items())))
    write_json(paths.export_metrics, metrics)
    log.info("exported %s to %s; skipped: %s", ", ".join(metrics["formats"]), export_dir, metrics["skipped"] or "none")


def _trained_on(paths: Any, training: dict[str, Any]) -> list[Path]:
    """The data files that trained the exported model: SFT's (unless `train.method: none`), then the preference
    pairs where the preference stage trained it."""
    sft = [] if training["train"]["method"] == "none" else [Path(paths.train_file), Path(paths.val_file)]
    return sft + (packaging.preference_files(paths.preference_dir) if "preference" in training else [])


def _export_formats(params: Params, base: BaseModel, out: Path, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Write each of export.formats into `out` (the merged model is pointed at, not copied); return how to serve
    each, as (what, exact command). Skipped formats go to metrics["skipped"] with the reason."""
    paths, ex = params.paths, params.export
    export_dir = Path(paths.export_dir)
    gguf_file = f"gguf/model-{ex.gguf_outtype}.gguf"
    serving: list[tuple[str, str]] = []
    if "merged" in ex.formats:
        merged = paths.merged_dir
        # Merged on a CPU, the weights are fp32; vLLM's "auto" would serve them as fp16, which overflows on models
        # trained in bf16.
        dtype = " --dtype bfloat16" if _json(Path(merged) / "config.json").get("dtype") == "float32" else ""
        serving += [
            ("vLLM (OpenAI-compatible /v1/chat/completions)", f"vllm serve {merged}{dtype}"),
            ("Text Generation Inference", f"text-generation-launcher --model-id {merged}"),
            ("transformers serve (no vLLM needed)", f"transformers serve {merged}"),
        ]
    added = _added_tokens(params, base) if "adapter" in ex.formats else []
    if added:
        metrics["skipped"]["adapter"] = (
            f"the adapter trains the rows of {len(added)} token(s) the base lacks ({', '.join(added)}) beside LoRA: "
            "vLLM loads LoRA matrices alone and refuses any other tensor, and the base it would load has no such "
            "tokens. Serve the merged model")
        log.warning("adapter skipped: %s", metrics["skipped"]["adapter"])
    elif "adapter" in ex.formats:
        metrics.update(_export_adapter(params, base, out / packaging.EXPORTED_ADAPTER))
        serving.append((f"vLLM, the base model with this LoRA adapter (clients ask for model \"{ex.adapter_name}\")",
                        vllm_server.adapter_command(base.name if base.kind == "hub" else location(base),
                                                    base.revision, name=ex.adapter_name,
                                                    adapter_dir=f"{export_dir}/{packaging.EXPORTED_ADAPTER}",
                                                    max_lora_rank=ex.max_lora_rank)))
    if "gguf" in ex.formats:
        skipped = _export_gguf(paths.merged_dir, ex.gguf_outtype, out / gguf_file)
        if skipped:
            log.warning("gguf skipped: %s", skipped)
            metrics["skipped"]["gguf"] = skipped
        else:
            serving.append(("llama.cpp", f"llama-server -m {export_dir}/{gguf_file} --jinja"))
    return serving


if __name__ == "__main__":
    run_stage(main)
