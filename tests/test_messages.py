"""Expected failures read as messages: each one, run as a user runs it (`python -m ...` in a workspace), exits
non-zero with one `error:` message saying what failed, where and what to do, and no Python traceback;
SKYTUNE_DEBUG=1 brings the traceback back."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, PipelineRun, copy_inputs, write_params
from test_resume import workspace


def run(root: Path, *module: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *module], cwd=root, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600, check=False)


def assert_message(done: subprocess.CompletedProcess, *expected: str) -> str:
    """One `error:` message holding every `expected` piece, a non-zero exit, no traceback anywhere."""
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert done.stderr.count("error: ") == 1, done.stderr[-3000:]
    message = done.stderr[done.stderr.index("error: "):]
    for piece in expected:
        assert piece in message, message
    return message


def test_bad_params(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    write_params(root, lambda p: p["train"].update(lora_rank=16))
    line = next(i for i, text in enumerate((root / "params.yaml").read_text().splitlines(), 1) if "lora_rank" in text)
    done = run(root, "skytune.stages.split")
    assert_message(done, f"params.yaml:{line} train.lora_rank: unknown key; did you mean 'train.lora_r'?")
    assert done.returncode == 2


def test_a_failed_gate(pipeline: PipelineRun, tmp_path: Path) -> None:
    """Training data longer than train.max_length (merge_data ran with another one): the gate stops train."""
    root = workspace(pipeline, tmp_path)
    write_params(root, lambda p: p["train"].update(max_length=32))
    assert_message(run(root, "skytune.core.processes", "skytune.stages.train"), "the tokenization gate failed",
                   "too_long")


def test_a_source_over_the_reject_threshold(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    (root / "data/raw/alpaca_tasks.jsonl").write_text('{"instruction": "Say hi.", "input": "", "output": "hi"}\n'
                                                      + '{"instruction": ["not", "text"], "output": "x"}\n' * 3)
    write_params(root, lambda p: p["data"].update(on_invalid="skip", max_reject_fraction=0.5))
    assert run(root, "skytune.stages.ingest").returncode == 0
    done = run(root, "skytune.stages.to_chat")
    assert_message(done, "source alpaca_tasks: 3 of 4 rows rejected", "data.max_reject_fraction=0.5",
                   "alpaca_tasks.jsonl:2", "raise data.max_reject_fraction")


@pytest.fixture
def hub_that_knows_nothing() -> Iterator[str]:
    """An HTTP endpoint answering every hub API call with 404, as the hub does for an id it does not know."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("case", ["offline", "unknown"])
def test_a_hub_model_that_cannot_be_had(tmp_path: Path, hub_that_knows_nothing: str, case: str) -> None:
    root = copy_inputs(tmp_path)
    write_params(root, lambda p: p["model"].update(base="no-such-org/no-such-model"))
    if case == "offline":
        done = run(root, "skytune.stages.ingest", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
        assert_message(done, "params.yaml model.base: 'no-such-org/no-such-model'", "not in the local Hugging Face "
                       "cache", "unset HF_HUB_OFFLINE")
    else:
        done = run(root, "skytune.stages.ingest", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub_that_knows_nothing,
                   HF_HUB_CACHE=str(tmp_path / "hub"))
        assert_message(done, "'no-such-org/no-such-model'", "could not be resolved on the hub (HTTP 404)",
                       "Check the id and revision")
        debug = run(root, "skytune.stages.ingest", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub_that_knows_nothing,
                    HF_HUB_CACHE=str(tmp_path / "hub"), SKYTUNE_DEBUG="1")
        assert "Traceback" in debug.stderr and debug.returncode != 0  # the traceback, for whoever asks


def test_a_gguf_that_cannot_be_read(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    write_params(root, lambda p: p["model"].update(base="broken.gguf"))
    assert_message(run(root, "skytune.stages.ingest"), "broken.gguf", "not a readable GGUF")


@pytest.mark.parametrize("case", ["no such bucket", "wrong secret", "no credentials"])
def test_a_bucket_that_cannot_be_written(tmp_path: Path, s3: dict[str, str], case: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {k: v for k, v in s3.items() if k.startswith("AWS_")}
    url = "s3://no-such-bucket/exp/merged" if case == "no such bucket" else "s3://my-models/exp/merged"
    if case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    if case == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run([sys.executable, "-m", "skytune.face.cloud.buckets", "publish", url, "--source", str(model)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert_message(done, f"publishing to {url} failed", "AWS_ACCESS_KEY_ID", "make preflight")
