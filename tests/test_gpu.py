"""Real 4-bit QLoRA on a GPU: a randomly initialised model of Llama-3.2-1B's shape, trained by the train stage as DVC
runs it. Skipped without CUDA. Prints tokens/s, peak memory and MFU (also in metrics/train.json).

    .venv/bin/python -m pytest -m gpu -s tests/test_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PipelineRun
from test_resume import workspace

from skytune.core.models.base import describe_base
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer


def record(**figures: object) -> None:
    """Add figures to $SKYTUNE_GPU_FIGURES (bench/gpu_check.sh collects them there), when it is set."""
    path = os.environ.get("SKYTUNE_GPU_FIGURES")
    if path:
        saved = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        Path(path).write_text(json.dumps({**saved, **figures}, indent=1))


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def llama_1b_shape(tokenizer_dir: Path, out: Path) -> Path:
    """Llama-3.2-1B's architecture (16 layers, hidden 2048, GQA 32/8, MLP 8192) with the built-in tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_real_qlora_on_a_1b_shaped_llama(pipeline: PipelineRun, tmp_path: Path) -> None:
    import yaml

    root = workspace(pipeline, tmp_path / "gpu")
    model_dir = llama_1b_shape(root / "models/base", tmp_path / "llama-1b-shape")
    shutil.rmtree(root / "models/base")
    base = describe_base("local", "llama-1b-shape", str(model_dir), None, template="keep", pad_token="auto")
    (root / "models/base").mkdir()
    base.save(root / "models/base")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(method="qlora", epochs=2, batch_size=8, total_batch_size=8, learning_rate=2e-4,
                           gradient_checkpointing=True, save_steps=50, eval_steps=50)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "skytune.core.processes", "skytune.stages.train"], cwd=root,
                            env={**os.environ, "SKYTUNE_NPROC_PER_NODE": "1"}, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((root / "metrics/train.json").read_text())
    print(f"\nGPU {torch.cuda.get_device_name()}: {metrics['tokens_per_second']:.0f} tokens/s, "
          f"peak memory {metrics['peak_memory_gb']} GiB, MFU {metrics.get('mfu')}, "
          f"val loss {metrics['val_loss_before']} -> {metrics['val_loss_after']}")
    from safetensors import safe_open

    from skytune.core.training.mfu import PEAK_BF16_FLOPS

    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        n = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    mfu_4n = round(metrics["tokens_per_second"] * 4 * n / peak, 4) if peak else None  # MFU(4N), 6N's LoRA form
    print(f"parameters {n / 1e9:.2f} B, MFU(4N) {mfu_4n}")
    record(gpu=torch.cuda.get_device_name(), parameters=n, mfu_4n=mfu_4n, qlora_1b={k: metrics.get(k) for k in (
        "tokens_per_second", "peak_memory_gb", "mfu", "steps", "train_seconds", "val_loss_before", "val_loss_after",
        "quantization", "compute_dtype")})
    assert metrics["quantization"] == "nf4" and metrics["device"] == "cuda"
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["peak_memory_gb"] < 8  # a 1.2B model in 4 bits with LoRA and checkpointing


def test_vllm_answers_like_transformers_on_the_merged_model(pipeline: PipelineRun) -> None:
    """Train/serve parity where vLLM runs: the same token ids in, greedy answers compared (what export records)."""
    pytest.importorskip("vllm")
    from skytune.core.atomic import read_jsonl
    from skytune.core.chat import chat_template
    from skytune.core.evaluation import generation, scoring
    from skytune.core.params import load_params

    paths = load_params(pipeline.root / "params.yaml").paths
    merged = pipeline.root / paths.merged_dir
    tokenizer = load_saved_tokenizer(merged)
    stops = chat_template.stop_tokens(tokenizer)
    prompts = [chat_template.render_prompt(tokenizer, r["messages"]) for r in read_jsonl(pipeline.root / paths.val_file)]
    model = load_full_precision(merged, None, torch.float32)
    hf = generation.generate_greedy(model, tokenizer, prompts, stop_tokens=stops, max_new_tokens=32, batch_size=1)
    del model
    served = generation.generate_greedy_vllm(merged, None, tokenizer, prompts, stop_tokens=stops, max_new_tokens=32,
                                             dtype=torch.float32, seed=0)
    agree = scoring.agreement(hf, served)
    print(f"\nvLLM vs transformers on {len(prompts)} val prompts: {agree}")
    record(parity={"prompts": len(prompts), **agree})
    assert agree["stop_agreement"] >= 0.95 and agree["exact_match"] >= 0.9


def test_lm_eval_on_vllm_scores_the_tasks_as_transformers_does(pipeline: PipelineRun) -> None:
    """The evaluate stages' vLLM engine (evaluate.engine: vllm, what auto picks on a GPU node with vLLM): lm-eval's
    vLLM backend on the merged model gives the repository's tasks the scores its transformers backend gives."""
    pytest.importorskip("vllm")
    import dataclasses

    from conftest import REPO

    from skytune.core.evaluation import harness
    from skytune.core.params import load_params

    params = load_params(pipeline.root / "params.yaml")
    merged = pipeline.root / params.paths.merged_dir
    tokenizer = load_saved_tokenizer(merged)
    scores = {engine: harness.score(lambda: load_full_precision(merged, None, torch.float32), tokenizer,
                                    source=str(merged), revision=None, dtype="float32", seed=0,
                                    ev=dataclasses.replace(params.evaluate, engine=engine, limit=20),
                                    tasks_dir=REPO / params.paths.eval_tasks_dir,
                                    pin_file=REPO / params.paths.lm_eval_pin)[0]
              for engine in ("transformers", "vllm")}
    print(f"\nlm-eval, transformers vs vLLM: {scores['transformers'].tasks} vs {scores['vllm'].tasks}")
    record(lm_eval={engine: s.tasks for engine, s in scores.items()})
    for task, metrics in scores["transformers"].tasks.items():
        for metric, value in metrics.items():
            assert abs(scores["vllm"].tasks[task][metric] - value) <= 0.1, (task, metric)
