"""Floor 2, the stages: one module per dvc.yaml stage, each run as `python -m skytune.stages.<name>`.

Stages never import each other: what one gives another travels as a file through DVC.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from skytune.core.errors import reported
from skytune.core.params import PARAMS_FILE, Params, load_params

DVC_FILE = Path("dvc.yaml")  # DVC's own file name, next to params.yaml
# The data work before training, in DAG order (the base answering the self_replay prompts included): prepared and
# pushed before a cloud launch (skytune.face.cloud.remote_data), so a GPU node restores it from the DVC remote.
DATA_STAGES = ("ingest", "self_replay", "to_chat", "split", "merge_data")


def run_stage(main: Callable[[Params], None]) -> None:
    """Entry point of every stage: validate params.yaml (all problems at once), set up logging, log the params the
    stage declares, run `main`. An expected failure (`SkytuneError`) ends as one message, without a traceback.

    `base.log_level` is read here, outside `main`: it changes no output, so no stage declares it.
    """
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank0 = os.environ.get("RANK", "0") == "0"
    with reported(quiet=not rank0):
        params = load_params()
        logging.basicConfig(level=params.base.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        module = main.__module__
        if module == "__main__":  # `python -m skytune.stages.<name>`, as dvc.yaml runs it
            module = getattr(sys.modules["__main__"].__spec__, "name", module)
        stage = module.rsplit(".", 1)[-1]
        log = logging.getLogger(module)
        if rank0:
            log.info("params (%s, as dvc.yaml declares them for %s):\n%s", PARAMS_FILE, stage,
                     "\n".join(f"  {key} = {value}" for key, value in declared_params(params, stage)))
            log.debug("all params: %s", json.dumps(asdict(params), separators=(",", ":")))
            if stage in DATA_STAGES and os.environ.get("SKYPILOT_TASK_ID"):
                log.warning("computing %s on this cloud node: its output for these params is not on the DVC remote "
                            "(make launch and make sweep push it first; python -m skytune.face.cloud.remote_data "
                            "status tells what the remote lacks)", stage)
    with reported(debug=params.base.log_level == "DEBUG", quiet=not rank0):
        main(params)


def declared_params(params: Params, stage: str) -> list[tuple[str, Any]]:
    """The params `stage` declares in dvc.yaml, with their values (a section expands to its keys)."""
    if not DVC_FILE.is_file():
        return []
    keys = yaml.safe_load(DVC_FILE.read_text(encoding="utf-8"))["stages"].get(stage, {}).get("params", [])
    values: list[tuple[str, Any]] = []
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = getattr(value, part)
        if hasattr(value, "__dataclass_fields__"):
            values += [(f"{key}.{k}", v) for k, v in asdict(value).items()]
        else:
            values.append((key, [asdict(v) for v in value] if isinstance(value, tuple) and value
                           and hasattr(value[0], "__dataclass_fields__") else value))
    return values
