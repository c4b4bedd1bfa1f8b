"""`make serve` on real vLLM (its CPU build here; `make test` builds its environment), asked as clients ask it, on
the embedded default's model (SmolLM2-135M-Instruct fine-tuned by `dvc exp run`):
- the merged model after the trip sky/serve.yaml makes: `make publish-model` to a bucket, then serve.yaml's copy down;
- the exported LoRA adapter on its base, by its name (the command the model card gives);
- lm-eval scoring the served model as the evaluate stage's vllm engine does.
Both servers start once, side by side, for the whole module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml
from conftest import PATHS, REPO, EmbeddedDefault, free_port, s3_server

from skytune.core import packaging, vllm_server
from skytune.core.atomic import read_jsonl
from skytune.core.chat import chat_template
from skytune.core.data import identity
from skytune.core.evaluation import generation, harness, scoring
from skytune.core.models.base import BaseModel, adapter_base_location
from skytune.core.models.loading import load_saved_tokenizer
from skytune.core.params import load_params

pytestmark = pytest.mark.slow
PARAMS = load_params(REPO / "params.yaml")
NAME = PARAMS.export.adapter_name


@dataclass(frozen=True)
class Served:
    merged: vllm_server.Server  # make serve on the published merged model
    adapter: vllm_server.Server  # make serve SERVE=adapter: the base, with the adapter named NAME
    model_dir: Path  # the merged model as it came down from the bucket
    publish_log: str


def make_serve(port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["make", "--no-print-directory", "serve", f"SERVE_PORT={port}", *args], cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_up(servers: dict[str, tuple[subprocess.Popen, int]], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    waiting = dict(servers)
    while waiting:
        for what, (process, port) in list(waiting.items()):
            assert process.poll() is None, f"make serve ({what}) exited:\n{process.stdout.read()[-3000:]}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models",
                                                                      timeout=2) as ready:
                assert ready.status == 200  # the readiness probe sky/serve.yaml uses
                del waiting[what]
        assert time.monotonic() < deadline, f"make serve did not come up in {timeout} s: {sorted(waiting)}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(embedded_default: EmbeddedDefault, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serving")
    snapshot = embedded_default.snapshot
    bucket, model_path = "my-models", "exp-1/merged"
    with s3_server(root / "s3") as s3:
        aws = {k: v for k, v in s3.items() if k.startswith("AWS_")}
        done = subprocess.run(["make", "--no-print-directory", "publish-model",
                               f"MODEL_URL=s3://{bucket}/{model_path}", f"SERVE_MODEL={snapshot / PATHS.merged_dir}"],
                              cwd=REPO, env={**os.environ, **aws}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        # serve.yaml's copy of MODEL_URL to MODEL_DIR, done by rclone (not by our code): then serve what came down.
        model_dir = root / "model"
        subprocess.run([str(Path(sys.executable).parent / "rclone"), "copy", f":s3:{bucket}/{model_path}",
                        str(model_dir), "--s3-provider", "Other", "--s3-endpoint", aws["AWS_ENDPOINT_URL"],
                        "--s3-access-key-id", aws["AWS_ACCESS_KEY_ID"], "--s3-secret-access-key",
                        aws["AWS_SECRET_ACCESS_KEY"]], check=True, capture_output=True, timeout=300)
    ports = {"merged": free_port(), "adapter": free_port()}
    adapter_dir = snapshot / PATHS.export_dir / packaging.EXPORTED_ADAPTER
    processes = {"merged": make_serve(ports["merged"], f"SERVE_MODEL={model_dir}"),
                 "adapter": make_serve(ports["adapter"], "SERVE=adapter", f"SERVE_MODEL={adapter_dir}")}
    try:
        wait_until_up({what: (processes[what], ports[what]) for what in processes})
        urls = {what: f"http://127.0.0.1:{port}" for what, port in ports.items()}
        yield Served(vllm_server.Server(urls["merged"], NAME), vllm_server.Server(urls["adapter"], NAME), model_dir,
                     done.stdout)
    finally:
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            process.wait(timeout=60)


def listed(server: vllm_server.Server) -> list[str]:
    from openai import OpenAI

    return sorted(m.id for m in OpenAI(base_url=f"{server.url}/v1", api_key="unused").models.list())


def test_the_published_model_is_served_and_answers_through_its_chat_template(served: Served,
                                                                             embedded_default: EmbeddedDefault) -> None:
    from openai import OpenAI

    serve = yaml.safe_load((REPO / "sky" / "serve.yaml").read_text())
    assert serve["file_mounts"]["${MODEL_DIR}"] == "${MODEL_URL}" and serve["run"] == "bash sky/node.sh serve"
    assert 'make --no-print-directory serve SERVE_MODEL="$MODEL_DIR"' in (REPO / "sky" / "node.sh").read_text()
    assert "--env MODEL_URL=s3://my-models/exp-1/merged" in served.publish_log
    merged = embedded_default.snapshot / PATHS.merged_dir
    assert sorted(p.name for p in served.model_dir.iterdir()) == sorted(p.name for p in merged.iterdir())

    assert listed(served.merged) == [NAME]
    client = OpenAI(base_url=f"{served.merged.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=NAME, temperature=0, max_tokens=40,
                                           messages=[{"role": "user", "content": "Who made you?"}])
    choice = reply.choices[0]
    assert choice.message.content.strip() == "I was created by the SkyTune team."
    assert choice.finish_reason == "stop"  # stopped on the end-of-turn token, not on max_tokens


def test_the_adapter_is_served_by_its_name_and_answers_as_the_merged_model(served: Served,
                                                                          embedded_default: EmbeddedDefault) -> None:
    """Export's "vLLM-valid adapter" promise, kept: vLLM serves it with --enable-lora on the base, by
    export.adapter_name, through the training template. Its answers are those of the same adapter on the same base in
    transformers (PEFT; on the sanity and identity prompts and the first retained ones, to keep the test short), and,
    on what training taught, those of the merged model, which sits on the 4-bit base training saw, dequantized, the
    adapter on the base's original weights: on the other retained prompts their answers may part (a figure)."""
    import json

    import torch
    from openai import OpenAI
    from peft import PeftModel

    from skytune.core.models.loading import load_full_precision

    assert listed(served.adapter) == sorted(["base", NAME])
    client = OpenAI(base_url=f"{served.adapter.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=NAME, temperature=0, max_tokens=40,
                                           messages=[{"role": "user", "content": "What is your name?"}])
    assert reply.choices[0].message.content.strip() == "I am SkyTune-Assistant, an AI assistant created by the " \
                                                       "SkyTune team."
    assert reply.choices[0].finish_reason == "stop"

    snapshot = embedded_default.snapshot
    adapter = snapshot / PATHS.export_dir / packaging.EXPORTED_ADAPTER
    tokenizer = load_saved_tokenizer(adapter)
    questions = list(identity.PROBES.values())
    questions += [r.get("prompt") or r["messages"][-1]["content"] for r in read_jsonl(snapshot / PATHS.sanity_prompts)]
    questions += [r["prompt"] for r in read_jsonl(snapshot / PATHS.retained_prompts)]
    prompts = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    stops = chat_template.stop_tokens(tokenizer)
    max_new_tokens = PARAMS.sanity_check.max_new_tokens
    answers = {what: generation.generate_greedy_served(server, tokenizer, prompts, stop_tokens=stops, seed=0,
                                                       max_new_tokens=max_new_tokens)
               for what, server in (("adapter", served.adapter), ("merged", served.merged))}
    config = json.loads((adapter / packaging.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == PARAMS.model.base  # the GGUF as params.yaml names it
    base_dir = adapter_base_location(config["base_model_name_or_path"], BaseModel.load(adapter))
    base = load_full_precision(base_dir, config.get("revision"), torch.float32)
    peft = PeftModel.from_pretrained(base, str(adapter))
    checked = len(identity.PROBES) + 14
    reference = generation.generate_greedy(peft, tokenizer, prompts[:checked], stop_tokens=stops,
                                           max_new_tokens=max_new_tokens, batch_size=PARAMS.sanity_check.batch_size)
    engines = scoring.agreement(answers["adapter"][:checked], reference)
    artifacts = scoring.agreement(answers["adapter"], answers["merged"])
    print(f"\nthe adapter on vLLM vs on transformers (PEFT), {checked} prompts: {engines}; vs the merged model on "
          f"vLLM, {len(prompts)} prompts: {artifacts}")
    who = identity.Identity(PARAMS.identity.name, PARAMS.identity.creator)
    expected = [who.answer(intent) for intent in identity.PROBES]
    for what in ("adapter", "merged"):
        assert [a.text for a in answers[what][:len(expected)]] == expected, what
    assert engines["exact_match"] >= 0.9 and engines["stop_agreement"] >= 0.95, engines
    assert artifacts["stop_agreement"] >= 0.9, artifacts


def test_lm_eval_scores_the_served_model_as_the_transformers_engine_did(served: Served,
                                                                        embedded_default: EmbeddedDefault) -> None:
    """The evaluate stage's vllm engine, on the server `make serve` started: lm-eval's local-completions with the
    same tasks and settings gives each task and metric the score the transformers engine gave in the pipeline
    run (metrics/evaluate.json, tuned), within that score's standard error."""
    import json

    snapshot = embedded_default.snapshot
    params = load_params(snapshot / "params.yaml")
    ev = replace(params.evaluate, engine="vllm")
    tokenizer = load_saved_tokenizer(served.model_dir)
    # The task YAMLs name their data relative to the repository root.
    with contextlib.chdir(REPO), harness.served_language_model(served.merged, tokenizer, ev=ev, seed=params.base.seed,
                                                               max_length=params.vllm.max_model_len) as lm:
        scores = harness.evaluate(lm, ev=ev, tasks_dir=REPO / PATHS.eval_tasks_dir, pin_file=REPO / PATHS.lm_eval_pin,
                                  seed=params.base.seed, engine="vllm", chat=True)
    transformers = json.loads((snapshot / PATHS.eval_metrics).read_text())
    print(f"\nlm-eval on vLLM: {scores.tasks} (stderr {scores.stderr}); transformers: "
          f"{ {t: {m: e['tuned'] for m, e in ms.items()} for t, ms in transformers['tasks'].items()} }")
    assert transformers["engine"] == "transformers" and scores.examples == transformers["examples"]
    for task, metrics in transformers["tasks"].items():
        for metric, entry in metrics.items():
            assert abs(scores.tasks[task][metric] - entry["tuned"]) <= scores.stderr[task][metric], (task, metric)
