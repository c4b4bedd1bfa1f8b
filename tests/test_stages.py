"""Every stage's `main`, run once on CPU on the embedded default (the `pipeline` fixture), judged by its outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from conftest import PipelineRun

from skytune import packaging
from skytune.atomic import read_jsonl
from skytune.chat_format import validate
from skytune.params import load_params


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _paths(run: PipelineRun):
    paths = load_params(run.root / "params.yaml").paths
    return lambda key: run.root / getattr(paths, key)


def test_ingest_builds_the_base_model_and_keeps_provenance(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    manifest = _json(p("base_model_dir") / "base_model.json")
    assert manifest["kind"] == "builtin" and manifest["revision"] is None
    assert (p("base_model_dir") / "model.safetensors").is_file()
    rows = read_jsonl(p("ingested_dir") / "alpaca_tasks.jsonl")
    raw_lines = (pipeline.root / "data/raw/alpaca_tasks.jsonl").read_text().splitlines()
    assert len(rows) == len(raw_lines)
    assert all(json.loads(raw_lines[r["line"] - 1]) == r["row"] for r in rows)
    identity_rows = read_jsonl(p("ingested_dir") / "identity.jsonl")
    assert len(identity_rows) == load_params(pipeline.root / "params.yaml").identity.num_samples


def test_to_chat_writes_valid_canonical_records(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    metrics = _json(p("to_chat_metrics"))
    assert metrics["rejected_total"] == 0
    assert metrics["records"] == {"alpaca_tasks": 250, "identity": 120, "sharegpt_math": 150}
    for name in metrics["records"]:
        for record in read_jsonl(p("chat_dir") / f"{name}.jsonl"):
            assert record["source"] == name
            validate(record["messages"])
    multi = [r for r in read_jsonl(p("chat_dir") / "sharegpt_math.jsonl") if len(r["messages"]) > 3]
    assert multi and any(r["messages"][0]["role"] == "system" for r in multi)


def test_split_is_disjoint_and_keeps_identity_in_train(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    train = {r["id"] for f in sorted((p("split_dir") / "train").glob("*.jsonl")) for r in read_jsonl(f)}
    val = {r["id"] for f in sorted((p("split_dir") / "val").glob("*.jsonl")) for r in read_jsonl(f)}
    assert train and val and not train & val
    assert read_jsonl(p("split_dir") / "val" / "identity.jsonl") == []


def test_merge_data_holds_every_split_record_once(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    train = read_jsonl(p("train_file"))
    split_train = [r for f in sorted((p("split_dir") / "train").glob("*.jsonl")) for r in read_jsonl(f)]
    assert sorted(r["id"] for r in train) == sorted(r["id"] for r in split_train)
    assert [r["source"] for r in train[:20]] != sorted(r["source"] for r in train[:20])  # mixed, not concatenated
    assert _json(p("data_metrics"))["train"]["rows"] == len(train)


def test_train_runs_real_4bit_qlora_and_lowers_val_loss(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    metrics = _json(p("train_metrics"))
    assert metrics["quantization"] == "nf4"
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 1.0
    gate = metrics["gate"]["train"]
    assert 0 < gate["trained_tokens"] < gate["tokens"] == metrics["tokens_per_epoch"]  # assistant-only loss
    assert metrics["batching"] == "padding_free" and metrics["world_size"] == 1
    adapter = p("adapter_dir")
    config = _json(adapter / "adapter_config.json")
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert _json(adapter / packaging.TRAINING_PARAMS)["quantization"] == "nf4"
    live = _json(p("dvclive_dir") / "metrics.json")
    assert "eval" in live and "loss" in live["eval"]
    assert "perplexity" in live["eval"]
    for name in ("train/loss", "eval/loss", "eval/perplexity"):
        steps = [int(line.split("\t")[0]) for line in
                 (p("dvclive_dir") / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]]
        assert steps == sorted(set(steps)) and steps[-1] == metrics["steps"], name  # each step once, to the end
    samples = p("train_samples").read_text()
    assert samples.count("## ") == 8 and "<|im_end|>⟧" in samples  # trained spans marked, end of turn inside


def test_merge_adapters_matches_base_plus_adapter(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    assert _json(p("merge_metrics"))["max_abs_logit_diff"] < 1e-3
    generation = _json(p("merged_dir") / "generation_config.json")
    tokenizer_config = _json(p("merged_dir") / "tokenizer_config.json")
    eos = generation["eos_token_id"]
    assert isinstance(eos, list) and generation["pad_token_id"] not in eos
    assert tokenizer_config["pad_token"] != tokenizer_config["eos_token"]


def test_sanity_check_fine_tuned_knows_its_identity_and_stops(pipeline: PipelineRun) -> None:
    p = _paths(pipeline)
    metrics = _json(p("sanity_metrics"))
    assert metrics["identity_exact_match_tuned"] == 1.0
    assert metrics["identity_exact_match_base"] == 0.0
    assert metrics["ends_with_eot_tuned"] == 1.0
    with open(p("sanity_results"), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    identity_rows = [r for r in rows if r["kind"] == "identity"]
    assert identity_rows and all(r["tuned_answer"] == r["expected"] for r in identity_rows)
    assert all(r["base_answer"] != r["expected"] for r in identity_rows)


def test_export_is_self_contained_and_loads_offline(pipeline: PipelineRun) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _paths(pipeline)
    export = p("export_dir")
    names = {f.name for f in export.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "manifest.json"} <= names
    manifest = _json(export / "manifest.json")
    assert set(manifest) == names - {"manifest.json"}
    assert all(packaging.sha256_file(export / n) == m["sha256"] for n, m in manifest.items())
    card = (export / "README.md").read_text()
    assert "builtin:tiny-llama" in card and packaging.data_hash([p("train_file"), p("val_file")]) in card
    assert '"lora_r": 8' in card and "identity_exact_match_tuned: 1.0" in card

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who made you?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)  # stops via generation_config
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "I was created by the SkyTune team."
