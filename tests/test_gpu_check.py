"""bench/gpu_check.sh, the one command a short GPU loan runs, exercised as far as a machine without a GPU allows:
`--dry-run` resolves a GPU node's vLLM environment (requirements-vllm.txt: vllm, beside the pipeline's own
requirements.txt) with pip's own resolver against PyPI, and collects the tests marked gpu."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path / "out"), **env}, capture_output=True, text=True,
                          timeout=900, check=False)


@pytest.mark.slow
def test_the_gpu_vllm_environment_resolves_and_the_gpu_tests_collect(tmp_path: Path) -> None:
    done = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "vllm-resolve.json").read_text())
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    # Independently of the script's summary: vLLM (the CUDA build) with the torch and transformers it pins, which are
    # not the pipeline's (hence its own environment).
    pinned = (REPO / "requirements-vllm.txt").read_text().split("vllm==")[1].split()[0]
    assert resolved["vllm"] == pinned and resolved["torch"].startswith("2.13.0"), resolved
    pipeline = (REPO / "requirements.txt").read_text()
    assert f"transformers=={resolved['transformers']}\n" not in pipeline
    assert any(name.startswith("nvidia-") for name in resolved)  # the CUDA build
    assert "pins of requirements-vllm.txt honoured" in done.stdout
    assert "5 tests collected" in done.stdout and "test_real_qlora_on_a_1b_shaped_llama" in done.stdout
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("[gpu_check") >= 3


def test_a_vllm_environment_that_does_not_resolve_fails_the_check(tmp_path: Path) -> None:
    """vLLM beside the pipeline's own transformers pin: pip refuses, and so does the check (the reason vLLM has an
    environment of its own)."""
    bad = tmp_path / "requirements-vllm.txt"
    bad.write_text("transformers==5.23.0\nvllm==0.32.0\n")
    done = dry_run(tmp_path, VLLM_REQUIREMENTS=str(bad))
    assert done.returncode == 1 and "does not resolve" in done.stdout, done.stdout[-3000:]
    assert "transformers" in done.stdout and "Traceback" not in done.stderr
