"""The preference stage: DPO, KTO, ORPO and SimPO after SFT through TRL's own trainers, on pairs tokenized with SFT's
loss masks; the later stages take its adapter when it ran, and are as they were when it did not; it resumes after
SIGKILL, exits 75 on SIGTERM after a checkpoint, and ends where an uninterrupted run ends. With train.method: none it
trains from the base. Runs on the tiny profile's workspace (conftest.pipeline), whose data holds the embedded
default's preference pairs (data/raw/one_sentence_pairs.jsonl)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PipelineRun, run_stages, write_params
from real_vocabs import missing, real_tokenizer

from skytune.core import packaging
from skytune.core.atomic import file_sha256, read_jsonl
from skytune.core.training import checkpoints
from skytune.core.training import preference as pref

TIMEOUT = 600


def workspace(pipeline: PipelineRun, root: Path, **settings: Any) -> Path:
    """What the preference stage reads (the base, train's adapter, the preference pairs, the SFT val file), with
    `preference` set to `settings`."""
    for item in ("models/base", "models/adapter", "data/preference", "data/train.jsonl", "data/val.jsonl"):
        copy = shutil.copytree if (pipeline.root / item).is_dir() else shutil.copy2
        (root / item).parent.mkdir(parents=True, exist_ok=True)
        copy(pipeline.root / item, root / item)
    write_params(root, lambda params: params["preference"].update(settings))
    return root


def metrics(root: Path) -> dict[str, Any]:
    return json.loads((root / "metrics/preference.json").read_text())


def tensors(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(directory / packaging.ADAPTER_WEIGHTS)


@pytest.mark.skipif(bool(missing("smollm2")), reason=str(missing("smollm2")))
def test_pairs_are_tokenized_as_the_real_template_renders_them() -> None:
    """SmolLM2's real tokenizer and template: the prompt is what the template writes before an answer (generation
    prompt included), each answer its text and <|im_end|>, as transformers tokenizes them on their own."""
    tokenizer = real_tokenizer("smollm2")
    from skytune.core.chat.chat_template import ensure_pad_token

    ensure_pad_token(tokenizer, "auto")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a harbor?"}]
    chosen, rejected = "A sheltered place for ships.", "A sheltered place for ships. Boats come and go. It is nice."
    records = [{"id": "a", "prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]},
               {"id": "b", "prompt": prompt, "completion": [{"role": "assistant", "content": "Go away."}],
                "label": False},
               {"id": "c", "prompt": prompt, "chosen": [{"role": "assistant", "content": "x"}] * 2,
                "rejected": [{"role": "assistant", "content": "y"}]},
               {"id": "d", "prompt": prompt, "chosen": [{"role": "assistant", "content": "long " * 300}],
                "rejected": [{"role": "assistant", "content": "y"}]}]
    encoded = pref.encode(tokenizer, records, max_length=256, where="test")
    expected_prompt = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
    [pair] = encoded.pairs
    assert pair.prompt_ids == expected_prompt
    assert pair.chosen_ids == tokenizer(chosen + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert pair.rejected_ids == tokenizer(rejected + "<|im_end|>", add_special_tokens=False)["input_ids"]
    [unwanted] = encoded.undesirable
    assert unwanted.label is False and unwanted.prompt_ids == expected_prompt
    assert encoded.skipped == {"multi_message_answer": 1, "too_long": 1}
    assert [c.label for c in encoded.completions()] == [True, False, False]  # KTO: the pair as two, then the row


def test_method_none_leaves_the_later_stages_as_they_were(pipeline: PipelineRun, tmp_path: Path) -> None:
    """With preference.method: none (the default: conftest.pipeline ran it) the stage writes only that, and
    merge_adapters builds the model it builds without the stage, byte for byte."""
    from skytune.stages import merge_adapters

    root = pipeline.root
    assert sorted(p.name for p in (root / "models/preference").iterdir()) == ["preference.json"]
    assert metrics(root) == {"method": "none"}
    assert packaging.tuned_adapter("models/adapter", str(root / "models/preference")) == Path("models/adapter")
    alone = workspace(pipeline, tmp_path / "alone")
    shutil.rmtree(alone / "models/preference", ignore_errors=True)  # as before the stage existed
    run_stages(alone, merge_adapters)
    merged = {p.name: file_sha256(p) for p in sorted((alone / "models/merged").iterdir())}
    assert merged == {p.name: file_sha256(p) for p in sorted((root / "models/merged").iterdir())}


def test_dpo_prefers_the_chosen_answers_and_the_later_stages_take_its_adapter(pipeline: PipelineRun,
                                                                               tmp_path: Path) -> None:
    from skytune.stages import merge_adapters, preference

    root = workspace(pipeline, tmp_path, method="dpo")
    run_stages(root, preference)
    m = metrics(root)
    assert m["method"] == "dpo" and m["train_pairs"] == m["train_rows"] > 30 and m["val_pairs"] >= 4
    assert m["gate"]["train"]["problems"] == {} and m["skipped"] == {"train": {}, "val": {}}
    # On held-out pairs, the chosen answers gain on the rejected ones against the SFT model (DPO's implicit reward).
    assert m["val_reward_margin"] > 0 and m["val_reward_accuracy"] >= 0.75
    assert m["val_logp_margin_after"] > m["val_logp_margin_before"]
    out = root / "models/preference"
    assert not (out / "ref").exists()  # TRL's frozen reference copy is not saved
    trained, sft = tensors(out), tensors(root / "models/adapter")
    assert trained.keys() == sft.keys() and any((trained[k] - sft[k]).abs().max() > 0 for k in sft)
    assert json.loads((out / packaging.TRAINING_PARAMS).read_text())["preference"]["method"] == "dpo"
    assert packaging.tuned_adapter(str(root / "models/adapter"), str(out)) == out
    run_stages(root, merge_adapters)  # merges the preference adapter, its logit check passing
    assert json.loads((root / "metrics/merge_adapters.json").read_text())["max_abs_logit_diff"] < 1e-3


def test_kto_trains_on_the_pairs_and_the_rows_labelled_undesirable(pipeline: PipelineRun, tmp_path: Path) -> None:
    from skytune.stages import preference

    root = workspace(pipeline, tmp_path, method="kto")
    unwanted = [{"id": f"u{i}", "source": "unwanted", "prompt": r["messages"][:-1],
                 "completion": [{"role": "assistant", "content": "I will not answer that."}], "label": False}
                for i, r in enumerate(read_jsonl(root / "data/train.jsonl")[:6])]
    with (root / "data/preference/train.jsonl").open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in unwanted)
    run_stages(root, preference)
    m = metrics(root)
    assert m["train_undesirable"] == 6 and m["train_rows"] == 2 * m["train_pairs"] + 6


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_the_reference_free_methods_train_through_trl_experimental(pipeline: PipelineRun, tmp_path: Path,
                                                                   method: str) -> None:
    from skytune.stages import preference

    root = workspace(pipeline, tmp_path, method=method, beta=2.0 if method == "simpo" else 0.1)
    run_stages(root, preference)
    m = metrics(root)
    assert m["method"] == method and m["steps"] > 0 and m["val_pairs"] >= 4 and m["gate"]["train"]["problems"] == {}
    trained, sft = tensors(root / "models/preference"), tensors(root / "models/adapter")
    assert any((trained[k] - sft[k]).abs().max() > 0 for k in sft)


def test_train_method_none_trains_the_preference_adapter_from_the_base(pipeline: PipelineRun, tmp_path: Path) -> None:
    """train.method: none: train only says so; DPO starts from the base itself with a new adapter (the val pairs'
    log-probabilities before training are the base's, computed here with plain transformers, one sequence at a
    time), and the stages after take its adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from skytune.core.models.base import BaseModel, load_tokenizer, location
    from skytune.stages import merge_adapters, preference, train

    root = workspace(pipeline, tmp_path)
    write_params(root, lambda params: (params["preference"].update(method="dpo", adapter="lora"),
                                       params["train"].update(method="none")))
    run_stages(root, train)
    assert json.loads((root / "metrics/train.json").read_text()) == {"method": "none"}
    assert not (root / "models/adapter" / packaging.ADAPTER_CONFIG).exists()  # SFT's adapter is gone
    run_stages(root, preference, merge_adapters)
    m, out = metrics(root), root / "models/preference"
    with contextlib.chdir(root):  # (the tiny profile's base lives in the workspace)
        base = BaseModel.load("models/base")
        tokenizer = load_tokenizer(base)
        model = AutoModelForCausalLM.from_pretrained(location(base), dtype=torch.float32).eval()
    val = pref.encode(tokenizer, read_jsonl(root / "data/preference/val.jsonl"), max_length=512, where="test").pairs

    def logp(prompt: list[int], answer: list[int]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        return float(logits.gather(-1, torch.tensor(answer)[:, None]).sum())

    margin = sum(logp(p.prompt_ids, p.chosen_ids) - logp(p.prompt_ids, p.rejected_ids) for p in val) / len(val)
    assert len(val) == m["val_pairs"] >= 4 and m["val_logp_margin_before"] == pytest.approx(margin, abs=1e-3)
    assert m["steps"] > 0 and m["val_logp_margin_after"] > m["val_logp_margin_before"]
    config = json.loads((out / packaging.ADAPTER_CONFIG).read_text())
    assert config["r"] == load_params_at(root)["train"]["lora_r"] and config["peft_type"] == "LORA"
    assert any(float(t.abs().max()) > 0 for k, t in tensors(out).items() if "lora_B" in k)  # B starts at zero
    trained = json.loads((out / packaging.TRAINING_PARAMS).read_text())
    assert packaging.recipe(trained) == "DPO from the base on a new lora adapter, beta 0.1"
    assert json.loads((root / "metrics/merge_adapters.json").read_text())["max_abs_logit_diff"] < 1e-3


def load_params_at(root: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((root / "params.yaml").read_text())


def test_no_pairs_is_one_clear_error(pipeline: PipelineRun, tmp_path: Path) -> None:
    from skytune.core.errors import SkytuneError
    from skytune.stages import preference

    root = workspace(pipeline, tmp_path, method="dpo")
    (root / "data/preference/train.jsonl").write_text("")
    with pytest.raises(SkytuneError, match="holds no usable pairs .* format preference"):
        run_stages(root, preference)


def start(root: Path) -> subprocess.Popen:
    log = (root / "preference.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "skytune.stages.preference"], cwd=root,
                            env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)


def complete_steps(root: Path) -> list[int]:
    """The steps of the complete checkpoints (`checkpoint-<step>` holding the marker), in order."""
    return sorted(int(m.parent.name.rpartition("-")[2])
                  for m in root.glob(f"models/checkpoints/*/*/{checkpoints.MARKER}"))


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, after: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while not (steps := [s for s in complete_steps(root) if s > after]):
        assert proc.poll() is None and time.monotonic() < deadline, (root / "preference.log").read_text()[-3000:]
        time.sleep(0.02)
    return steps[0]


def test_killed_and_preempted_runs_resume_and_end_where_an_uninterrupted_one_does(pipeline: PipelineRun,
                                                                                  tmp_path: Path) -> None:
    settings = {"method": "dpo", "save_steps": 3, "eval_steps": 6}
    uninterrupted = workspace(pipeline, tmp_path / "uninterrupted", **settings)
    assert start(uninterrupted).wait(TIMEOUT) == 0, (uninterrupted / "preference.log").read_text()[-3000:]
    root = workspace(pipeline, tmp_path / "killed", **settings)
    # 1. SIGKILL (no warning at all) after the first checkpoint.
    proc = start(root)
    first = wait_for_checkpoint(root, proc, after=0)
    proc.kill()
    proc.wait(TIMEOUT)
    first = complete_steps(root)[-1]  # (a newer one may have completed before the kill landed)
    assert not (root / "models/preference").exists()
    # 2. Restart: it resumes; SIGTERM (a spot preemption notice) after its next checkpoint: a checkpoint, then 75.
    proc = start(root)
    second = wait_for_checkpoint(root, proc, after=first)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == checkpoints.PREEMPTED_EXIT_CODE, (root / "preference.log").read_text()[-3000:]
    stopped_at = complete_steps(root)[-1]
    assert stopped_at >= second and not (root / "models/preference").exists()
    # 3. Restart: it resumes from the SIGTERM checkpoint and ends where the uninterrupted run ended.
    assert start(root).wait(TIMEOUT) == 0, (root / "preference.log").read_text()[-3000:]
    assert (root / "preference.log").read_text().count("resuming from") == 2
    resumed, baseline = metrics(root), metrics(uninterrupted)
    assert resumed["resumed_from_step"] == stopped_at > 0 and resumed["steps"] == baseline["steps"]
    ours, theirs = tensors(root / "models/preference"), tensors(uninterrupted / "models/preference")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) < 1e-4
    assert abs(resumed["val_reward_margin"] - baseline["val_reward_margin"]) < 1e-4


def test_the_model_card_says_what_trained_the_model_and_on_which_data() -> None:
    from types import SimpleNamespace

    from skytune.stages.export import _trained_on

    sft = {"train": {"method": "qlora", "loss": "assistant_only"}, "quantization": "nf4"}
    dpo = {**sft, "preference": {"method": "dpo", "beta": 0.1, "adapter": "qlora"}}
    from_base = {"train": {"method": "none"}, "preference": {"method": "kto", "beta": 0.1, "adapter": "qlora"},
                 "quantization": "none"}  # (4-bit could not run: the adapter as it ran is LoRA)
    assert packaging.recipe(sft) == "SFT, method qlora, loss assistant_only"
    assert packaging.recipe(dpo) == "SFT, method qlora, loss assistant_only; then DPO, beta 0.1"
    assert packaging.recipe(from_base) == "KTO from the base on a new lora adapter, beta 0.1"
    assert packaging.tags(sft) == ["skytune", "qlora", "sft"] and packaging.tags(dpo)[-1] == "dpo"
    assert packaging.tags(from_base) == ["skytune", "lora", "kto"]
    assert packaging.tags({"train": {"method": "full"}, "quantization": "none"}) == ["skytune", "sft"]
    paths = SimpleNamespace(train_file="t.jsonl", val_file="v.jsonl", preference_dir="p")
    assert [str(f) for f in _trained_on(paths, sft)] == ["t.jsonl", "v.jsonl"]
    assert [str(f) for f in _trained_on(paths, dpo)] == ["t.jsonl", "v.jsonl", "p/train.jsonl", "p/val.jsonl"]
    assert [str(f) for f in _trained_on(paths, from_base)] == ["p/train.jsonl", "p/val.jsonl"]


def test_the_report_shows_the_val_pairs_before_and_after_only_where_preference_training_ran() -> None:
    from skytune.face.report import _headline

    ran = {"preference.method": "dpo", "preference.val_preference_accuracy_before": 0.5,
           "preference.val_preference_accuracy_after": 0.875, "preference.val_reward_margin": 0.25}
    rows = "\n".join(_headline(["dpo", "plain"], {"dpo": ran, "plain": {"preference.method": "none"}}))
    assert ("<tr><td>preference accuracy: val pairs, chosen above rejected (per token)</td><td class='num'>0.5</td>"
            "<td class='num'>0.875</td><td class='num'></td></tr>") in rows
    assert ("<td>preference reward margin: val pairs, against the model it started from</td><td class='num'>-</td>"
            in rows)
    assert "preference" not in "\n".join(_headline(["plain"], {"plain": {"preference.method": "none"}}))
