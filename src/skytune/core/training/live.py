"""DVCLive during training: metrics keyed by the optimizer step, and the snapshot a checkpoint carries for resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, ClassVar

from transformers import TrainerCallback

LIVE_SNAPSHOT = "dvclive"  # the DVCLive directory as of the checkpoint, restored on resume
MAX_LOSS = 50.0  # exp(50) ~ 5e21: a diverged run logs a (huge) perplexity, not inf, which JSON cannot hold


def perplexity(loss: float) -> float:
    """exp(mean loss), capped at exp(MAX_LOSS)."""
    return math.exp(min(loss, MAX_LOSS))


def _logged_steps(live_dir: Path) -> dict[str, int]:
    """The last step of every metric already in a DVCLive directory (after a resume)."""
    last: dict[str, int] = {}
    plots = live_dir / "plots" / "metrics"
    for tsv in plots.rglob("*.tsv") if plots.is_dir() else []:
        lines = tsv.read_text(encoding="utf-8").strip().splitlines()
        if len(lines) > 1:
            header = lines[0].split("\t")
            last[str(tsv.relative_to(plots).with_suffix(""))] = int(lines[-1].split("\t")[header.index("step")])
    return last


class LiveLog(TrainerCallback):
    """DVCLive metrics keyed by the optimizer step: train loss, learning rate and grad norm every logging step, val
    loss and perplexity every eval. A metric is never logged twice at a step, also across a resume (dvclive#781)."""

    NAMES: ClassVar[dict[str, str]] = {"loss": "train/loss", "learning_rate": "train/learning_rate",
                                       "grad_norm": "train/grad_norm", "eval_loss": "eval/loss"}

    def __init__(self, live: Any, names: dict[str, str] | None = None) -> None:
        self.live = live
        self.names = {**self.NAMES, **(names or {})}  # a trainer's own log keys (TRL's rewards/margins, ...)
        self.last = _logged_steps(Path(live.dir))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        values = {self.names[k]: float(v) for k, v in logs.items() if k in self.names}
        if "eval/loss" in values:
            values["eval/perplexity"] = perplexity(values["eval/loss"])
        step = state.global_step
        fresh = {k: v for k, v in values.items() if self.last.get(k, -1) < step}
        if not fresh:
            return
        self.live.step = step
        for name, value in fresh.items():
            self.live.log_metric(name, value)
            self.last[name] = step
        self.live.make_summary()


def restore_live(checkpoint: Path, live_dir: Path) -> None:
    """Put back the DVCLive directory as it was at `checkpoint` (later steps, logged before a kill, are dropped)."""
    shutil.rmtree(live_dir, ignore_errors=True)
    if (checkpoint / LIVE_SNAPSHOT).is_dir():
        shutil.copytree(checkpoint / LIVE_SNAPSHOT, live_dir)


def start_live(live_dir: Path, resume: Path | None, rank: int) -> Any:
    """DVCLive on the main process only (None elsewhere), resumed from the checkpoint's snapshot, leaving dvc.yaml
    alone (it declares these metrics and plots itself)."""
    from dvclive import Live

    if rank != 0:
        return None
    if resume:
        restore_live(resume, live_dir)
    return Live(dir=str(live_dir), resume=resume is not None, dvcyaml=False, save_dvc_exp=False, report=None)
