"""One module per dvc.yaml stage, each run as `python -m skytune.stages.<name>`.

Stages never import each other: what one gives another travels as a file through DVC.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict

from skytune.params import PARAMS_FILE, Params, ParamsError, load_params


def run_stage(main: Callable[[Params], None]) -> None:
    """Entry point of every stage: validate params.yaml (all problems at once), set up logging, run `main`.

    `base.log_level` is read here, outside `main`: it changes no output, so no stage declares it.
    """
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        params = load_params()
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=params.base.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    log = logging.getLogger(main.__module__)
    log.info("params (%s): %s", PARAMS_FILE, json.dumps(asdict(params), separators=(",", ":")))
    main(params)
