"""The evaluate stages: lm-eval's own tasks and scorers (IFEval on its real prompts), the repository's task
directories, the forgetting flag, and clear refusals (unknown task, registry data offline)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, PipelineRun, run_stages, write_params

from skytune.core.chat import tokenization
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import forgetting, general_text, harness, scoring
from skytune.core.models.loading import load_full_precision, load_saved_tokenizer
from skytune.core.params import load_params
from skytune.core.params.schema import EvaluateParams
from skytune.core.vllm_server import Vllm

IFEVAL_DATA = REPO.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"
needs_ifeval = pytest.mark.skipif(not IFEVAL_DATA.is_file(), reason=f"{IFEVAL_DATA} is absent (a clone outside CI)")
PARAMS = load_params(REPO / "params.yaml")
EVALUATE = PARAMS.evaluate
PIN = REPO / PARAMS.paths.lm_eval_pin
VLLM = Vllm.from_params(PARAMS.vllm, PARAMS.paths.vllm_env)
IFEVAL_METRICS = {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"}


def settings(**changes: Any) -> EvaluateParams:
    return dataclasses.replace(EVALUATE, **changes)


def ifeval_task(tasks_dir: Path, data: Path, name: str = "ifeval_shared") -> Path:
    """A task directory holding lm-eval's own ifeval task (its YAML included: prompts, generation settings,
    lm-eval's IFEval scorer), its dataset pointed at the local file `data`."""
    import lm_eval

    own = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    assert own.is_file()
    (tasks_dir / name).mkdir(parents=True)
    (tasks_dir / name / f"{name}.yaml").write_text(
        f"include: {own}\ntask: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    train: {data}\n")
    return tasks_dir


@needs_ifeval
def test_lm_evals_own_ifeval_on_the_real_prompts_scores_a_model(tiny_model: Path, tmp_path: Path) -> None:
    tasks_dir = ifeval_task(tmp_path / "tasks", IFEVAL_DATA)
    tokenizer = load_saved_tokenizer(tiny_model)
    scores, _ = harness.score(lambda: load_full_precision(tiny_model, None, torch.float32), tokenizer,
                              source=str(tiny_model), revision=None, tasks_dir=tasks_dir, pin_file=PIN, seed=0,
                              vllm=VLLM, dtype="float32", ev=settings(tasks=("ifeval_shared",), limit=3,
                                                                      max_gen_toks=16, engine="transformers"))
    assert scores.tasks.keys() == {"ifeval_shared"} and scores.examples == {"ifeval_shared": 3}
    assert set(scores.tasks["ifeval_shared"]) == IFEVAL_METRICS
    assert all(0.0 <= v <= 1.0 for v in scores.tasks["ifeval_shared"].values())
    assert all(scores.higher_is_better["ifeval_shared"].values())


class Answers:
    """A stand-in model for lm-eval: it answers every generation request with one fixed text, and keeps the
    generation settings it was asked for."""

    def __new__(cls, text: str) -> Any:
        from lm_eval.api.model import LM

        class FixedAnswer(LM):
            def __init__(self) -> None:
                super().__init__()
                self.asked: list[dict[str, Any]] = []

            def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
                self.asked += [r.args[1] for r in requests]
                return [text for _ in requests]

            def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
                raise AssertionError("IFEval only generates")

            loglikelihood_rolling = loglikelihood

        return FixedAnswer()


# IFEval prompt 1508: keywords:existence ("forests", "riddle") and punctuation:no_comma.
FOLLOWS = "the lion walks the forests\nhe hums a riddle to the wind\ngold crown in the grass"
BREAKS = "The lion, proud and strong, roars at dawn."


@needs_ifeval
@pytest.mark.parametrize(("answer", "expected"), [(FOLLOWS, 1.0), (BREAKS, 0.0)])
def test_ifeval_scores_come_from_lm_evals_scorer(answer: str, expected: float, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in IFEVAL_DATA.read_text(encoding="utf-8").splitlines()]
    (prompt,) = [r for r in rows if r["key"] == 1508]
    assert prompt["instruction_id_list"] == ["keywords:existence", "punctuation:no_comma"]
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(prompt) + "\n")
    model = Answers(answer)
    scores = harness.evaluate(model, ev=settings(tasks=("ifeval_shared",), limit=None, max_gen_toks=64),
                              tasks_dir=ifeval_task(tmp_path / "tasks", data), pin_file=PIN, seed=0,
                              engine="stand-in", chat=False)
    assert scores.tasks["ifeval_shared"] == dict.fromkeys(IFEVAL_METRICS, expected)
    assert [a["max_gen_toks"] for a in model.asked] == [64]  # IFEval's own 1280, capped by evaluate.max_gen_toks


def choice_scores(model: Any, tokenizer: Any, docs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """skytune_choice's acc and acc_norm per question, computed here by a plain forward pass: each choice's
    log-likelihood after "Question: ...\nAnswer:" (the choice after one space, no special tokens), the pick its argmax,
    or the argmax per character of the choice for acc_norm."""
    acc, acc_norm = [], []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        lls = []
        for choice in doc["choices"]:
            ids = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
            lls.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
        normed = [ll / len(choice) for ll, choice in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["answer"]))
    return {"acc": acc, "acc_norm": acc_norm}


def task_file(task: str) -> list[dict[str, Any]]:
    data = next((REPO / "evaluate" / "tasks" / task).glob("*.jsonl"))
    return [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]


def independent_half(text: str) -> str:
    """The half of core.evaluation.holdout, computed here: SHA-256 of the salted text, its first byte's parity."""
    return "dev" if hashlib.sha256(f"skytune-holdout-1\n{text.strip()}".encode()).digest()[0] % 2 == 0 else "heldout"


@pytest.mark.parametrize("task", ["skytune_knowledge", "skytune_choice"])
def test_the_reported_task_is_the_held_out_half_and_the_dev_half_never_mixes_with_it(task: str) -> None:
    """What lm-eval loads for each task: the held-out half for the reported name, the dev half for `<name>_dev`,
    together every item once, both halves large enough to score."""
    manager = harness.task_manager((task, f"{task}_dev"), REPO / "evaluate" / "tasks")
    loaded, _ = harness.load_tasks(manager, (task, f"{task}_dev"), REPO / "evaluate" / "tasks", None)
    reported, dev = ([d["question"] for d in t.eval_docs] for t in loaded)
    questions = [d["question"] for d in task_file(task)]
    assert reported == [q for q in questions if independent_half(q) == "heldout"]
    assert dev == [q for q in questions if independent_half(q) == "dev"]
    assert not set(reported) & set(dev) and len(reported) + len(dev) == len(questions)
    assert min(len(reported), len(dev)) >= 0.3 * len(questions)


def test_the_repositorys_tasks_score_a_model_offline(tiny_model: Path) -> None:
    """lm-eval's scores on the repository's tasks are the ones a plain forward pass gives (the tiny model's guesses
    differ per choice, so a wrong context, continuation or normalisation changes them)."""
    tokenizer = load_saved_tokenizer(tiny_model)
    model = load_full_precision(tiny_model, None, torch.float32)
    limit = 12
    scores, _ = harness.score(lambda: model, tokenizer, source=str(tiny_model), revision=None, dtype="float32",
                              seed=0, pin_file=PIN, vllm=VLLM, tasks_dir=REPO / "evaluate" / "tasks",
                              ev=settings(limit=limit, engine="transformers", apply_chat_template=False))
    assert scores.tasks.keys() == set(EVALUATE.tasks)
    assert scores.examples == dict.fromkeys(EVALUATE.tasks, limit)
    docs = [d for d in task_file("skytune_choice") if independent_half(d["question"]) == "heldout"][:limit]
    expected = choice_scores(model, tokenizer, docs)
    assert scores.tasks["skytune_choice"] == pytest.approx({m: sum(v) / limit for m, v in expected.items()}, abs=1e-9)
    assert scores.tasks["skytune_knowledge"].keys() == {"answer_match"}
    assert 0.0 <= scores.tasks["skytune_knowledge"]["answer_match"] <= 1.0
    # The per-question scores the paired tests compare, in question order, from lm-eval's logged samples.
    items = scores.items["skytune_choice"]
    assert items["ids"] == [f"skytune_choice/{i}" for i in range(limit)]
    assert items["metrics"] == {m: [[v, 1.0] for v in values] for m, values in expected.items()}
    knowledge = scores.items["skytune_knowledge"]["metrics"]["answer_match"]
    assert len(knowledge) == limit and {count for _, count in knowledge} == {1.0}
    assert sum(v for v, _ in knowledge) / limit == pytest.approx(scores.tasks["skytune_knowledge"]["answer_match"])


def test_an_unknown_task_is_refused_with_the_closest_names() -> None:
    with pytest.raises(SkytuneError, match="'skytune_knowlege' is neither .* did you mean 'skytune_knowledge'"):
        harness.task_manager(("skytune_knowlege",), REPO / "evaluate" / "tasks")


def test_a_registry_task_offline_is_one_clear_error(pipeline: PipelineRun, tmp_path: Path) -> None:
    """lm-eval's arc_easy needs the hub; offline (as this machine and the tests are) the stage names the task and
    what to do, in one line, without a traceback."""
    root = tmp_path / "run"
    root.mkdir()
    for name in ("params.yaml", PIN.name, "evaluate", "models"):
        copy = shutil.copytree if (pipeline.root / name).is_dir() else shutil.copy2
        copy(pipeline.root / name, root / name)
    write_params(root, lambda p: p["evaluate"].update({"tasks": ["arc_easy"]}))
    done = subprocess.run([sys.executable, "-m", "skytune.stages.evaluate_base"], cwd=root, capture_output=True,
                          check=False, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evaluate.tasks: arc_easy" in errors[0] and "Hugging Face hub" in errors[0], errors


def test_the_installed_lm_eval_must_be_the_pinned_one(tmp_path: Path) -> None:
    import lm_eval

    pin = tmp_path / "requirements-eval.txt"
    pin.write_text("lm-eval[ifeval]==0.0.1  # old\n")
    with pytest.raises(SkytuneError, match=rf"lm-eval {lm_eval.__version__} is installed but .* pins 0.0.1"):
        harness.check_version(pin)
    assert harness.pinned_version(PIN) == lm_eval.__version__


@pytest.mark.parametrize(("base", "tuned", "higher", "forgot"), [
    (0.80, 0.74, True, True),     # fell 0.06 > 0.05
    (0.80, 0.75, True, False),    # fell exactly 0.05: not past it
    (0.80, 0.95, True, False),
    (10.0, 12.6, False, True),    # perplexity 26% higher > 25%
    (10.0, 12.5, False, False),   # exactly 25%
    (10.0, 8.0, False, False),
])
def test_a_regression_past_the_threshold_is_flagged(base: float, tuned: float, higher: bool, forgot: bool) -> None:
    assert forgetting.regressed(base, tuned, higher_is_better=higher, max_regression=0.05,
                                max_increase=0.25) is forgot


def _with_base_scores(pipeline: PipelineRun, tmp_path: Path, edit: Any,
                      files: tuple[str, ...] = (harness.SCORES_FILE,)) -> Path:
    """A copy of the pipeline's workspace whose cached base scores (and control scores, with CONTROL_FILE in
    `files`) `edit` changed."""
    root = shutil.copytree(pipeline.root, tmp_path / "run")
    paths = load_params(root / "params.yaml").paths
    for name in files:
        scores = root / paths.base_scores_dir / name
        data = json.loads(scores.read_text())
        edit(data)
        scores.write_text(json.dumps(data))
    return root


def test_the_evaluate_stage_compares_with_the_cached_base_and_flags_forgetting(pipeline: PipelineRun,
                                                                                tmp_path: Path) -> None:
    """The tuned model scored below a base that did (here: was made to) score perfectly is flagged; with
    fail_on_regression the stage fails after writing its metrics."""
    paths = load_params(pipeline.root / "params.yaml").paths
    metrics = json.loads((pipeline.root / paths.eval_metrics).read_text())
    base, control = (json.loads((pipeline.root / paths.base_scores_dir / name).read_text())
                     for name in (harness.SCORES_FILE, harness.CONTROL_FILE))
    assert control["model"] == metrics["control"] == "dequantized nf4"  # the tiny profile trains QLoRA
    for task, scores in base["tasks"].items():
        for metric, value in scores.items():
            entry = metrics["tasks"][task][metric]
            assert entry["base"] == round(value, 4) and entry["delta"] == round(entry["tuned"] - value, 4)
            assert entry["control"] == round(control["tasks"][task][metric], 4)
            assert entry["quantization"] == round(entry["control"] - entry["base"], 4)
            assert entry["training"] == round(entry["tuned"] - entry["control"], 4)
    # The control's general text is the base's own texts, scored on the quantized base: close to, not the base's.
    ppl = metrics["general_text"]["perplexity"]
    assert ppl["base"] == round(base["general_text"]["perplexity"], 4) != ppl["control"]
    assert ppl["control"] == pytest.approx(ppl["base"], rel=0.2)
    # The delta's standard error: lm-eval's closed form for a mean of 0/1 scores over n examples is
    # sqrt(p (1 - p) / (n - 1)) for each model.
    n = metrics["examples"]["skytune_choice"]
    for metric, entry in metrics["tasks"]["skytune_choice"].items():
        p = base["tasks"]["skytune_choice"][metric]
        se = [math.sqrt(x * (1 - x) / (n - 1)) for x in (p, entry["tuned"])]
        assert entry["delta_stderr"] == pytest.approx(math.hypot(*se), abs=1e-3), (metric, entry)

    def perfect(data: dict[str, Any]) -> None:
        data["tasks"]["skytune_choice"]["acc"] = 1.0
        items = data["items"]["skytune_choice"]["metrics"]
        items["acc"] = [[1.0, 1.0]] * len(items["acc"])
        data["general_text"]["perplexity"] = 1e9  # so only the choice task can be flagged
        data["general_text"]["losses"] = [[loss * 100, tokens] for loss, tokens in data["general_text"]["losses"]]

    # Every question the tuned model gets wrong is one the base (and the control) got right: the exact McNemar
    # p-value is 2 / 2**wrong (computed here). At alpha = p the drop, past max_regression, is not significant (p is
    # not below alpha); at alpha = 2p it is, and it is flagged.
    tuned_acc = metrics["tasks"]["skytune_choice"]["acc"]["tuned"]
    wrong = round((1 - tuned_acc) * n)
    assert wrong >= 2, tuned_acc  # the tiny model misses several of its 8 questions
    expected_p = 2 / 2**wrong
    root = _with_base_scores(pipeline, tmp_path, perfect, (harness.SCORES_FILE, harness.CONTROL_FILE))
    from skytune.stages import evaluate

    write_params(root, lambda p: p["evaluate"].update({"alpha": expected_p}))
    run_stages(root, evaluate)
    unflagged = json.loads((root / paths.eval_metrics).read_text())
    entry = unflagged["tasks"]["skytune_choice"]["acc"]
    assert entry["p_value"] == round(expected_p, 4) and entry["test"] == "mcnemar_exact" and entry["forgot"] is False
    assert entry["ci_low"] <= entry["training"] <= entry["ci_high"] < 0
    assert unflagged["forgetting"] is False and unflagged["regressions"] == 0

    write_params(root, lambda p: p["evaluate"].update({"fail_on_regression": True, "alpha": min(0.99, 2 * expected_p)}))
    with pytest.raises(SkytuneError, match=r"forgetting: skytune_choice\.acc regressed .*fail_on_regression is true"):
        run_stages(root, evaluate)
    flagged = json.loads((root / paths.eval_metrics).read_text())
    assert flagged["forgetting"] is True and flagged["regressions"] == 1
    assert flagged["tasks"]["skytune_choice"]["acc"]["forgot"] is True
    assert flagged["general_text"]["perplexity"]["forgot"] is False
    plot = (root / paths.eval_plot).read_text().splitlines()
    assert plot[:3] == ["score,value", "skytune_choice acc (base),1.0", "skytune_choice acc (control),1.0"]
    assert plot[3] == f"skytune_choice acc (tuned),{flagged['tasks']['skytune_choice']['acc']['tuned']}"


def test_base_scores_from_another_engine_are_refused(pipeline: PipelineRun, tmp_path: Path) -> None:
    """evaluate.engine: auto resolves per machine: a base scored on vLLM (a GPU node) is not compared with a tuned
    model scored on transformers here."""
    from skytune.stages import evaluate

    root = _with_base_scores(pipeline, tmp_path, lambda data: data.update(engine="vllm"))
    with pytest.raises(SkytuneError, match="base was scored on the vllm engine, and this machine scores on "
                                           "transformers.*dvc repro -f evaluate_base"):
        run_stages(root, evaluate)


def test_a_local_task_whose_data_is_missing_names_its_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    task = tmp_path / "tasks" / "broken"
    task.mkdir(parents=True)
    (task / "broken.yaml").write_text("task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                      "    test: tasks/broken/missing.jsonl\noutput_type: multiple_choice\n"
                                      "test_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    manager = harness.task_manager(("broken",), Path("tasks"))
    with pytest.raises(SkytuneError, match="evaluate.tasks: broken: .* Check the data_files of its YAML under tasks"):
        harness.load_tasks(manager, ("broken",), Path("tasks"), None)


def test_general_text_scores_the_answer_and_an_end_of_turn_only_where_the_base_stopped(tiny_model: Path) -> None:
    """An answer cut at max_new_tokens has no end-of-turn token to score: its count is the answer's tokens alone."""
    model, tokenizer = load_full_precision(tiny_model, None, torch.float32), load_saved_tokenizer(tiny_model)
    answer = "hello 3 plus 4 is 7."
    answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    counts = {stopped: general_text.losses(model, tokenizer, [{"prompt": "what is 3 plus 4?", "text": answer,
                                                              "stopped": stopped}])[0][1]
              for stopped in (True, False)}
    assert counts == {True: answer_tokens + 1, False: answer_tokens}
    # Text by text, the summed log-likelihoods make the perplexity of the texts scored together in one batch.
    texts = [{"prompt": p, "text": a, "stopped": s} for p, a, s in
             [("what is 3 plus 4?", answer, True), ("name a colour", "blue, or red", False), ("hi", "hello", True)]]
    records = tokenization.Encoder(tokenizer, "assistant_only").encode(
        [{"id": str(i), "messages": [{"role": "user", "content": t["prompt"]},
                                     {"role": "assistant", "content": t["text"]}]} for i, t in enumerate(texts)])
    for record, text in zip(records, texts, strict=True):
        if not text["stopped"]:
            record.labels[max(i for i, x in enumerate(record.labels) if x != tokenization.IGNORE)] = \
                tokenization.IGNORE
    together = scoring.perplexity(model, records, pad_id=tokenizer.pad_token_id, batch_size=3)
    assert scoring.perplexity_of(general_text.losses(model, tokenizer, texts)) == (
        pytest.approx(together[0], rel=1e-5), together[1])


STOP = {"what", "is", "the", "of", "a", "in", "which", "do", "how", "many", "are", "there", "does", "to", "you", "who"}


def test_no_task_question_is_asked_in_the_sample_training_data() -> None:
    """The repository's tasks measure what tuning keeps, so the sample data must not teach them: no question appears
    in data/raw, nor two of its three-word runs (`capital of X` once is chance; with `the X of Y` it is the question)."""
    raw = " ".join(f.read_text(encoding="utf-8").lower() for f in (REPO / "data" / "raw").rglob("*") if f.is_file())
    for data in (REPO / "evaluate" / "tasks").glob("*/*.jsonl"):
        for line in data.read_text(encoding="utf-8").splitlines():
            question = json.loads(line)["question"].lower().rstrip("?")
            words = re.findall(r"[a-z0-9]+", question)
            runs = [" ".join(words[i:i + 3]) for i in range(len(words) - 2) if not set(words[i:i + 3]) <= STOP]
            assert question not in raw and sum(run in raw for run in runs) < 2, (data.name, question)


def test_the_readmes_tables_are_written_from_a_runs_metrics(pipeline: PipelineRun) -> None:
    """bench/readme_tables.py: one row per score, its numbers those of the run's metrics files."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "readme_tables.py"), str(pipeline.root)], check=True,
                         capture_output=True, text=True).stdout
    paths = load_params(pipeline.root / "params.yaml").paths
    evaluated = json.loads((pipeline.root / paths.eval_metrics).read_text())
    sanity = json.loads((pipeline.root / paths.sanity_metrics).read_text())
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("|").split(" | ") for line in out.splitlines()
            if line.startswith("| ") and " | " in line}
    identity = rows["identity exact match (answers as `identity.name` by `identity.creator`)"]
    assert [float(v) for v in identity[1:3]] == [sanity["identity_exact_match_base"],
                                                 sanity["identity_exact_match_tuned"]]
    n = evaluated["examples"]["skytune_choice"]
    entry = evaluated["tasks"]["skytune_choice"]["acc"]
    choice = rows[f"skytune_choice acc ({n} items)"]
    assert [float(v) for v in choice[1:4]] == pytest.approx([entry["base"], entry["control"], entry["tuned"]],
                                                            abs=1e-3)
    assert choice[5].endswith(f", {entry['p_value']:.2g} (mcnemar exact)")
    ppl = next(v for k, v in rows.items() if k.startswith("perplexity on text the base wrote"))
    assert (ppl[-1].strip() == "FORGOT") is evaluated["general_text"]["perplexity"]["forgot"]


def test_the_control_is_the_base_quantized_as_training_quantizes_it_then_dequantized(
        pipeline: PipelineRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dequantized (evaluate_base's control, merge_adapters' base after QLoRA) against transformers' own NF4
    quantization and dequantization of the same checkpoint: the same weights; and not the original weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from skytune.core.models.base import BaseModel, location
    from skytune.core.models.loading import load_dequantized

    monkeypatch.chdir(pipeline.root)
    params = load_params("params.yaml")
    base = BaseModel.load(params.paths.base_model_dir)
    control, what = load_dequantized(base, quant_type="nf4", double_quant=params.train.double_quant,
                                     dtype=torch.float32)
    assert what == "dequantized nf4"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=params.train.double_quant,
                                bnb_4bit_quant_storage=torch.float32)
    expected = AutoModelForCausalLM.from_pretrained(location(base), quantization_config=config).dequantize()
    original = load_full_precision(location(base), None, torch.float32).state_dict()
    mine, theirs = control.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(mine[name], original[name])


def test_ifevals_nltk_instructions_score_offline_with_nltks_own_punkt_tab(tmp_path: Path) -> None:
    """`make install` copies NLTK's punkt_tab out of the wheel requirements-nltk.txt pins into the virtualenv, so
    lm-eval's IFEval scorer counts sentences and words as NLTK's Punkt model does, with no download: in a fresh
    process with no ~/nltk_data, "Mr." ends no sentence (a naive split on ". " counts 4) and "don't" is the
    Treebank's "do" + "n't"."""
    code = ("from lm_eval.tasks.ifeval import instructions_util as u, instructions\n"
            "print(u.count_sentences('Hello there. This is Mr. Smith and his test. Done!'))\n"
            "print(u.nltk.word_tokenize(\"I LOVE NLP, don't you?\"))\n"
            "checker = instructions.CapitalWordFrequencyChecker('x')\n"
            "checker.build_description(capital_frequency=2, capital_relation='at least')\n"
            "print(checker.check_following('I LOVE NLP'), checker.check_following('I love nlp'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path), "NLTK_DATA": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["3", "['I', 'LOVE', 'NLP', ',', 'do', \"n't\", 'you', '?']", "True False"]
    assert "Downloaded" not in done.stdout + done.stderr and "nltk_data" not in done.stderr
    assert (Path(sys.prefix) / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "collocations.tab").is_file()
