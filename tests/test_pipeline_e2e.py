"""The real DAG through `dvc exp run`, in a temporary git clone of the project, on CPU."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PATHS, STAGES, EmbeddedDefault, PipelineRun, clone_project, sh

from skytune.stages import DATA_STAGES

DATA_OUTPUTS = tuple(getattr(PATHS, k) for k in ("ingested_dir", "replay_dir", "chat_dir", "split_dir", "train_file",
                                                 "val_file", "preference_dir"))


def stages_ran(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def digest_tree(root: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name in names:
        path = root / name
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file():
                files[str(f.relative_to(root))] = f.read_bytes()
    return files


@dataclass(frozen=True)
class Experiments:
    """A clone in which `dvc exp run` ran the DAG (baseline-run), then an experiment (rank16), then a rebuild of the
    deleted merged model; with what each step logged and measured."""

    repo: Path
    baseline_log: str
    experiment_log: str
    rebuild_log: str
    cache_growth: int
    lock_before_rebuild: str
    lock_after_rebuild: str
    dpo_log: str
    beta_log: str


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory) -> Experiments:
    repo = clone_project(tmp_path_factory.mktemp("e2e") / "project")
    baseline = sh("dvc", "exp", "run", "-n", "baseline-run", cwd=repo)
    cache_before = tree_bytes(repo / ".dvc" / "cache")
    experiment = sh("dvc", "exp", "run", "-n", "rank16", "-S", "train.lora_r=16", cwd=repo)
    growth = tree_bytes(repo / ".dvc" / "cache") - cache_before
    lock = (repo / "dvc.lock").read_text()
    shutil.rmtree(repo / PATHS.merged_dir)
    rebuild = sh("dvc", "repro", cwd=repo)
    rebuilt_lock = (repo / "dvc.lock").read_text()
    dpo = sh("dvc", "exp", "run", "-n", "dpo", "-S", "preference.method=dpo", cwd=repo)
    beta = sh("dvc", "exp", "run", "-n", "dpo-beta", "-S", "preference.beta=0.2", cwd=repo)
    return Experiments(repo, baseline, experiment, rebuild, growth, lock, rebuilt_lock, dpo, beta)


@pytest.mark.slow
def test_dvc_exp_run_end_to_end_then_an_experiment(experiments: Experiments, pipeline: PipelineRun) -> None:
    repo = experiments.repo
    assert stages_ran(experiments.baseline_log) == list(STAGES), experiments.baseline_log[-3000:]
    sanity = json.loads((repo / PATHS.sanity_metrics).read_text())
    assert sanity["identity_exact_match_tuned"] == 1.0 and sanity["identity_exact_match_base"] == 0.0
    train = json.loads((repo / PATHS.train_metrics).read_text())
    assert train["val_loss_after"] < train["val_loss_before"]
    assert sh("git", "status", "--porcelain", "dvc.yaml", cwd=repo) == ""  # DVCLive left dvc.yaml alone

    # Two runs from scratch (the fixture's and this one) give byte-identical data outputs.
    ours, theirs = digest_tree(repo, DATA_OUTPUTS), digest_tree(pipeline.root, DATA_OUTPUTS)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    assert [k for k in ours if ours[k] != theirs[k]] == []

    # The experiment re-scores the tuned model only: the base's scores depend on nothing it changed.
    assert stages_ran(experiments.experiment_log) == ["train", "preference", "merge_adapters", "sanity_check",
                                                      "evaluate", "export"]
    assert "Stage 'evaluate_base' didn't change, skipping" in experiments.experiment_log
    # Preference training, switched on and then tuned, re-runs its stage and the later ones, never SFT.
    for log in (experiments.dpo_log, experiments.beta_log):
        assert stages_ran(log) == ["preference", "merge_adapters", "sanity_check", "evaluate", "export"], log[-3000:]
        assert "Stage 'train' didn't change, skipping" in log
    # What an experiment costs: the cache grows by about its adapter and metrics, never by a merged model.
    record = tree_bytes(repo / PATHS.adapter_dir) + sum(tree_bytes(repo / p) for p in (
        PATHS.train_metrics, PATHS.merge_metrics, PATHS.sanity_metrics, PATHS.export_metrics, PATHS.dvclive_dir))
    assert 0 < experiments.cache_growth <= 1.2 * record, (experiments.cache_growth, record)
    merged = (repo / PATHS.merged_dir / "model.safetensors").read_bytes()
    copies = [f for f in [*repo.rglob("*.safetensors"), *(repo / ".dvc" / "cache").rglob("*")]
              if f.is_file() and f.stat().st_size == len(merged) and f.read_bytes() == merged]
    assert copies == [repo / PATHS.merged_dir / "model.safetensors"]  # one copy: not in the export nor the cache
    assert sh("git", "check-ignore", PATHS.merged_dir, cwd=repo).strip() == PATHS.merged_dir

    # The merged model is rebuilt byte-identical from the base and the adapter (make merged): dvc.lock unchanged,
    # and no later stage runs again.
    log = experiments.rebuild_log
    assert stages_ran(log) == ["merge_adapters"], log[-3000:]
    assert experiments.lock_after_rebuild == experiments.lock_before_rebuild
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in log

    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo, stdout_only=True))
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[exp["name"]] = (data["params"]["params.yaml"]["data"], data["metrics"])
    assert set(found) >= {"baseline-run", "rank16", "dpo", "dpo-beta"}
    assert found["dpo-beta"][0]["preference"] == {**found["dpo"][0]["preference"], "beta": 0.2}
    assert found["baseline-run"][1][PATHS.preference_metrics]["data"] == {"method": "none"}
    for name in ("dpo", "dpo-beta"):  # the val pairs' scores, before and after, are experiment columns
        data = found[name][1][PATHS.preference_metrics]["data"]
        assert data["method"] == "dpo" and data["val_pairs"] > 0 and "val_preference_accuracy_after" in data
    assert found["baseline-run"][0]["train"]["lora_r"] == 8
    assert found["rank16"][0]["train"]["lora_r"] == 16
    for _params, metrics in found.values():
        assert metrics[PATHS.sanity_metrics]["data"]["identity_exact_match_tuned"] == 1.0
        assert "val_loss_after" in metrics[PATHS.train_metrics]["data"]
    # Per task and metric, base, tuned and delta are experiment columns; both experiments share the one base score.
    base_scores = json.loads((repo / PATHS.base_scores_dir / "scores.json").read_text())["tasks"]
    assert set(base_scores) == {"skytune_knowledge", "skytune_choice"}
    for task, scores in base_scores.items():
        for metric, value in scores.items():
            for name in ("baseline-run", "rank16"):
                entry = found[name][1][PATHS.eval_metrics]["data"]["tasks"][task][metric]
                assert entry["base"] == round(value, 4) and entry["delta"] == round(entry["tuned"] - entry["base"], 4)
                assert 0.0 <= entry["tuned"] <= 1.0 and isinstance(entry["forgot"], bool)
                # The paired test of the same questions: 0/1 scores, so McNemar's; its p-value and interval columns.
                assert entry["test"] == "mcnemar_exact" and 0.0 < entry["p_value"] <= 1.0, entry
                assert entry["ci_low"] <= entry["delta"] <= entry["ci_high"], entry

    summary = sh(sys.executable, "-m", "skytune.face.cli", "summary", cwd=repo)  # what `make run` ends with
    assert "rank16" in summary and "identity_exact_match   0.0 -> 1.0" in summary
    assert "benchmarks (lm-eval" in summary and "skytune_choice acc " in summary
    assert re.search(r"skytune_choice acc +[\d.]+( -> [\d.]+ \(control\))? -> [\d.]+ \(training [+-][\d.]+, "
                     r"p=[\d.]+\)", summary), summary
    assert PATHS.sanity_report in summary


IFEVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval" / "input_data.jsonl"
IFEVAL_LIMIT = 8  # prompt 7 asks for capital words twice: NLTK's word tokenizer (punkt_tab) scores it


def run_ifeval_offline(repo: Path) -> None:
    """lm-eval's own IFEval (its task YAML, prompts template and scorer) on the embedded default's base, control and
    tuned model, offline: its dataset pointed at the 541 prompts in ../shared/data (read there, never copied into
    the project; a user online names the registry's `ifeval`). Only the evaluate stages run. The workspace is then
    put back as the default run left it."""
    import lm_eval

    if not IFEVAL_DATA.is_file():  # a clone outside CI: the real-model test still runs the rest, and says so
        warnings.warn(f"{IFEVAL_DATA} is absent: IFEval was not run on the embedded default", stacklevel=2)
        return
    saved = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    task = repo / PATHS.eval_tasks_dir / "ifeval_shared"
    task.mkdir()
    (task / "ifeval_shared.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / 'ifeval' / 'ifeval.yaml'}\ntask: ifeval_shared\n"
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {IFEVAL_DATA}\n")
    log = sh("dvc", "exp", "run", "-n", "ifeval", "-S", "evaluate.tasks=[ifeval_shared]", "-S",
             f"evaluate.limit={IFEVAL_LIMIT}", "-S", "evaluate.max_gen_toks=64", "evaluate", cwd=repo, timeout=1800)
    assert stages_ran(log) == ["evaluate_base", "evaluate"], log[-3000:]
    evaluated = json.loads((repo / PATHS.eval_metrics).read_text())
    scores = evaluated["tasks"]["ifeval_shared"]
    assert evaluated["examples"] == {"ifeval_shared": IFEVAL_LIMIT} and evaluated["control"] == "dequantized nf4"
    assert scores.keys() == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                             "inst_level_loose_acc"}
    for metric, entry in scores.items():
        assert all(0.0 <= entry[m] <= 1.0 for m in ("base", "control", "tuned")), (metric, entry)
        # A prompt is followed or not (McNemar); an instruction-level score is all instructions' mean, each prompt
        # holding several (a paired bootstrap over prompts).
        assert entry["test"] == ("mcnemar_exact" if metric.startswith("prompt") else "paired_bootstrap"), entry
    instructions = [len(json.loads(line)["instruction_id_list"])
                    for line in IFEVAL_DATA.read_text(encoding="utf-8").splitlines()[:IFEVAL_LIMIT]]
    base = json.loads((repo / PATHS.base_scores_dir / "scores.json").read_text())["items"]["ifeval_shared"]
    assert base["ids"] == [f"ifeval_shared/{i}" for i in range(IFEVAL_LIMIT)]
    assert [count for _, count in base["metrics"]["inst_level_strict_acc"]] == instructions
    shutil.rmtree(task)
    for name, content in saved.items():
        (repo / name).write_bytes(content)
    sh("dvc", "checkout", "--force", cwd=repo)


@pytest.fixture(scope="module")
def report_page(experiments: Experiments) -> Path:
    out = sh(sys.executable, "-m", "skytune.face.report", "baseline-run", "rank16", cwd=experiments.repo)
    assert "report/index.html" in out
    return experiments.repo / PATHS.report_dir / "index.html"


@pytest.mark.slow
def test_the_report_page_opens_with_the_summary_then_the_answers(report_page: Path) -> None:
    """DVC's own plots of both experiments, rendered offline, titled in words, after the summary and the answers."""
    page = report_page.read_text()
    summary, answers, plots, metrics = (page.index(f"<h2 id='{h}'>") for h in ("summary", "answers", "plots",
                                                                                "metrics"))
    assert summary < answers < plots < metrics
    head = page[summary:answers]
    assert "<th>base</th><th>tuned: baseline-run</th><th>tuned: rank16</th>" in head
    assert ("<tr><td>identity: answers as identity.name / creator</td><td class='num'>0</td>"
            "<td class='num'>1</td><td class='num'>1</td></tr>") in head
    assert "<th>tuned: baseline-run</th><th>tuned: rank16</th>" in page[answers:plots]
    assert "I was created by the SkyTune team." in page[answers:plots]
    figures = page[plots:metrics]
    assert figures.count("<svg") >= 7 and "dvclive/plots" not in figures  # titles in words, not file paths
    loss = figures.split("<figcaption>Loss (training)</figcaption>")[0].rsplit("<svg", 1)[1]
    assert "baseline-run" in loss and "rank16" in loss  # one curve per experiment
    assert "optimizer step" in loss and "Loss (training)" in loss  # the axis and the title, drawn in the SVG
    assert "<figcaption>Answer length per prompt" in figures  # dvc.yaml's own title for the sanity plot
    bars = figures.split("<figcaption>Benchmark scores, base vs tuned")[0].rsplit("<svg", 1)[1]
    assert "skytune_choice acc (base)" in bars and "skytune_choice acc (tuned)" in bars
    assert "<tr><td>benchmark: skytune_choice acc</td>" in head
    choice_row = head.split("<tr><td>benchmark: skytune_choice acc</td>")[1].split("</tr>")[0]
    assert choice_row.count(" <small>p=") == 2  # each experiment's paired test beside its score
    assert "<tr><td>sanity.identity_exact_match_tuned</td><td class='num'>1</td><td class='num'>1</td></tr>" in page
    assert "cdn" not in page.lower() and "<script" not in page  # opens anywhere, offline


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="chromium is not installed (.ci/run installs it)")
def test_the_report_page_renders_in_headless_chromium(report_page: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = Path(os.environ.get("SKYTUNE_REPORT_SHOT") or tmp_path / "report.png")  # set it to look at the page
    browse = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,3000"]
    sh(*browse, f"--screenshot={shot}", report_page.as_uri(), cwd=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000  # drawn, not blank
    dom = sh(*browse, "--dump-dom", report_page.as_uri(), cwd=tmp_path, stdout_only=True)
    assert dom.count("<svg") >= 7 and "tuned: rank16" in dom and dom.index("Summary") < dom.index("<svg")


@pytest.mark.slow
def test_self_replay_on_the_real_model_is_what_transformers_generates(embedded_default: EmbeddedDefault) -> None:
    """SmolLM2-135M-Instruct's own answers to the first replay prompts, against transformers' generate one prompt at a
    time (its chat template, its <|im_end|>); most of them stop within self_replay.max_new_tokens."""
    from test_self_replay import check_replay

    counts = check_replay(embedded_default.repo, source="self_replay", stop_tokens=["<|im_end|>"], limit=6)
    assert counts["prompts"] == 119 and counts["answers"] >= 50 and counts["rejected"] == 0, counts  # 62 measured


@pytest.mark.slow
def test_the_embedded_default_a_real_model_learns_its_identity_stops_and_keeps_what_it_knew(
        embedded_default: EmbeddedDefault) -> None:
    """`make run`'s pipeline as it is: SmolLM2-135M-Instruct from its GGUF, QLoRA NF4 on the CPU, the sample data."""
    repo, log = embedded_default.repo, embedded_default.log
    assert stages_ran(log) == list(STAGES), log[-3000:]
    base = json.loads((repo / PATHS.base_model_dir / "base_model.json").read_text())
    assert base["kind"] == "gguf" and base["gguf"]["quantization"] == "Q4_1"
    assert json.loads((repo / PATHS.train_metrics).read_text())["quantization"] == "nf4"
    sanity = json.loads((repo / PATHS.sanity_metrics).read_text())
    assert sanity["identity_exact_match_base"] == 0.0 and sanity["identity_exact_match_tuned"] >= 0.9, sanity
    assert sanity["ends_with_eot_tuned"] >= 0.95, sanity
    # Retained is reported on the probes' held-out half (20 of the 42; core.evaluation.holdout): the base knows 15
    # of them. Thresholds from the spread over seeds 42 (the default), 1, 2 and 3 on this 2-core machine: identity
    # and ends_with_eot 1.0 on every seed; over all 33 known probes the tuned model kept 31, 31, 29 and 29, so at
    # worst 4 misses, 11 of the 15 held-out ones if all fell there (0.73): the bound sits below that worst case.
    # Knowledge delta -0.029, 0.0, -0.014, -0.029 (one question is 0.029) on all 70 questions: the bound sits ~2.5
    # questions below the worst. (python bench/seed_spread.py reruns them.)
    assert sanity["retained"] >= 0.7 and sanity["retained_probes_base_correct"] >= 12, sanity
    with open(repo / PATHS.sanity_results, encoding="utf-8") as fh:
        retained = [r for r in csv.DictReader(fh) if r["kind"] == "retained"]
    known = [r for r in retained if r["half"] == "heldout" and r["base_match"] == "True"]
    assert sanity["retained_probes_base_correct"] == len(known)
    assert sanity["retained"] == round(sum(r["tuned_match"] == "True" for r in known) / len(known), 4)
    dev = [r for r in retained if r["half"] == "dev" and r["base_match"] == "True"]
    assert sanity["retained_dev_probes_base_correct"] == len(dev) and len(dev) + len(known) >= 28
    assert sanity["val_perplexity_tuned"] < sanity["val_perplexity_base"]
    summary = sh(sys.executable, "-m", "skytune.face.cli", "summary", cwd=repo)
    assert "retained" in summary and "identity_exact_match" in summary
    benchmarks = json.loads((repo / PATHS.eval_metrics).read_text())
    assert benchmarks["tasks"]["skytune_choice"]["acc"]["base"] >= 0.5, benchmarks  # a real model, above chance
    # The default run keeps its knowledge answers (measured on all 70 questions: 0.63 -> 0.60, -2 questions at worst
    # over four seeds; on the 29 held-out ones, if both fell there, -0.069): not flagged, and the bound sits more
    # than two questions below that worst case.
    knowledge = benchmarks["tasks"]["skytune_knowledge"]["answer_match"]
    assert knowledge["training"] >= -0.15 and knowledge["forgot"] is False, benchmarks

    run_ifeval_offline(repo)

    # A deliberately destructive run: identity only, a learning rate 20x too high, one epoch. Only what
    # evaluate needs runs (the base is not scored again), and every score is flagged (measured: choice acc 0.74 -> 0.24,
    # knowledge 0.63 -> 0.0, general-text perplexity 2.0 -> 2e8).
    log = sh("dvc", "exp", "run", "-n", "destroy", "-S", "train.learning_rate=0.02", "-S", "train.epochs=1",
             "-S", "merge_data.mixture.sharegpt_math.rows=0", "-S", "+merge_data.mixture.alpaca_tasks={rows: 0}",
             "-S", "+merge_data.mixture.self_replay={rows: 0}", "evaluate", cwd=repo, timeout=1800)
    assert stages_ran(log) == ["merge_data", "train", "preference", "merge_adapters", "evaluate"], log[-3000:]
    destroyed = json.loads((repo / PATHS.eval_metrics).read_text())
    scores = {f"{task}.{metric}": entry for task, metrics in destroyed["tasks"].items()
              for metric, entry in metrics.items()} | {"general_text.perplexity": destroyed["general_text"]["perplexity"]}
    assert len(scores) == 4 and [k for k, e in scores.items() if e["forgot"] is not True] == [], destroyed
    assert destroyed["forgetting"] is True and destroyed["regressions"] == len(scores), destroyed
    assert all(e["tuned"] < e["base"] for k, e in scores.items() if k != "general_text.perplexity"), destroyed
    assert scores["general_text.perplexity"]["tuned"] > benchmarks["general_text"]["perplexity"]["tuned"]
    assert "Stage 'evaluate_base' didn't change, skipping" in log
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo, stdout_only=True))
    columns = {exp["name"]: rev["data"]["metrics"][PATHS.eval_metrics]["data"]["tasks"]
               for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]}
    assert columns["destroy"] == destroyed["tasks"]  # per task and metric: base, tuned, delta (dvc exp show columns)
    assert {"base", "tuned", "delta"} <= columns["destroy"]["skytune_choice"]["acc"].keys()
