"""`make serve`: an exported model behind vLLM's OpenAI-compatible server (/v1/models, /v1/chat/completions,
/v1/completions), the server the stages start, with the chat template and stop tokens training used.

    make serve                   the merged model (paths.merged_dir, or SERVE_MODEL), named export.adapter_name
    make serve SERVE=adapter     the base model with the exported LoRA adapter (paths.export_dir/adapter, or
                                 SERVE_MODEL), the adapter named export.adapter_name and the base "base": the exact
                                 command the model card gives
    (SERVE_HOST, SERVE_PORT: where it listens; default 127.0.0.1:8000)

It runs in vLLM's own environment (make vllm-env installs this package there, without its dependencies), so a
serving machine (sky/serve.yaml) needs nothing of the pipeline's, and replaces itself with the server.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from skytune.core import packaging, vllm_server
from skytune.core.errors import SkytuneError, reported
from skytune.core.models.base import MANIFEST, BaseModel, adapter_base_location
from skytune.core.models.devices import compute_dtype
from skytune.core.params import Params, load_params
from skytune.core.vllm_server import Vllm

BASE_NAME = "base"  # what clients call the base model when the adapter is served on it


def server_command(params: Params, what: str, model_dir: str | None) -> tuple[Vllm, list[str]]:
    """The argv of vLLM's server for `what` ("merged" or "adapter") at `model_dir` (default: where the pipeline
    writes it). On a CPU the model runs eagerly in the training compute dtype (fp32); on a GPU with CUDA graphs."""
    import torch

    vllm = Vllm.from_params(params.vllm, params.paths.vllm_env)
    name, dtype = params.export.adapter_name, str(compute_dtype(params.train.compute_dtype)).removeprefix("torch.")
    if what == "merged":
        model, revision = model_dir or params.paths.merged_dir, None
        if not Path(model).is_dir():
            raise SkytuneError(f"{model} not found: build the merged model first (make merged), or give "
                               "SERVE_MODEL=<a model directory>")
        extra = vllm_server.template_flags(model)
    else:
        adapter = model_dir or f"{params.paths.export_dir}/{packaging.EXPORTED_ADAPTER}"
        config_file = Path(adapter) / packaging.ADAPTER_CONFIG
        if not config_file.is_file():
            raise SkytuneError(f"{config_file} not found: export the adapter first (export.formats: adapter; "
                               "dvc repro export), or give SERVE_MODEL=<an exported adapter directory>")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        # The base manifest export wrote beside the adapter (else this project's): a GGUF base resolves through it.
        manifest = next((d for d in (Path(adapter), Path(params.paths.base_model_dir)) if (d / MANIFEST).is_file()),
                        None)
        model = adapter_base_location(config["base_model_name_or_path"],
                                      BaseModel.load(manifest) if manifest else None)
        revision = config.get("revision")
        extra = vllm_server.adapter_flags(adapter, name=name, max_lora_rank=params.export.max_lora_rank)
        name = BASE_NAME
    flags = vllm_server.model_flags(name=name, dtype=dtype, max_model_len=vllm.context(model, revision),
                                    gpu_memory_utilization=vllm.gpu_memory_utilization, revision=revision,
                                    eager=not torch.cuda.is_available())
    return vllm, vllm.command(model, flags + extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("merged", "adapter"))
    parser.add_argument("--model", help="the model (merged) or adapter directory; default: the pipeline's")
    parser.add_argument("--host", default=vllm_server.HOST)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with reported():
        vllm, argv = server_command(load_params(), args.what, args.model)
        ok, why = vllm.available()
        if not ok:
            raise SkytuneError(f"make serve needs vLLM, and {why}")
    argv += ["--host", args.host, "--port", str(args.port)]
    print("$ " + " ".join(argv), flush=True)
    os.execve(argv[0], argv, vllm.environ())


if __name__ == "__main__":
    main()
