"""ChatML on a base whose vocabulary lacks ChatML's tokens: the real Llama 2 / Mistral SentencePiece vocabulary
(tests/real_vocabs.py, `<s>`, `</s>`, `<unk>` and nothing else special) under a tiny random Llama, through every
stage with QLoRA, as `model.chat_template: chatml` runs it.

- ingest records `<|im_start|>` and `<|im_end|>` as tokens to add; train trains their embedding and output rows
  beside the adapter (PEFT's `trainable_token_indices`), and the adapter saves those rows alone; DPO goes on
  training them, against a reference that has them;
- the model learns to stop: the sanity check's `ends_with_eot` on the tuned model;
- the merged model stops on `<|im_end|>` where `transformers` and the real vLLM (CPU build) load it, with nothing
  but its own files (generation_config.json, tokenizer, chat template);
- export skips the adapter format and says why, and vLLM's own LoRA name parser refuses the rows' tensors.
What "lacks" means is read from the real vocabulary, not from the code under test.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, copy_inputs, run_stages, write_params
from real_vocabs import build_family, missing, real_tokenizer

from skytune.core import packaging, vllm_server
from skytune.core.evaluation import harness
from skytune.core.params import load_params
from skytune.core.vllm_server import Vllm
from skytune.stages import (
    export,
    ingest,
    merge_adapters,
    merge_data,
    preference,
    sanity_check,
    split,
    to_chat,
    train,
)

pytestmark = pytest.mark.slow  # every stage, twice vLLM's server: about 3 minutes
CHATML = ["<|im_start|>", "<|im_end|>"]
QUESTIONS = ["Hello! How are you?", "What is 2 + 2?", "Name a colour.", "Say something kind.", "Where is Paris?",
             "Count to three.", "What is your favourite word?", "Tell me a fact."]
ANSWERS = ["I am fine.", "It is 4.", "Blue.", "You are kind.", "In France.", "One, two, three.", "Hello.",
           "Water is wet."]
PROMPTS = [f"{q} ({i})" for i, q in enumerate(QUESTIONS[:4])]  # trained questions: what is tested is the stop


def pretrain(base: Path, steps: int = 200) -> None:
    """Teach the random base the questions and answers as plain text, all its weights, with no EOS after them: a
    base model that knows some language and no chat format, as real base models are. (A random model's frozen head
    cannot be steered by LoRA to any content; only the new rows it trains would move.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    texts = [f"{q} {a}" for q, a in zip(QUESTIONS, ANSWERS, strict=True)]  # no EOS: the base never stops
    tokenizer.pad_token = tokenizer.unk_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 1.0, loss.item()
    model.save_pretrained(base)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = missing("llama2")
    if reason:
        pytest.skip(reason)
    root = copy_inputs(tmp_path_factory.mktemp("chatml-on-llama2"))
    base = build_family("llama2", root / "base-model", head_dim=64)  # vLLM's CPU attention wants 32 or more
    pretrain(base)
    paths = load_params(root / "params.yaml").paths
    rows = [{"messages": [{"role": "user", "content": f"{QUESTIONS[i % 8]} ({i})"},
                          {"role": "assistant", "content": ANSWERS[i % 8]}]} for i in range(48)]
    (root / paths.raw_dir / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": f"{QUESTIONS[i % 8]} ({i})", "chosen": ANSWERS[i % 8], "rejected": ANSWERS[(i + 1) % 8]}
             for i in range(24)]
    (root / paths.raw_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / paths.sanity_prompts).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / paths.retained_prompts).write_text("")

    def edit(p: dict) -> None:
        p["model"].update(base=str(base), chat_template="chatml")
        p["data"]["sources"] = [{"name": "chats", "path": "chats.jsonl", "format": "messages"},
                                {"name": "pairs", "path": "pairs.jsonl", "format": "preference"}]
        p["identity"]["num_samples"] = 8
        p["split"]["val_fraction_by_source"] = {"identity": 0.0}
        p["merge_data"]["mixture"] = {}
        p["train"].update(method="qlora", epochs=10, batch_size=8, total_batch_size=8, max_length=128, save_steps=1000,
                          eval_steps=1000, logging_steps=10, learning_rate=0.01, lora_dropout=0.0)
        p["preference"].update(method="dpo", epochs=1, batch_size=4, total_batch_size=4, max_length=128,
                               save_steps=1000, eval_steps=1000, logging_steps=2)
        p["sanity_check"].update(val_records=4, perplexity_records=4, max_new_tokens=16)

    write_params(root, edit)
    run_stages(root, ingest, to_chat, split, merge_data, train, preference, merge_adapters, sanity_check, export)
    return root


def test_the_tokens_are_added_and_their_rows_trained_and_saved_with_the_adapter(run: Path) -> None:
    from safetensors import safe_open

    vocab = real_tokenizer("llama2").get_vocab()
    assert not any(t in vocab for t in CHATML)  # the real vocabulary lacks them
    paths = load_params(run / "params.yaml").paths
    manifest = json.loads((run / paths.base_model_dir / "base_model.json").read_text())
    assert manifest["added_tokens"] == CHATML
    assert json.loads((run / paths.train_metrics).read_text())["added_tokens"] == CHATML
    adapter = run / paths.adapter_dir
    config = json.loads((adapter / packaging.ADAPTER_CONFIG).read_text())
    ids = [len(vocab), len(vocab) + 1]  # appended after the base's tokens
    # The Llama 2 family's head is its own matrix (not tied): both the embedding's and the head's rows train.
    assert config["trainable_token_indices"] == {"embed_tokens": ids, "lm_head": ids}
    with safe_open(adapter / packaging.ADAPTER_WEIGHTS, framework="pt") as fh:
        rows = {n: fh.get_tensor(n) for n in fh.keys() if packaging.TRAINED_ROWS in n}
        names = list(fh.keys())
    assert sorted(n.split(".")[-3] for n in rows) == ["embed_tokens", "lm_head"], rows.keys()
    assert all(t.shape == (2, 64) for t in rows.values())
    assert not [n for n in names if n.endswith(("embed_tokens.weight", "lm_head.weight"))]  # no whole matrices


def test_dpo_continues_with_the_rows_and_merge_takes_its_adapter(run: Path) -> None:
    """The preference stage (DPO, its reference a frozen copy of the SFT adapter, rows included) trains the rows on;
    merge_adapters merges its adapter."""
    from safetensors.torch import load_file

    paths = load_params(run / "params.yaml").paths
    assert json.loads((run / paths.preference_metrics).read_text())["method"] == "dpo"
    sft, dpo = (load_file(run / d / packaging.ADAPTER_WEIGHTS) for d in (paths.adapter_dir,
                                                                          paths.preference_adapter_dir))
    assert sft.keys() == dpo.keys()  # the adapter alone: no `ref` copy saved
    rows = [n for n in dpo if packaging.TRAINED_ROWS in n]
    assert len(rows) == 2 and any(not sft[n].equal(dpo[n]) for n in rows)
    assert json.loads((run / paths.preference_adapter_dir / packaging.ADAPTER_CONFIG).read_text())[
        "trainable_token_indices"] == {"embed_tokens": [32000, 32001], "lm_head": [32000, 32001]}
    # The reference is the SFT model, rows included: DPO's loss starts at ln 2 (its first log, steps 1-2 of lr 5e-5;
    # a reference scoring <|im_end|> with the untrained rows started at 0.774).
    loss = (run / paths.preference_dvclive_dir / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert abs(float(loss[1].split("\t")[-1]) - math.log(2)) < 0.005, loss[:2]


def test_the_model_learns_to_stop_on_im_end(run: Path) -> None:
    paths = load_params(run / "params.yaml").paths
    metrics = json.loads((run / paths.sanity_metrics).read_text())
    print(f"\nends_with_eot: base {metrics['ends_with_eot_base']}, tuned {metrics['ends_with_eot_tuned']}")
    assert metrics["ends_with_eot_base"] == 0.0  # it never saw an EOS, and has no trained row for <|im_end|>
    assert metrics["ends_with_eot_tuned"] >= 0.9
    generation = json.loads((run / paths.merged_dir / "generation_config.json").read_text())
    assert 32001 in generation["eos_token_id"]


def _transformers_answers(merged: Path) -> list[tuple[str, int, int]]:
    """(answer, tokens generated, last token id) of plain `generate` on the merged directory, nothing passed but the
    prompt: stops come from its generation_config.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            row = model.generate(**ids, do_sample=False, max_new_tokens=32)[0, ids["input_ids"].shape[1]:].tolist()
        out.append((tokenizer.decode(row, skip_special_tokens=True).strip(), len(row), row[-1]))
    return out


def test_the_merged_model_stops_in_transformers_and_in_vllm(run: Path) -> None:
    paths = load_params(run / "params.yaml").paths
    merged = run / paths.merged_dir
    reference = _transformers_answers(merged)
    print(f"\ntransformers: {reference}")
    assert all(last == 32001 and count < 32 for _, count, last in reference)
    assert sum(bool(text) for text, _, _ in reference) >= 3  # an answer, then the stop (not a stop alone)
    params = load_params(REPO / "params.yaml")
    vllm = Vllm.from_params(params.vllm, str(REPO / params.paths.vllm_env))
    ok, why = vllm.available()
    if not ok:
        pytest.skip(why)
    flags = vllm_server.model_flags(name="m", dtype="float32", max_model_len=256, gpu_memory_utilization=0.5)
    with vllm_server.running(vllm, merged, flags) as server:
        replies = [vllm_server.post(server, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0.0})
            for prompt in PROMPTS]
    served = [(r["choices"][0]["message"]["content"].strip(), r["usage"]["completion_tokens"],
               r["choices"][0]["finish_reason"]) for r in replies]
    print(f"vLLM: {served}")
    assert all(reason == "stop" and count < 32 and "<|im" not in text for text, count, reason in served)
    assert [text for text, _, _ in served] == [text for text, _, _ in reference]


def test_export_skips_the_adapter_and_vllm_refuses_its_rows(run: Path) -> None:
    paths = load_params(run / "params.yaml").paths
    metrics = json.loads((run / paths.export_metrics).read_text())
    assert metrics["formats"] == ["merged"]
    assert "<|im_start|>, <|im_end|>" in metrics["skipped"]["adapter"]
    assert not (run / paths.export_dir / packaging.EXPORTED_ADAPTER).exists()
    config = json.loads((run / paths.adapter_dir / packaging.ADAPTER_CONFIG).read_text())
    from safetensors import safe_open

    with safe_open(run / paths.adapter_dir / packaging.ADAPTER_WEIGHTS, framework="pt") as fh:
        names = list(fh.keys())
    problems = packaging.vllm_adapter_problems(config, names, max_lora_rank=16, base_vocab_size=32000,
                                               tokenizer_size=32002)
    assert any("trainable_token_indices" in p for p in problems) and not any("not LoRA A/B" in p for p in problems)
    # vLLM's own parser of adapter tensor names (what its LoRA loader runs on every tensor), in its environment.
    params = load_params(REPO / "params.yaml")
    python = REPO / params.paths.vllm_env / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"vLLM's environment ({python.parent.parent}) is not built: make vllm-env")
    script = ("import json, sys\nfrom vllm.lora.utils import parse_fine_tuned_lora_name\nout = {}\n"
              "for n in json.load(sys.stdin):\n    try:\n        parse_fine_tuned_lora_name(n); out[n] = True\n"
              "    except ValueError:\n        out[n] = False\nprint(json.dumps(out))")
    done = subprocess.run([str(python), "-c", script], input=json.dumps(names), capture_output=True, text=True,
                          timeout=300, check=True)
    accepted = json.loads(done.stdout.strip().splitlines()[-1])
    assert {n for n, ok in accepted.items() if not ok} == {n for n in names if packaging.TRAINED_ROWS in n}


def test_the_sanity_check_on_vllm_answers_the_base_with_transformers(run: Path, tmp_path: Path) -> None:
    """On vLLM (a GPU node's engine), the base's checkpoint has no rows for the prompts' `<|im_start|>`: the base is
    answered by transformers, the tuned model by vLLM, stopping as transformers' did."""
    import shutil

    import yaml

    params = load_params(REPO / "params.yaml")
    if not (REPO / params.paths.vllm_env / "bin" / "python").is_file():
        pytest.skip("vLLM's environment is not built: make vllm-env")
    ws = tmp_path / "ws"
    shutil.copytree(run, ws, symlinks=True)
    settings = yaml.safe_load((ws / "params.yaml").read_text())
    settings["sanity_check"]["engine"] = "vllm"
    (ws / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    before = json.loads((run / params.paths.sanity_metrics).read_text())
    run_stages(ws, sanity_check)
    metrics = json.loads((ws / params.paths.sanity_metrics).read_text())
    assert metrics["engine"] == "vllm" and metrics["base_engine"] == "transformers"
    assert metrics["ends_with_eot_tuned"] == before["ends_with_eot_tuned"] >= 0.9
    assert metrics["mean_answer_tokens_tuned"] == before["mean_answer_tokens_tuned"]


def test_evaluate_base_on_vllm_scores_such_a_base_with_transformers(run: Path, tmp_path: Path) -> None:
    """`evaluate.engine: vllm` (what auto picks on a GPU node): the base's checkpoint has no rows for the template's
    tokens, which vLLM refuses, so transformers scores the base (and the control), its embeddings grown."""
    import shutil

    import yaml

    from skytune.stages import evaluate_base

    ws = tmp_path / "ws"
    shutil.copytree(run, ws, symlinks=True)
    settings = yaml.safe_load((ws / "params.yaml").read_text())
    settings["evaluate"].update(engine="vllm", limit=4)
    (ws / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    run_stages(ws, evaluate_base)
    paths = load_params(ws / "params.yaml").paths
    scores = json.loads((ws / paths.base_scores_dir / harness.SCORES_FILE).read_text())
    assert scores["tasks"], scores
