"""Merge and export: what a serving engine loads answers like the model that trained, and adapters vLLM would
refuse are refused here first."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PipelineRun, run_stages, write_params

from skytune.core import packaging, vllm_server
from skytune.core.atomic import read_jsonl
from skytune.core.chat import tokenization
from skytune.core.models.base import BaseModel, load_tokenizer
from skytune.core.models.loading import (
    load_for_training,
    load_full_precision,
    load_saved_tokenizer,
)
from skytune.core.params import ParamsError, load_params
from skytune.stages import export, merge_adapters


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def workspace(pipeline: PipelineRun, dest: Path, edit: Any = lambda d: None) -> Path:
    """A copy of the pipeline's finished workspace, with params.yaml changed by `edit`."""
    shutil.copytree(pipeline.root, dest)
    write_params(dest, edit)
    return dest


def val_batch(root: Path, tokenizer: Any, n: int = 4) -> Any:
    paths = load_params(root / "params.yaml").paths
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in read_jsonl(root / paths.val_file)[:n]]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits(model: Any, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor, batch: Any) -> float:
    return (a - b).abs()[batch["attention_mask"].bool()].max().item()


def test_merged_logits_equal_the_trained_model_and_base_plus_adapter(pipeline: PipelineRun, tmp_path: Path) -> None:
    from peft import PeftModel

    root = pipeline.root
    paths = load_params(root / "params.yaml").paths
    base = BaseModel.load(root / paths.base_model_dir)
    base = BaseModel(**{**base.__dict__, "ref": str(root / base.ref)})
    tokenizer = load_saved_tokenizer(root / paths.adapter_dir)
    batch = val_batch(root, tokenizer)
    merged = logits(load_full_precision(root / paths.merged_dir, None, torch.float32), batch)

    # Default (onto: dequantized): the merged model computes what the 4-bit base + adapter computed in training.
    four_bit, ran = load_for_training(base, four_bit=True, quant_type="nf4", double_quant=True,
                                             dtype=torch.float32)
    assert ran == "nf4"
    trained = logits(PeftModel.from_pretrained(four_bit, root / paths.adapter_dir).eval(), batch)
    assert max_diff(trained, merged, batch) < 1e-4

    # onto: original: the merged model equals the original full-precision base + adapter.
    ws = workspace(pipeline, tmp_path / "ws", lambda d: d["merge_adapters"].update(onto="original"))
    run_stages(ws, merge_adapters)
    original = load_full_precision(root / base.ref, None, torch.float32)
    unmerged = logits(PeftModel.from_pretrained(original, root / paths.adapter_dir).eval(), batch)
    merged_original = logits(load_full_precision(ws / paths.merged_dir, None, torch.float32), batch)
    assert max_diff(unmerged, merged_original, batch) < 1e-4
    metrics = _json(ws / paths.merge_metrics)
    assert metrics["merged_onto"] == "original" and metrics["max_abs_logit_diff"] < 1e-4
    # ... which is not what trained: NF4 rounding of a random base moves the logits, and the metric says so.
    assert metrics["top1_agreement_vs_4bit"] < 1.0 and metrics["max_abs_logit_diff_vs_4bit"] > 1e-2


def test_merge_is_idempotent(pipeline: PipelineRun, tmp_path: Path) -> None:
    ws = workspace(pipeline, tmp_path / "ws")
    merged = ws / load_params(ws / "params.yaml").paths.merged_dir
    first = packaging.file_manifest(merged)
    run_stages(ws, merge_adapters)
    again = packaging.file_manifest(merged)
    assert again == first and "model.safetensors" in again
    assert packaging.file_manifest(pipeline.root / "models/merged") == first  # and equal to the pipeline's own


def test_export_reloads_offline_and_the_chat_template_round_trips(pipeline: PipelineRun) -> None:
    root = pipeline.root
    paths = load_params(root / "params.yaml").paths
    export_dir = root / paths.export_dir
    script = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
prompt = tok.apply_chat_template([{"role": "user", "content": "Who made you?"}], tokenize=False,
                                 add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
out = model.generate(**ids, max_new_tokens=40, do_sample=False)  # stops through generation_config.json
new = out[0, ids["input_ids"].shape[1]:].tolist()
print(repr(tok.decode(new, skip_special_tokens=True).strip()), len(new))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(root / paths.merged_dir)], capture_output=True, text=True,
                          env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    answer, length = done.stdout.strip().rsplit(" ", 1)
    assert answer == repr("I was created by the SkyTune team.") and int(length) < 40  # answered and stopped

    # The template that trained is the one served, from both the merged model and the adapter.
    base = BaseModel.load(root / paths.base_model_dir)
    for served in (root / paths.merged_dir, export_dir / "adapter"):
        tokenizer = load_saved_tokenizer(served)
        assert tokenizer.chat_template == base.chat_template
        assert (served / "chat_template.jinja").read_text() == base.chat_template
    trained = load_tokenizer(BaseModel(**{**base.__dict__, "ref": str(root / base.ref)}))
    served = load_saved_tokenizer(root / paths.merged_dir)
    records = read_jsonl(root / paths.val_file)[:8]
    ours = tokenization.Encoder(trained, "assistant_only").encode(records)
    theirs = [served.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in records]
    assert [e.input_ids for e in ours] == theirs
    assert served.pad_token_id == trained.pad_token_id and served.eos_token_id == trained.eos_token_id


def test_the_card_holds_the_exact_vllm_commands(pipeline: PipelineRun) -> None:
    """The card's commands, read back as a shell would, are the ones written out here by hand, and every file they
    name is in the workspace."""
    params = load_params(pipeline.root / "params.yaml")
    paths = params.paths
    card = (pipeline.root / paths.export_dir / "README.md").read_text()
    blocks, inside = [], None
    for line in card.splitlines():  # the fenced blocks, as a Markdown reader sees them
        if line.startswith("```"):
            blocks, inside = (blocks + ["\n".join(inside)], None) if inside is not None else (blocks, [])
        elif inside is not None:
            inside.append(line)
    commands = [shlex.split(b.replace("\\\n", " ")) for b in blocks if b.startswith("vllm serve")]
    assert ["vllm", "serve", paths.merged_dir] in [c[:3] for c in commands]
    adapter = f"{paths.export_dir}/adapter"
    assert ["vllm", "serve", paths.base_model_dir, "--enable-lora", "--lora-modules", f"skytune={adapter}",
            "--max-lora-rank", "16", "--chat-template", f"{adapter}/chat_template.jinja",
            "--generation-config", adapter] in commands
    for name in ("chat_template.jinja", "generation_config.json", "adapter_config.json", "adapter_model.safetensors"):
        assert (pipeline.root / adapter / name).is_file(), name
    hub = shlex.split(vllm_server.adapter_command("meta-llama/Llama-3.2-1B-Instruct", "abc123", name="x",
                                                     adapter_dir="a", max_lora_rank=32).replace("\\\n", " "))
    assert hub[:5] == ["vllm", "serve", "meta-llama/Llama-3.2-1B-Instruct", "--revision", "abc123"]


def _save_adapter(pipeline: PipelineRun, ws: Path, **lora: Any) -> Path:
    """Replace the workspace's adapter by an untrained PEFT adapter of the given LoRA config."""
    from peft import LoraConfig, get_peft_model

    paths = load_params(ws / "params.yaml").paths
    base = load_full_precision(pipeline.root / paths.base_model_dir, None, torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], **lora))
    adapter = ws / paths.adapter_dir
    for item in adapter.glob("adapter_*"):
        item.unlink()
    model.save_pretrained(adapter)
    return adapter


def test_adapter_export_refuses_modules_to_save(pipeline: PipelineRun, tmp_path: Path) -> None:
    ws = workspace(pipeline, tmp_path / "ws")
    adapter = _save_adapter(pipeline, ws, r=8, modules_to_save=["lm_head"])
    export_dir = ws / load_params(ws / "params.yaml").paths.export_dir
    before = packaging.file_manifest(export_dir)
    with pytest.raises(packaging.AdapterError) as err:
        run_stages(ws, export)
    message = str(err.value)
    assert f"{adapter.relative_to(ws)}/adapter_config.json: vLLM would refuse this adapter" in message
    assert "modules_to_save = ['lm_head']" in message and "vllm#9280" in message
    assert "1 tensor(s) that are not LoRA A/B matrices (base_model.model.lm_head.weight)" in message
    assert packaging.file_manifest(export_dir) == before  # nothing half-written


def test_adapter_export_flags_a_rank_above_max_lora_rank(pipeline: PipelineRun, tmp_path: Path) -> None:
    ws = workspace(pipeline, tmp_path / "ws")
    _save_adapter(pipeline, ws, r=32)
    with pytest.raises(packaging.AdapterError, match=r"rank 32 \(r\) is above export.max_lora_rank = 16"):
        run_stages(ws, export)
    # Served with a higher --max-lora-rank it is fine, and the command says so.
    write_params(ws, lambda d: d["export"].update(max_lora_rank=32))
    run_stages(ws, export)
    paths = load_params(ws / "params.yaml").paths
    assert "--max-lora-rank 32" in (ws / paths.export_dir / "README.md").read_text()
    assert _json(ws / paths.export_metrics)["adapter_rank"] == 32


def test_a_rank_vllm_cannot_serve_is_a_params_error(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"params.yaml:\d+ export: max_lora_rank: 12 is not a rank vLLM serves"):
        load_params(write_params(tmp_path, lambda d: d["export"].update(max_lora_rank=12)))


def test_vllm_adapter_rules() -> None:
    lora = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    ok = {"peft_type": "LORA", "r": 8, "bias": "none", "modules_to_save": None, "use_dora": False}

    def problems(config: dict, names: list[str] = lora, size: int = 100) -> list[str]:
        return packaging.vllm_adapter_problems(config, names, max_lora_rank=16, base_vocab_size=100,
                                               tokenizer_size=size)

    assert problems(ok) == []
    assert any("DoRA" in p for p in problems({**ok, "use_dora": True}))
    assert any("biases" in p for p in problems({**ok, "bias": "lora_only"}))
    assert any("rank_pattern[q_proj]" in p for p in problems({**ok, "rank_pattern": {"q_proj": 64}}))
    assert any("per-module ranks" in p for p in problems({**ok, "alpha_pattern": {"q_proj": 4}}))
    assert any("init_lora_weights = 'pissa'" in p for p in problems({**ok, "init_lora_weights": "pissa"}))
    assert problems(ok, [*lora, "base_model.model.model.embed_tokens.lora_embedding_A"]) == []
    assert any("not LoRA A/B" in p for p in problems(ok, [*lora, "base_model.model.model.embed_tokens.weight"]))
    assert any("model.pad_token add" in p for p in problems(ok, size=101))
    rows = ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    [trained_rows] = problems({**ok, "trainable_token_indices": {"embed_tokens": [100, 101]}}, [*lora, *rows])
    assert "trainable_token_indices: the rows of 2 token(s)" in trained_rows
    assert len(problems({**ok, "r": 32, "use_dora": True, "modules_to_save": ["embed_tokens"]})) == 3


def test_gguf_without_a_converter_is_skipped_and_reported(pipeline: PipelineRun, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    ws = workspace(pipeline, tmp_path / "ws", lambda d: d["export"].update(formats=["merged", "gguf"]))
    run_stages(ws, export)
    paths = load_params(ws / "params.yaml").paths
    metrics = _json(ws / paths.export_metrics)
    assert metrics["formats"] == ["merged"] and "convert_hf_to_gguf.py not found" in metrics["skipped"]["gguf"]
    assert "skipped.gguf: llama.cpp's convert_hf_to_gguf.py not found" in (ws / paths.export_dir / "README.md").read_text()
    assert not (ws / paths.export_dir / "adapter").exists() and not (ws / paths.export_dir / "gguf").exists()


# llama.cpp's converter environment (`make gguf-tools`, a prerequisite of `make test`, which exports these two).
GGUF_PYTHON, GGUF_SRC = os.environ.get("LLAMA_CPP_PYTHON", ""), os.environ.get("LLAMA_CPP_DIR", "")
SENTENCEPIECE_LLAMA = """
import sys
from pathlib import Path
import sentencepiece, torch
from transformers import LlamaConfig, LlamaForCausalLM
out = Path(sys.argv[1]); out.mkdir()
(out / "corpus.txt").write_text("\\n".join(f"what is {i} plus {i + 1}? it is {2 * i + 1}." for i in range(300)))
sentencepiece.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"),
    vocab_size=300, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    minloglevel=2)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(out)
"""


@pytest.mark.skipif(not (GGUF_PYTHON and Path(GGUF_PYTHON).is_file() and Path(GGUF_SRC).is_dir()),
                    reason="llama.cpp's converter is not built: run through `make test` (or `make gguf-tools`)")
def test_gguf_export_converts_and_reads_back(pipeline: PipelineRun, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    # A Llama with a SentencePiece tokenizer, the kind llama.cpp's converter knows without a hub download.
    model_dir = tmp_path / "spm-llama"
    subprocess.run([GGUF_PYTHON, "-c", SENTENCEPIECE_LLAMA, str(model_dir)], check=True)
    target = tmp_path / "gguf" / "model-f16.gguf"
    assert export._export_gguf(str(model_dir), "f16", target) is None
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    theirs = logits(AutoModelForCausalLM.from_pretrained(target.parent, gguf_file=target.name, dtype=torch.float32),
                    {"input_ids": ids})
    ours = logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), {"input_ids": ids})
    assert (theirs - ours).abs().max().item() < 1e-2  # f16 weights
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()

    # The built-in model's byte-level BPE tokenizer is one llama.cpp does not know: skipped, with its reason.
    ws = workspace(pipeline, tmp_path / "ws", lambda d: d["export"].update(formats=["merged", "gguf"]))
    run_stages(ws, export)
    paths = load_params(ws / "params.yaml").paths
    skipped = _json(ws / paths.export_metrics)["skipped"]["gguf"]
    assert "convert_hf_to_gguf.py failed" in skipped and "pre-tokenizer was not recognized" in skipped
