"""Shared fixtures: offline environment, a tiny built-in model, and one CPU run of every stage's `main`."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from skytune.core.models.builtin import build_builtin

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "to_chat", "split", "merge_data", "train", "merge_adapters", "sanity_check", "evaluate_base",
          "evaluate", "export")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars only clutter test logs
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# GGUF bases are converted once per machine into this cache (gguf); tests share one per machine, and the GGUF
# tests make their own.
os.environ.setdefault("SKYTUNE_CACHE", str(Path(tempfile.gettempdir()) / "skytune-test-cache"))


# CI sets SKYTUNE_ALLOWED_SKIPS to the skips it accepts (a regex over the reasons: no GPU here, say); any other skip
# fails the run, so that an environment a fresh clone forgot to build cannot pass as green.
ALLOWED_SKIPS_ENV = "SKYTUNE_ALLOWED_SKIPS"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import re

    allowed = os.environ.get(ALLOWED_SKIPS_ENV)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if allowed is None or reporter is None:
        return
    unexpected = [r for r in reporter.stats.get("skipped", []) if not re.search(allowed, str(r.longrepr))]
    for report in unexpected:
        reporter.write_line(f"skip not allowed in this run ({ALLOWED_SKIPS_ENV}): {report.nodeid}: {report.longrepr}")
    if unexpected:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The fast profile of the bulk of the tests: the built-in random 2-layer model, with the settings it learns its
# identity with in seconds. params.yaml's embedded default is a real 135M model (SmolLM2-135M-Instruct); one slow
# test runs it end to end (test_pipeline_e2e.py), the family tests run real tokenizers (test_real_families.py).
TINY_PROFILE = {"model": {"base": "builtin:tiny-llama"},
                "train": {"epochs": 10, "learning_rate": 0.002, "lora_alpha": 32, "max_length": 256},
                "evaluate": {"limit": 8, "general_text": {"prompts": 4, "max_new_tokens": 32}}}


def tiny_profile(params: dict) -> dict:
    """`params` (params.yaml as a dict) switched to TINY_PROFILE, in place; returned."""
    for section, values in TINY_PROFILE.items():
        params[section].update(values)
    return params


def copy_inputs(dest: Path) -> Path:
    """Copy what the pipeline reads (params.yaml in the tiny profile, the raw data, the prompts) into `dest`."""
    from skytune.core.params import load_params

    paths = load_params(REPO / "params.yaml").paths
    dest.mkdir(parents=True, exist_ok=True)
    write_params(dest)
    shutil.copytree(REPO / paths.raw_dir, dest / paths.raw_dir)
    for prompts in (paths.sanity_prompts, paths.retained_prompts, paths.general_prompts, paths.lm_eval_pin):
        (dest / prompts).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / prompts, dest / prompts)
    shutil.copytree(REPO / paths.eval_tasks_dir, dest / paths.eval_tasks_dir)
    return dest


def write_params(root: Path, edit: Callable[[dict], object] = lambda params: None, *, tiny: bool = True) -> Path:
    """Write the repository's params.yaml into `root` (in TINY_PROFILE unless `tiny` is False), changed by `edit`
    (which mutates the loaded dict)."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if tiny:
        tiny_profile(params)
    edit(params)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stages(root: Path, *stages: ModuleType) -> None:
    """Run stage modules' `main` in `root`, each on params.yaml as it is there, as `python -m` would."""
    from skytune.core.params import load_params

    with contextlib.chdir(root):
        for stage in stages:
            stage.main(load_params())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model built from a small corpus: a random 2-layer Llama with a local BPE tokenizer."""

    out = tmp_path_factory.mktemp("tiny-model")
    corpus = [f"{w} {i} plus {i + 1} is {2 * i + 1}." for i in range(200) for w in ("hello", "what", "who")]
    build_builtin(out, corpus, vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=256, seed=0)
    return out


@dataclass
class PipelineRun:
    """A workspace in which every stage's `main` ran once, in DAG order, with the params each one read."""

    root: Path
    reads: dict[str, set[str]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """Run every stage on the embedded default, on CPU, recording which params each stage reads."""
    import importlib

    from skytune.core.params import TrackedParams, load_params

    root = copy_inputs(tmp_path_factory.mktemp("pipeline"))
    run = PipelineRun(root)
    with contextlib.chdir(root):
        for stage in STAGES:
            tracked = TrackedParams(load_params())
            importlib.import_module(f"skytune.stages.{stage}").main(tracked)
            run.reads[stage] = tracked.reads
    return run


# The user's own buckets (the project names none): the DVC remote the tests' origin commits, what make publish-model
# fills for serve.yaml, and $CHECKPOINT_BUCKET.
BUCKETS = ("my-dvc", "my-models", "my-checkpoints")


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real S3-compatible server on loopback: `rclone serve s3` (the rclone SkyPilot's MOUNT_CACHED uses), serving
    a directory in which each sub-directory is a bucket. Yields the environment a client needs."""
    root = tmp_path / "s3"
    for bucket in BUCKETS:
        (root / bucket).mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "rclone"), "serve", "s3", "--auth-key",
                               "AKSKYTUNE,sky-secret", "--addr", f"127.0.0.1:{port}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    try:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKSKYTUNE",
               "AWS_SECRET_ACCESS_KEY": "sky-secret", "S3_ROOT": str(root)}
    finally:
        server.terminate()
        server.wait(timeout=10)


def trained_runs(encoded: Any) -> list[str]:
    """The trained text of an encoded sequence (`tokenization.Encoded`), as maximal runs of trained characters:
    read from its labels and offsets here, not from the code that renders the samples."""
    runs: list[list[int]] = []
    for (a, b), label in zip(encoded.offsets, encoded.labels, strict=True):
        if label == -100 or a == b:
            continue
        if runs and a <= runs[-1][1]:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return [encoded.text[a:b] for a, b in runs]
