"""On a GPU (bench/gpu_check.sh runs these; skipped without CUDA): real 4-bit QLoRA on a randomly initialised model of
Llama-3.2-1B's shape, trained by the train stage as DVC runs it (tokens/s, peak memory, MFU), merged and exported;
then vLLM from its own environment (requirements-vllm.txt) on it, in bf16: the export stage's train/serve parity, the
exported adapter served with --enable-lora, and lm-eval on both engines. The same tests run on vLLM's CPU build in
tests/test_vllm_engine.py and tests/test_serving.py.

    .venv/bin/python -m pytest -m gpu -s tests/test_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PATHS, PipelineRun, free_port, run_stages
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


@dataclass(frozen=True)
class Llama1B:
    """A workspace in which the train stage ran real 4-bit QLoRA (bf16 compute) on a 1B-shaped Llama, then
    merge_adapters, sanity_check on `engine: auto` (vLLM's, on a GPU: the stage's own default path) and export (with
    export.parity: true, so vLLM's parity on CUDA is measured by the stage itself)."""

    root: Path
    base_dir: Path
    parameters: int


@pytest.fixture(scope="module")
def llama_1b(pipeline: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Llama1B:
    import yaml
    from safetensors import safe_open

    from skytune.stages import export, merge_adapters, sanity_check

    tmp = tmp_path_factory.mktemp("gpu")
    root = workspace(pipeline, tmp / "ws")
    model_dir = llama_1b_shape(root / "models/base", tmp / "llama-1b-shape")
    shutil.rmtree(root / "models/base")
    base = describe_base("local", "llama-1b-shape", str(model_dir), None, template="keep", pad_token="auto")
    (root / "models/base").mkdir()
    base.save(root / "models/base")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(method="qlora", epochs=2, batch_size=8, total_batch_size=8, learning_rate=2e-4,
                           gradient_checkpointing=True, save_steps=50, eval_steps=50)
    params["export"].update(parity=True)
    params["sanity_check"].update(engine="auto", perplexity_records=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "skytune.core.processes", "skytune.stages.train"], cwd=root,
                            env={**os.environ, "SKYTUNE_NPROC_PER_NODE": "1"}, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("sanity_prompts", "retained_prompts"):
        (root / getattr(PATHS, name)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pipeline.root / getattr(PATHS, name), root / getattr(PATHS, name))
    run_stages(root, merge_adapters, sanity_check, export)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        n = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return Llama1B(root, model_dir, n)


def test_real_qlora_on_a_1b_shaped_llama(llama_1b: Llama1B) -> None:
    from skytune.core.training.mfu import PEAK_BF16_FLOPS

    metrics = json.loads((llama_1b.root / PATHS.train_metrics).read_text())
    print(f"\nGPU {torch.cuda.get_device_name()}: {metrics['tokens_per_second']:.0f} tokens/s, "
          f"peak memory {metrics['peak_memory_gb']} GiB, MFU {metrics.get('mfu')}, "
          f"val loss {metrics['val_loss_before']} -> {metrics['val_loss_after']}")
    n = llama_1b.parameters
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    mfu_4n = round(metrics["tokens_per_second"] * 4 * n / peak, 4) if peak else None  # MFU(4N), 6N's LoRA form
    print(f"parameters {n / 1e9:.2f} B, MFU(4N) {mfu_4n}")
    record(gpu=torch.cuda.get_device_name(), parameters=n, mfu_4n=mfu_4n, qlora_1b={k: metrics.get(k) for k in (
        "tokens_per_second", "peak_memory_gb", "mfu", "steps", "train_seconds", "val_loss_before", "val_loss_after",
        "quantization", "compute_dtype")})
    assert metrics["quantization"] == "nf4" and metrics["device"] == "cuda"
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["peak_memory_gb"] < 8  # a 1.2B model in 4 bits with LoRA and checkpointing


def test_vllm_answers_like_transformers_on_the_merged_model(llama_1b: Llama1B) -> None:
    """Train/serve parity where auto picks vLLM, in bf16: the export stage's own metric (vLLM's server from
    requirements-vllm.txt vs transformers one by one, the same token ids in)."""
    metrics = json.loads((llama_1b.root / PATHS.export_metrics).read_text())
    print(f"\nvLLM vs transformers (bf16, {metrics.get('serve_parity_prompts')} prompts): "
          f"exact {metrics.get('serve_parity_exact_match')}, stops {metrics.get('serve_parity_stop_agreement')}")
    record(parity={k: v for k, v in metrics.items() if k.startswith("serve_parity")})
    assert metrics["serve_parity"] == "vllm vs transformers"
    # bf16 on two engines' kernels: a near-tie can flip a token; the answers the model learned must not.
    assert metrics["serve_parity_stop_agreement"] >= 0.8 and metrics["serve_parity_exact_match"] >= 0.5, metrics


def test_the_sanity_check_runs_on_vllm_on_a_gpu(llama_1b: Llama1B) -> None:
    """engine: auto on a GPU node is vLLM: the stage loads the model for perplexity, lets it go, then starts vLLM."""
    metrics = json.loads((llama_1b.root / PATHS.sanity_metrics).read_text())
    record(sanity_check={k: metrics.get(k) for k in ("engine", "identity_exact_match_tuned", "ends_with_eot_tuned",
                                                    "val_perplexity_tuned", "val_perplexity_base")})
    assert metrics["engine"] == "vllm" and metrics["val_perplexity_tuned"] < metrics["val_perplexity_base"], metrics


def test_the_exported_adapter_serves_on_vllm_and_answers_as_peft_does(llama_1b: Llama1B) -> None:
    """`make serve SERVE=adapter` on a GPU (CUDA graphs, bf16: what a SkyServe replica runs) serves the exported
    adapter on its base by export.adapter_name, and answers as the same adapter on the same base does in
    transformers (PEFT), bf16 both."""
    from peft import PeftModel
    from test_serving import make_serve, wait_until_up

    from skytune.core import packaging, vllm_server
    from skytune.core.chat import chat_template
    from skytune.core.data import identity
    from skytune.core.evaluation import generation, scoring
    from skytune.core.params import load_params

    params = load_params(llama_1b.root / "params.yaml")
    adapter = llama_1b.root / PATHS.export_dir / packaging.EXPORTED_ADAPTER
    tokenizer = load_saved_tokenizer(adapter)
    stops = chat_template.stop_tokens(tokenizer)
    prompts = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": q}])
               for q in identity.PROBES.values()]
    peft = PeftModel.from_pretrained(load_full_precision(llama_1b.base_dir, None, torch.bfloat16), str(adapter))
    reference = generation.generate_greedy(peft, tokenizer, prompts, stop_tokens=stops, max_new_tokens=32,
                                           batch_size=1)
    del peft
    generation.release_memory()
    port = free_port()
    server = make_serve(port, "SERVE=adapter", f"SERVE_MODEL={adapter}")
    try:
        wait_until_up({"adapter": (server, port)})
        served = generation.generate_greedy_served(vllm_server.Server(f"http://127.0.0.1:{port}", "base"),
                                                   tokenizer, prompts, stop_tokens=stops, max_new_tokens=32, seed=0,
                                                   model=params.export.adapter_name)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    agree = scoring.agreement(reference, served)
    print(f"\nthe adapter on vLLM vs on transformers (PEFT), bf16, {len(prompts)} identity probes: {agree}")
    record(adapter_vs_peft={"prompts": len(prompts), **agree})
    # bf16 on two engines' kernels: a near-tie may flip a token of a random-init model, not what training taught.
    assert agree["stop_agreement"] == 1.0 and agree["exact_match"] >= 0.5, agree


def test_lm_eval_on_vllm_scores_the_tasks_as_transformers_does(llama_1b: Llama1B) -> None:
    """The evaluate stages' vLLM engine (what auto picks on a GPU node): lm-eval against vLLM's server on the
    merged model gives the repository's tasks the scores its transformers backend gives."""
    import dataclasses

    from conftest import REPO

    from skytune.core import vllm_server
    from skytune.core.evaluation import harness
    from skytune.core.params import load_params

    params = load_params(llama_1b.root / "params.yaml")
    merged = llama_1b.root / params.paths.merged_dir
    tokenizer = load_saved_tokenizer(merged)
    vllm = vllm_server.Vllm.from_params(params.vllm, params.paths.vllm_env)
    scores = {engine: harness.score(lambda: load_full_precision(merged, None, torch.bfloat16), tokenizer,
                                    source=str(merged), revision=None, dtype="bfloat16", seed=0, vllm=vllm,
                                    ev=dataclasses.replace(params.evaluate, engine=engine, limit=20),
                                    tasks_dir=REPO / params.paths.eval_tasks_dir,
                                    pin_file=REPO / params.paths.lm_eval_pin)[0]
              for engine in ("transformers", "vllm")}
    print(f"\nlm-eval, transformers vs vLLM: {scores['transformers'].tasks} vs {scores['vllm'].tasks}")
    record(lm_eval={engine: s.tasks for engine, s in scores.items()})
    for task, metrics in scores["transformers"].tasks.items():
        for metric, value in metrics.items():  # as on the CPU: within the score's standard error
            assert abs(scores["vllm"].tasks[task][metric] - value) <= scores["vllm"].stderr[task][metric], (task,
                                                                                                            metric)
