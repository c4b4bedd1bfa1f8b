"""`make serve`: the exported model behind an OpenAI-compatible endpoint, asked with the real `openai` client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import REPO, PipelineRun

from skytune.params import load_params


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_make_serve_answers_chat_completions(pipeline: PipelineRun, tmp_path: Path) -> None:
    from openai import OpenAI

    paths = load_params(pipeline.root / "params.yaml").paths
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    server = subprocess.Popen(["make", "--no-print-directory", "serve", f"SERVE_PORT={port}",
                               f"SERVE_MODEL={pipeline.root / paths.export_dir / 'merged'}"],
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
