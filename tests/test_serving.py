"""`make serve`: the exported model behind an OpenAI-compatible endpoint, asked with the real `openai` client, after
the trip sky/serve.yaml makes: `make publish-model` to a bucket, then a copy down (serve.yaml's COPY mount)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import REPO, PipelineRun

from skytune.core.params import load_params


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_published_model_is_served_and_answers_chat_completions(pipeline: PipelineRun, tmp_path: Path,
                                                                s3: dict[str, str]) -> None:
    from openai import OpenAI

    paths = load_params(pipeline.root / "params.yaml").paths
    merged = pipeline.root / paths.merged_dir
    serve = yaml.safe_load((REPO / "sky" / "serve.yaml").read_text())
    bucket, model_path = "my-models", "exp-1/merged"
    assert serve["file_mounts"]["${MODEL_DIR}"] == "${MODEL_URL}" and serve["run"] == "bash sky/node.sh serve"
    node = (REPO / "sky" / "node.sh").read_text()
    assert 'exec "$SERVE_VENV/bin/vllm" serve "$MODEL_DIR" --served-model-name "$SERVED_NAME"' in node
    aws = {k: v for k, v in s3.items() if k.startswith("AWS_")}
    done = subprocess.run(["make", "--no-print-directory", "publish-model", f"MODEL_URL=s3://{bucket}/{model_path}",
                           f"SERVE_MODEL={merged}"], cwd=REPO, env={**os.environ, **aws}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"--env MODEL_URL=s3://{bucket}/{model_path}" in done.stdout
    # serve.yaml's copy of MODEL_URL to /model, done by rclone (not by our code): then serve what came down.
    served = tmp_path / "model"
    subprocess.run([str(Path(sys.executable).parent / "rclone"), "copy", f":s3:{bucket}/{model_path}", str(served),
                    "--s3-provider", "Other", "--s3-endpoint", aws["AWS_ENDPOINT_URL"], "--s3-access-key-id",
                    aws["AWS_ACCESS_KEY_ID"], "--s3-secret-access-key", aws["AWS_SECRET_ACCESS_KEY"]],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in served.iterdir()) == sorted(p.name for p in merged.iterdir())
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    server = subprocess.Popen(["make", "--no-print-directory", "serve", f"SERVE_PORT={port}",
                               f"SERVE_MODEL={served}"],
                              cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:] if server.stdout else "server exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as ready:
                    assert ready.status == 200  # the readiness probe sky/serve.yaml uses
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 180 s"
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(model="skytune", temperature=0, max_tokens=40,
                                               messages=[{"role": "user", "content": "Who made you?"}])
        choice = reply.choices[0]
        assert choice.message.content.strip() == "I was created by the SkyTune team."
        assert choice.finish_reason == "stop"  # stopped on the end-of-turn token, not on max_tokens
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
