"""Trainer callbacks that make a run resumable: complete checkpoints, and a clean stop on a preemption notice."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from skytune.core import job_ledger
from skytune.core.training import checkpoints
from skytune.core.training.distributed import any_process, barrier, local_main
from skytune.core.training.live import LIVE_SNAPSHOT

log = logging.getLogger(__name__)

STATE_FILE = "skytune_state.json"  # what the stage needs back on resume, saved inside each checkpoint


class Checkpointing(TrainerCallback):
    """After the Trainer writes `checkpoint-<step>`: add the DVCLive snapshot and the stage's state, write the
    completion marker from every node's listing of what it sees, and prune old checkpoints (from every node's view,
    after every process has written its part). A directory of that step already there before the save (left by an
    earlier attempt) is listed first, so the marker takes this save's copies of its files."""

    def __init__(self, live_dir: Path, state: Callable[[], dict[str, Any]], keep: int) -> None:
        self.live_dir, self.state, self.keep = live_dir, state, keep
        self.before: checkpoints.Listing = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.before = checkpoints.listing(directory) if local_main() and directory.is_dir() else {}

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        barrier()
        run_dir = Path(args.output_dir)
        directory = run_dir / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            if self.live_dir.is_dir():
                shutil.copytree(self.live_dir, directory / LIVE_SNAPSHOT, dirs_exist_ok=True)
            (directory / STATE_FILE).write_text(json.dumps(self.state(), sort_keys=True), encoding="utf-8")
        barrier()
        checkpoints.seal(directory, self.before)  # every node's listing; rank 0 writes the marker
        checkpoints.prune(run_dir, self.keep)  # every node's view; rank 0 deletes
        if state.is_world_process_zero:
            log.info("checkpoint %s complete", directory)
            job_ledger.mark("checkpoint_at")  # on a cloud node: the work before this survives a preemption
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


def train_resumably(trainer: Any, resume: Path | None, stop: StopOnPreemption) -> tuple[int, float]:
    """Train from `resume` (or the start); exit PREEMPTED_EXIT_CODE when SIGTERM stopped it early. Returns the step
    it started from and the seconds it took."""
    start_step = checkpoints.step_of(resume) if resume else 0
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
        log.warning("stopped by SIGTERM at step %d of %d; checkpoint saved; exit %d",
                    trainer.state.global_step, trainer.state.max_steps, checkpoints.PREEMPTED_EXIT_CODE)
        checkpoints.exit_preempted()
    if resume and trainer.state.global_step == start_step:
        log.warning("resumed from %s, the last step's checkpoint of a run that stopped before writing its outputs: "
                    "no step was trained in this run (steps_this_run: 0 in the metrics)", resume)
    return start_step, seconds
