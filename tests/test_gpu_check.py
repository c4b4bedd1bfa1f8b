"""bench/gpu_check.sh, the one command a short GPU loan runs, exercised as far as a machine without a GPU allows:
`--dry-run` resolves the GPU node's environment (requirements-node.txt, the pipeline with vLLM) with pip's own
resolver against PyPI, and collects the tests marked gpu."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import REPO


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path / "out"), **env}, capture_output=True, text=True,
                          timeout=900, check=False)


def test_the_gpu_node_environment_resolves_with_vllm_and_the_gpu_tests_collect(tmp_path: Path) -> None:
    done = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "node-resolve.json").read_text())
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    # Independently of the script's summary: vLLM and the pipeline's training stack in one resolution.
    pins = dict(line.split("==") for line in (REPO / "requirements-node.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert resolved["vllm"] == pins["vllm"] and resolved["torch"] == pins["torch"]
    assert resolved["transformers"] == pins["transformers"]
    for name in ("peft", "trl", "bitsandbytes", "accelerate", "dvc", "pytest"):
        assert name in resolved, name
    assert "pins of requirements-node.txt honoured" in done.stdout
    assert "3 tests collected" in done.stdout and "test_real_qlora_on_a_1b_shaped_llama" in done.stdout
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("[gpu_check") >= 3


def test_a_node_environment_that_does_not_resolve_fails_the_check(tmp_path: Path) -> None:
    """The pipeline's own transformers pin beside vLLM: pip refuses, and so does the check."""
    bad = tmp_path / "requirements-node.txt"
    bad.write_text(f"-r {REPO / 'requirements-common.txt'}\ntorch==2.14.0\ntransformers==5.23.0\nvllm==0.33.0\n")
    done = dry_run(tmp_path, NODE_REQUIREMENTS=str(bad))
    assert done.returncode == 1 and "does not resolve" in done.stdout, done.stdout[-3000:]
    assert "transformers" in done.stdout and "Traceback" not in done.stderr
