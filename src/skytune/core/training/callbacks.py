"""Trainer callbacks that make a run resumable: complete checkpoints, and a clean stop on a preemption notice."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from skytune.core.training import checkpoints
from skytune.core.training.distributed import any_process, barrier
from skytune.core.training.live import LIVE_SNAPSHOT

log = logging.getLogger(__name__)

STATE_FILE = "skytune_state.json"  # what the stage needs back on resume, saved inside each checkpoint


class Checkpointing(TrainerCallback):
    """After the Trainer writes `checkpoint-<step>`: add the DVCLive snapshot and the stage's state, write the
    completion marker from every node's listing of what it sees, and prune old checkpoints (rank 0, after every
    process has written its part)."""

    def __init__(self, live_dir: Path, state: Callable[[], dict[str, Any]], keep: int) -> None:
        self.live_dir, self.state, self.keep = live_dir, state, keep

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        barrier()
        run_dir = Path(args.output_dir)
        directory = run_dir / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            if self.live_dir.is_dir():
                shutil.copytree(self.live_dir, directory / LIVE_SNAPSHOT, dirs_exist_ok=True)
            (directory / STATE_FILE).write_text(json.dumps(self.state(), sort_keys=True), encoding="utf-8")
        barrier()
        checkpoints.seal(directory)  # every node's listing; rank 0 writes the marker
        if state.is_world_process_zero:
            checkpoints.prune(run_dir, self.keep)
            log.info("checkpoint %s complete", directory)
        barrier()


class StopOnPreemption(TrainerCallback):
    """Ends training at the end of the step in which any process got SIGTERM, asking the Trainer to save first."""

    def __init__(self, notice: checkpoints.PreemptionNotice) -> None:
        self.notice = notice
        self.stopped = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if any_process(self.notice.received):
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
