"""Training survives preemption: SIGKILL after a checkpoint, SIGTERM, a damaged newest checkpoint; every resumed run
ends where an uninterrupted one does. The train stage runs as DVC runs it, through the launcher, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PipelineRun, write_params

from skytune.core.training import checkpoints

TIMEOUT = 300


def workspace(pipeline: PipelineRun, root: Path) -> Path:
    """The train stage's inputs (base model, train and val data) with a short, frequently checkpointed run."""
    for item in ("models/base", "data/train.jsonl", "data/val.jsonl"):
        target = root / item
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (pipeline.root / item).is_dir() else shutil.copy2
        copy(pipeline.root / item, target)

    def edit(params: dict) -> None:
        params["train"].update(epochs=3, save_steps=20, eval_steps=30, logging_steps=5, save_total_limit=2)

    write_params(root, edit)
    return root


def start(root: Path, **env: str) -> subprocess.Popen:
    log = (root / "train.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "skytune.core.processes", "skytune.stages.train"], cwd=root,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def finish(root: Path, **env: str) -> int:
    return start(root, **env).wait(TIMEOUT)


def complete_steps(root: Path) -> list[int]:
    return sorted(checkpoints.step_of(p.parent) for p in root.glob(f"models/checkpoints/*/*/{checkpoints.MARKER}"))


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, after: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        steps = [s for s in complete_steps(root) if s > after]
        if steps:
            return steps[0]
        assert proc.poll() is None, (root / "train.log").read_text()[-3000:]
        time.sleep(0.02)
    raise TimeoutError("no checkpoint")


def metrics(root: Path) -> dict:
    return json.loads((root / "metrics/train.json").read_text())


def logged(root: Path, name: str) -> list[tuple[int, float]]:
    lines = (root / "dvclive/plots/metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [(int(step), float(value)) for step, value in (line.split("\t") for line in lines)]


@pytest.fixture(scope="module")
def uninterrupted(pipeline: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = workspace(pipeline, tmp_path_factory.mktemp("uninterrupted"))
    assert finish(root) == 0, (root / "train.log").read_text()[-3000:]
    return root


def test_killed_and_preempted_runs_resume_and_match_an_uninterrupted_run(
        pipeline: PipelineRun, uninterrupted: Path, tmp_path: Path) -> None:
    root = workspace(pipeline, tmp_path)
    # 1. SIGKILL (no warning at all) after the first checkpoint.
    proc = start(root)
    first = wait_for_checkpoint(root, proc, after=0)
    proc.kill()
    proc.wait(TIMEOUT)
    # 2. Restart: it resumes; SIGTERM (a spot preemption notice) after its next checkpoint.
    proc = start(root)
    second = wait_for_checkpoint(root, proc, after=first)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == checkpoints.PREEMPTED_EXIT_CODE
    stopped_at = complete_steps(root)[-1]
    assert stopped_at >= second and not (root / "models/adapter").exists()  # saved, and no final output yet
    assert "resuming from" in (root / "train.log").read_text()
    # 3. Restart: it resumes from the SIGTERM checkpoint and finishes.
    assert finish(root) == 0, (root / "train.log").read_text()[-3000:]
    resumed, baseline = metrics(root), metrics(uninterrupted)
    assert resumed["resumed_from_step"] == stopped_at > 0
    assert resumed["steps"] == baseline["steps"]
    assert abs(resumed["val_loss_after"] - baseline["val_loss_after"]) < 1e-4
    for name in ("train/loss", "eval/loss"):  # every step logged once, with the uninterrupted run's values
        ours, theirs = logged(root, name), logged(uninterrupted, name)
        assert [s for s, _ in ours] == [s for s, _ in theirs]
        # The Trainer logs the mean loss since its last log: the first train/loss after a resume from a step off
        # the logging grid (SIGTERM struck mid-interval) averages fewer steps. Every other point is identical.
        window = next(s for s, _ in ours if s > stopped_at) if name == "train/loss" else None
        assert max(abs(a - b) for (s, a), (_, b) in zip(ours, theirs, strict=True) if s != window) < 1e-4


def test_a_finished_run_leaves_no_checkpoint(uninterrupted: Path) -> None:
    assert complete_steps(uninterrupted) == []
    assert "removed its checkpoints" in (uninterrupted / "train.log").read_text()


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(pipeline: PipelineRun, uninterrupted: Path,
                                                                  tmp_path: Path) -> None:
    root = workspace(pipeline, tmp_path)
    proc = start(root)
    older = wait_for_checkpoint(root, proc, after=0)
    newest = wait_for_checkpoint(root, proc, after=older)
    proc.kill()
    proc.wait(TIMEOUT)
    damaged = next(root.glob(f"models/checkpoints/*/checkpoint-{newest}"))
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # torn mid-write
    assert checkpoints.check(damaged) is not None
    assert finish(root) == 0, (root / "train.log").read_text()[-3000:]
    assert f"checkpoint-{newest}: " in (root / "train.log").read_text().split("skipping checkpoint", 1)[1]
    resumed = metrics(root)
    assert resumed["resumed_from_step"] == older
    assert abs(resumed["val_loss_after"] - metrics(uninterrupted)["val_loss_after"]) < 1e-4


def test_checkpoints_of_other_inputs_are_never_resumed(pipeline: PipelineRun, tmp_path: Path) -> None:
    root = workspace(pipeline, tmp_path)
    proc = start(root)
    wait_for_checkpoint(root, proc, after=0)
    proc.kill()
    proc.wait(TIMEOUT)
    before = {p.parent.parent for p in root.glob(f"models/checkpoints/*/*/{checkpoints.MARKER}")}
    write_params(root, lambda p: p["train"].update(epochs=3, save_steps=20, eval_steps=30, learning_rate=0.001))
    assert finish(root) == 0, (root / "train.log").read_text()[-3000:]
    assert metrics(root)["resumed_from_step"] == 0
    after = {p.parent.parent for p in root.glob(f"models/checkpoints/*/*/{checkpoints.MARKER}")}
    assert len(before) == 1 and after == before  # the killed run's directory stays; the new one finished and went


def test_a_preempted_dvc_run_exits_with_the_preemption_code(pipeline: PipelineRun, tmp_path: Path) -> None:
    """Through real DVC: `dvc repro` alone would report 255; `skytune.face.cli preemptible` turns it into 75."""
    root = workspace(pipeline, tmp_path)
    (root / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python -m skytune.core.processes skytune.stages.train\n"
        "    deps: [data/train.jsonl, data/val.jsonl, models/base]\n    outs: [models/adapter]\n")
    dvc = str(Path(sys.executable).with_name("dvc"))
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], ["git", *identity, "add", "dvc.yaml", "params.yaml"],
                    ["git", *identity, "commit", "-qm", "pipeline"]):
        subprocess.run(command, cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    log = (root / "train.log").open("ab")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the stage's `python` is ours
    proc = subprocess.Popen([sys.executable, "-m", "skytune.face.cli", "preemptible", "--", dvc, "repro", "train"],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PATH": path})
    first = wait_for_checkpoint(root, proc, after=0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == checkpoints.PREEMPTED_EXIT_CODE, (root / "train.log").read_text()[-3000:]
    stopped_at = complete_steps(root)[-1]
    assert stopped_at > first and not (root / "models/adapter").exists()

    # The relaunch resumes and finishes; then `dvc repro -f` (as `dvc exp run -f`) trains again from step 0, never
    # passing the finished run's last checkpoint off as a new result.
    env = {**os.environ, "PATH": path}
    for forced, resumed in (([], stopped_at), (["-f"], 0)):
        done = subprocess.run([dvc, "repro", *forced, "train"], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = metrics(root)
        assert (result["resumed_from_step"], result["steps_this_run"]) == (resumed, result["steps"] - resumed)
        assert complete_steps(root) == []
