"""vLLM as the pipeline reaches it: its own environment (requirements.txt stays the pipeline's everywhere), the
engine `auto` picks on each machine, and the sanity check on real vLLM (its CPU build here) against the transformers
engine, on the embedded default's models. tests/test_serving.py asks `make serve`'s server."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PATHS, REPO, EmbeddedDefault, PipelineRun

from skytune.core import vllm_server
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import generation
from skytune.core.params import load_params

VLLM_ENV = Path(os.environ[vllm_server.ENV_VAR])


def make_dry_run(*targets: str, gpu: bool, tmp_path: Path) -> str:
    """What `make -n` would run for `targets` from scratch, on a machine whose nvidia-smi lists a GPU or none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["make", "-n", "-B", "--no-print-directory", *targets, f"VENV={tmp_path / 'venv'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return done.stdout


def test_a_gpu_node_runs_the_pipeline_on_requirements_txt_and_vllm_beside_it(tmp_path: Path) -> None:
    """One set of pins for the pipeline on every machine; only vLLM's own environment differs by machine."""
    # What a training node's setup builds (sky/node.sh setup: make node-env), on a GPU node and on a CPU one.
    assert 'make node-env VENV="$VENV"' in (REPO / "sky" / "node.sh").read_text()
    gpu_node, cpu_node = (make_dry_run("node-env", gpu=g, tmp_path=tmp_path / str(g)) for g in (True, False))
    for plan in (gpu_node, cpu_node):
        assert re.search(r"^\S+/pip install .*-r requirements\.txt$", plan, re.MULTILINE), plan
    assert "-r requirements-vllm.txt" in gpu_node and "requirements-vllm-cpu.txt" not in gpu_node
    assert "requirements-vllm" not in cpu_node  # auto is transformers there: no vLLM to build
    # make run builds the same: vLLM's environment on a GPU workstation, none for a CPU run.
    gpu_run, cpu_run = (make_dry_run("run", gpu=g, tmp_path=tmp_path / f"run-{g}") for g in (True, False))
    assert "-r requirements-vllm.txt" in gpu_run and "requirements-vllm" not in cpu_run
    # make vllm-env (make serve, make test) on a CPU machine: vLLM's CPU build.
    cpu = make_dry_run("vllm-env", gpu=False, tmp_path=tmp_path / "laptop")
    assert "-r requirements-vllm-cpu.txt" in cpu and "requirements-vllm.txt" not in cpu
    assert not list(REPO.glob("requirements-node*.txt"))
    # Both vLLM sets are the same vLLM release, apart from the pipeline's torch and transformers pins.
    pins = {name: dict(line.split("==") for line in (REPO / name).read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
            for name in ("requirements.txt", "requirements-vllm.txt", "requirements-vllm-cpu.txt")}
    assert pins["requirements-vllm.txt"]["vllm"] == pins["requirements-vllm-cpu.txt"]["vllm-cpu"]
    assert "vllm" not in pins["requirements.txt"] and "vllm-cpu" not in pins["requirements.txt"]


def test_the_cpu_vllm_environment_holds_vllm_cpu_and_its_own_torch() -> None:
    """`make test` built vLLM's CPU environment (installed.json: `pip list` of the environment once built)."""
    listed = json.loads((VLLM_ENV / "installed.json").read_text())
    resolved = {item["name"].lower(): item["version"] for item in listed}
    pinned = (REPO / "requirements-vllm-cpu.txt").read_text().split("vllm-cpu==")[1].split()[0]
    assert resolved["vllm-cpu"] == pinned and resolved["torch"] == "2.13.0+cpu", resolved
    assert resolved["transformers"] != (REPO / "requirements.txt").read_text().split("transformers==")[1].split()[0]


def fake_env(tmp_path: Path, python: str | None) -> vllm_server.Vllm:
    """An environment whose python is `python` (None: not built)."""
    env = tmp_path / "venv"
    (env / "bin").mkdir(parents=True)
    if python:
        (env / "bin" / "python").symlink_to(python)
    return vllm_server.Vllm(env, max_model_len=4096, gpu_memory_utilization=0.5, cpu_kv_cache_gb=1)


@pytest.mark.parametrize(("requested", "built", "cuda", "expected"), [
    ("auto", True, True, "vllm"),  # a GPU node
    ("auto", True, False, "transformers"),  # this machine: no start-up for a CPU run
    ("auto", False, True, "transformers"),  # a GPU without vLLM's environment
    ("vllm", True, False, "vllm"),  # asked for on a CPU: it runs
    ("transformers", True, True, "transformers"),
])
def test_engine_auto_picks_vllm_on_a_gpu_with_its_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              requested: str, built: bool, cuda: bool,
                                                              expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    vllm = fake_env(tmp_path, "/bin/true" if built else None)
    assert generation.resolve_engine(requested, vllm) == expected


def test_an_engine_that_cannot_run_is_one_message(tmp_path: Path) -> None:
    missing = fake_env(tmp_path, None)
    with pytest.raises(SkytuneError, match=r"evaluate.engine is vllm but vLLM's environment .* is not built \(make "
                                           r"vllm-env builds it\)"):
        generation.resolve_engine("vllm", missing, "evaluate.engine")
    with pytest.raises(SkytuneError, match="sanity_check.engine: unknown engine 'tgi'"):
        generation.resolve_engine("tgi", missing)


def test_a_server_that_dies_before_it_answers_is_one_message_with_its_log(tmp_path: Path) -> None:
    """`running` waits for /v1/models while watching the process: one that exits is reported with the end of its
    log, not waited on until the timeout."""
    dead = fake_env(tmp_path, shutil.which("false"))
    flags = vllm_server.model_flags(name="m", dtype="float32", max_model_len=64, gpu_memory_utilization=0.5)
    with pytest.raises(SkytuneError, match=r"the test: vLLM's server exited \(code 1\) before it answered"), \
            vllm_server.running(dead, tmp_path, flags, what="the test"):
        pytest.fail("it never answered")


FAKE_SERVER = """\
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"data": []}')
http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()  # OSError: [Errno 98] Address already in use
"""


def test_a_port_taken_before_the_server_binds_it_is_tried_again_elsewhere(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The port `running` chose is taken by another process before the server binds it: the server exits with
    "Address already in use", and `running` starts it again on another port rather than failing the stage."""
    import socket
    import sys

    script = tmp_path / "server.py"
    script.write_text(FAKE_SERVER)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    vllm = fake_env(tmp_path, str(python))
    flags = vllm_server.model_flags(name="m", dtype="float32", max_model_len=64, gpu_memory_utilization=0.5)
    with socket.socket() as taken, socket.socket() as free:  # bound, not listening: connections are refused at once
        taken.bind(("127.0.0.1", 0))
        free.bind(("127.0.0.1", 0))
        ports = [taken.getsockname()[1], free.getsockname()[1]]
        chosen = iter(ports)
        monkeypatch.setattr(vllm_server, "free_port", lambda: next(chosen))
        free.close()
        with vllm_server.running(vllm, tmp_path, flags, what="the test") as server:
            assert server.url == f"http://127.0.0.1:{ports[1]}"
    with socket.socket() as taken:  # a server that keeps failing to bind fails the stage after PORT_ATTEMPTS
        taken.bind(("127.0.0.1", 0))
        monkeypatch.setattr(vllm_server, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(SkytuneError, match=r"(?s)exited \(code 1\) before it answered.*Address already in use"), \
                vllm_server.running(vllm, tmp_path, flags, what="the test"):
            pytest.fail("it never answered")


def test_a_server_goes_when_the_process_that_started_it_dies(tmp_path: Path) -> None:
    """A stage killed by a signal runs no `finally`: its server, in a session of its own, is stopped by the kernel
    (PR_SET_PDEATHSIG), not left holding the GPU. Here a server that never answers, its starter SIGKILLed."""
    import signal
    import sys
    import time

    server = tmp_path / "server.sh"
    server.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nexec sleep 600\n")
    server.chmod(0o755)
    fake_env(tmp_path, str(server))
    starter = subprocess.Popen([sys.executable, "-c", (
        "from pathlib import Path; from skytune.core import vllm_server as v\n"
        f"vllm = v.Vllm(Path({str(tmp_path / 'venv')!r}), 64, 0.5, 1)\n"
        "flags = v.model_flags(name='m', dtype='float32', max_model_len=64, gpu_memory_utilization=0.5)\n"
        "with v.running(vllm, '/nowhere', flags): pass\n")])
    deadline = time.monotonic() + 60
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text().strip():
        assert starter.poll() is None and time.monotonic() < deadline, "the server never started"
        time.sleep(0.1)
    pid = int((tmp_path / "pid").read_text())
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]:
        assert time.monotonic() < deadline, f"the server ({pid}) outlived the process that started it"
        time.sleep(0.1)


def test_the_pipeline_never_imports_vllm() -> None:
    """vLLM runs in its own environment, reached through its server: no module of the package imports it."""
    imports = re.compile(r"^\s*(import vllm|from vllm[ .])", re.MULTILINE)
    assert [p for p in (REPO / "src").rglob("*.py") if imports.search(p.read_text())] == []


def test_export_parity_runs_where_it_is_asked_to(pipeline: PipelineRun, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """export.parity: false; auto, which on a CPU leaves vLLM's start-up to a GPU node and says so; true, which without
    vLLM's environment is one message (with it, the parity itself is tests/test_vllm_engine's sanity check test and
    tests/test_serving.py's)."""
    from skytune.stages import export

    params = load_params(pipeline.root / "params.yaml")
    with contextlib.chdir(pipeline.root):
        def parity(value: bool | str) -> dict:
            return export._parity(dataclasses.replace(params, export=dataclasses.replace(params.export,
                                                                                           parity=value)))

        assert parity(False) == {"serve_parity": "off (export.parity: false)"}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert parity("auto")["serve_parity"].startswith("not measured: export.parity auto measures it where")
        monkeypatch.setenv(vllm_server.ENV_VAR, str(tmp_path / "nowhere"))
        with pytest.raises(SkytuneError, match="export.parity is true but vLLM's environment"):
            parity(True)


def answers(results: Path) -> dict[str, dict[str, str]]:
    with results.open(encoding="utf-8") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_the_sanity_check_on_vllm_answers_as_the_transformers_engine_did(embedded_default: EmbeddedDefault,
                                                                          tmp_path: Path) -> None:
    """Train/serve parity on the real model: the sanity check stage on `engine: vllm` (vLLM's server started by the
    stage, for the base and for the merged model, both fp32) gives the answers the transformers engine gave in the
    `dvc exp run` of the embedded default, prompt by prompt, from the same token ids. And export's parity metric,
    measured here with `export.parity: true`, says so too."""
    from skytune.stages import export, sanity_check

    ws = tmp_path / "ws"
    shutil.copytree(embedded_default.snapshot, ws, copy_function=os.link)
    for name in (PATHS.sanity_results, PATHS.sanity_metrics):
        (ws / name).unlink()  # the stage's own outputs, written again here
    params = yaml.safe_load((ws / "params.yaml").read_text())
    # Perplexity is transformers' on either engine: a few records, so the model loads, scores and makes way for vLLM.
    params["sanity_check"].update(engine="vllm", perplexity_records=4)
    params["export"].update(parity=True)
    (ws / "params.yaml").unlink()  # a hard link to the snapshot's: written anew, not through
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(ws):
        sanity_check.main(load_params())
        parity = export._parity(load_params())
    metrics = json.loads((ws / PATHS.sanity_metrics).read_text())
    assert metrics["engine"] == "vllm" and metrics["val_perplexity_tuned"] < metrics["val_perplexity_base"]
    assert metrics["identity_exact_match_tuned"] == 1.0 and metrics["identity_exact_match_base"] == 0.0
    served, reference = answers(ws / PATHS.sanity_results), answers(embedded_default.snapshot / PATHS.sanity_results)
    assert served.keys() == reference.keys() and len(served) > 50
    agreement = {}
    for model in ("base", "tuned"):
        same = [served[i][f"{model}_answer"] == reference[i][f"{model}_answer"] for i in served]
        stops = [served[i][f"{model}_stopped"] == reference[i][f"{model}_stopped"] for i in served]
        agreement[model] = (sum(same) / len(same), sum(stops) / len(stops))
    print(f"\nvLLM vs transformers on {len(served)} prompts (exact match, stop agreement): {agreement}")
    for model, (exact, stop) in agreement.items():
        assert exact >= 0.9 and stop >= 0.95, (model, agreement)
    print(f"export's parity metric: {parity}")  # 6 prompts: one that differs is 0.17
    assert parity["serve_parity"] == "vllm vs transformers" and parity["serve_parity_prompts"] == sum(
        1 for _ in (ws / PATHS.sanity_prompts).open())
    assert parity["serve_parity_exact_match"] >= 0.8 and parity["serve_parity_stop_agreement"] >= 0.8, parity


@pytest.mark.parametrize(("serve", "expected"), [
    ("merged", r"^error: /\S+/nowhere not found: build the merged model first \(make merged\), or give "
               r"SERVE_MODEL=<a model directory>$"),
    ("adapter", r"^error: /\S+/nowhere/adapter_config.json not found: export the adapter first"),
])
@pytest.mark.slow
def test_make_serve_without_a_model_is_one_message(tmp_path: Path, serve: str, expected: str) -> None:
    done = subprocess.run(["make", "--no-print-directory", "serve", f"SERVE={serve}",
                           f"SERVE_MODEL={tmp_path / 'nowhere'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert re.search(expected, done.stderr, re.MULTILINE), done.stderr
