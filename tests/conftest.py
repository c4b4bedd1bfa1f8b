"""Shared fixtures: offline environment, a tiny built-in model, and one CPU run of every stage's `main`."""

from __future__ import annotations

import ast
import contextlib
import itertools
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
from skytune.core.params import load_params
from skytune.core.vllm_server import ENV_VAR as VLLM_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
PATHS = load_params(REPO / "params.yaml").paths
STAGES = ("ingest", "self_replay", "to_chat", "split", "merge_data", "train", "preference", "merge_adapters", "sanity_check",
          "evaluate_base", "evaluate", "export")

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
# Under pytest-xdist, each worker and the stages it starts take their share of the cores (torch and OpenMP would
# otherwise start as many threads as there are cores in every process, and the workers would slow each other down).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# vLLM's environment (make vllm-env; make test builds it), for the stages run in temporary workspaces.
os.environ.setdefault(VLLM_ENV_VAR, str(REPO / PATHS.vllm_env))


# CI sets SKYTUNE_ALLOWED_SKIPS to the skips it accepts (a regex over the reasons: no GPU here, say); any other skip
# fails the run, so that an environment a fresh clone forgot to build cannot pass as green.
ALLOWED_SKIPS_ENV = "SKYTUNE_ALLOWED_SKIPS"


# A test that needs one of these runs stages of the pipeline (or a real model's conversion and training) first: it is
# `slow` whatever its own marks say, so `make test-fast` (-m "not slow") never waits for a pipeline run.
PIPELINE_RUNS = {"pipeline", "embedded_default", "family_run", "converted", "split_workspace"}


# Under pytest-xdist (`make test` runs two workers, --dist loadgroup) a test goes to its group's worker: every test
# that reads the real-model run is one group, so that run happens once per session rather than once per worker, and
# every other test stays with its module, whose module-scoped fixtures then run once.
SHARED_RUN_GROUP = "embedded_default"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if PIPELINE_RUNS & fixtures:
            item.add_marker(pytest.mark.slow)
        group = SHARED_RUN_GROUP if SHARED_RUN_GROUP in fixtures else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))


# Ports for the servers the tests start: each xdist worker scans a block of its own below the kernel's ephemeral
# range (where bind(0) and outgoing connections take theirs), so no other test process can take a port between the
# probe and the server's own bind.
PORT_BLOCK_START, PORT_BLOCK_SIZE = 20000, 1000
_next_ports = itertools.count()


def free_port() -> int:
    """A loopback port free now and picked by no other test process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    block = PORT_BLOCK_START + int(worker) * PORT_BLOCK_SIZE
    for _ in range(PORT_BLOCK_SIZE):
        port = block + next(_next_ports) % PORT_BLOCK_SIZE
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block}..{block + PORT_BLOCK_SIZE - 1}")


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
# Its engines are transformers' wherever the tests run (auto picks vLLM on a GPU node, and the tiny model's 16-wide
# attention heads are not ones vLLM serves); tests/test_vllm_engine.py and tests/test_serving.py run vLLM for real.
TINY_PROFILE = {"model": {"base": "builtin:tiny-llama"},
                "train": {"epochs": 10, "learning_rate": 0.003, "batch_size": 16, "total_batch_size": 16,
                          "lora_alpha": 32, "max_length": 256},
                "self_replay": {"engine": "transformers", "max_new_tokens": 16},
                "sanity_check": {"engine": "transformers"},
                "evaluate": {"limit": 8, "engine": "transformers",
                             "general_text": {"prompts": 4, "max_new_tokens": 32}},
                "export": {"parity": False}}


def direct_imports(path: Path, *, packages: bool = False) -> set[Path]:
    """The project modules a source file imports by name, anywhere in it (inside functions too): for `from a.b import
    c`, `a/b/c.py` when c is a module, else `a/b.py` or `a/b/__init__.py`. With `packages`, the package named in
    a `from` (whose __init__ runs first) is included as well."""
    src = REPO / "src"
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[tuple[str, ...]] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skytune"):
            names = [(f"{node.module}.{a.name}", node.module) for a in node.names]
            if packages:
                names.append((node.module,))
        elif isinstance(node, ast.Import):
            names = [(a.name,) for a in node.names if a.name.startswith("skytune")]
        for choices in names:  # the first name that is a module or package wins
            for name in choices:
                base = src / name.replace(".", "/")
                hit = next((c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()), None)
                if hit:
                    found.add(hit)
                    break
    return found


def tiny_profile(params: dict) -> dict:
    """`params` (params.yaml as a dict) switched to TINY_PROFILE, in place; returned."""
    for section, values in TINY_PROFILE.items():
        params[section].update(values)
    # The built-in model's own data: a random model's replayed answers teach nothing (tests/test_self_replay.py
    # runs the self_replay stage on it, and on the real model).
    params["data"]["sources"] = [s for s in params["data"]["sources"] if s["format"] != "self_replay"]
    return params


def copy_inputs(dest: Path) -> Path:
    """Copy what the pipeline reads (params.yaml in the tiny profile, the raw data, the prompts) into `dest`."""
    paths = PATHS
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

    from skytune.core.params import TrackedParams

    root = copy_inputs(tmp_path_factory.mktemp("pipeline"))
    run = PipelineRun(root)
    with contextlib.chdir(root):
        for stage in STAGES:
            tracked = TrackedParams(load_params())
            importlib.import_module(f"skytune.stages.{stage}").main(tracked)
            run.reads[stage] = tracked.reads
    return run


def sh(*args: str, cwd: Path, timeout: int = 900, stdout_only: bool = False) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def clone_project(dest: Path, *, tiny: bool = True) -> Path:
    """The project's tracked files, as they are in the working tree, committed in a fresh repository
    (untracked files are left out: they may be pipeline outputs of a run in the working tree); params.yaml in the
    tests' tiny profile unless `tiny` is False (the embedded default, a real model)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    if tiny:
        write_params(dest)
    sh("git", "init", "-q", "-b", "main", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "baseline", cwd=dest)
    return dest


# What the vLLM tests read of the embedded default's first run, kept as it was (the IFEval and destructive
# experiments of test_pipeline_e2e.py later rewrite the workspace's copies).
EMBEDDED_OUTPUTS = (PATHS.base_model_dir, PATHS.merged_dir, PATHS.export_dir, PATHS.val_file, PATHS.sanity_prompts,
                    PATHS.retained_prompts, PATHS.sanity_results, PATHS.sanity_metrics, PATHS.eval_metrics,
                    PATHS.base_scores_dir, "params.yaml")


@dataclass(frozen=True)
class EmbeddedDefault:
    """A clone of the project in which `dvc exp run` ran the embedded default (what `make run` runs: the real
    SmolLM2-135M-Instruct, QLoRA on the CPU), its log, and `snapshot`: EMBEDDED_OUTPUTS as that run left them."""

    repo: Path
    log: str
    snapshot: Path


@pytest.fixture(scope="session")
def embedded_default(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedDefault:
    root = tmp_path_factory.mktemp("embedded-default")
    repo = clone_project(root / "project", tiny=False)
    log = sh("dvc", "exp", "run", cwd=repo, timeout=1800)
    snapshot = root / "snapshot"
    for name in EMBEDDED_OUTPUTS:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if (repo / name).is_dir():  # DVC replaces an output directory's files when a stage writes them again
            shutil.copytree(repo / name, snapshot / name, copy_function=os.link)
        else:  # a copy: `dvc exp run -S` edits params.yaml in place, which a hard link would follow
            shutil.copy2(repo / name, snapshot / name)
    return EmbeddedDefault(repo, log, snapshot)


# The user's own buckets (the project names none): the DVC remote the tests' origin commits, what make publish-model
# fills for serve.yaml, and $CHECKPOINT_BUCKET.
BUCKETS = ("my-dvc", "my-models", "my-checkpoints")


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[dict[str, str]]:
    """A real S3-compatible server on loopback: `rclone serve s3` (the rclone SkyPilot's MOUNT_CACHED uses), serving
    `root`, in which each sub-directory is a bucket (BUCKETS are made). Yields the environment a client needs."""
    for bucket in BUCKETS:
        (root / bucket).mkdir(parents=True)
    port = free_port()
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


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`s3_server` for one test."""
    with s3_server(tmp_path / "s3") as env:
        yield env


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
