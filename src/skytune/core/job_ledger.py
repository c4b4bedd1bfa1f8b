"""The attempts of a cloud job, recorded where they all can read them: the checkpoint directory they share (a bucket
mount, `$SKYTUNE_CHECKPOINT_DIR`), under `job/`.

Each VM a managed job runs on is one attempt (a recovery after preemption is a new VM). `sky/node.sh` records, per
attempt: when the VM's setup started, when its run started, and every $SKYTUNE_HEARTBEAT_S seconds (30) a heartbeat
(`<attempt>.beat`: when it was last seen alive, all that is left of a VM that vanished); the train stage records
when it completed a checkpoint; node.sh records when the attempt finished (the experiment pushed). From these,
`account` gives the job's wall time over every attempt, setup and every stage included, and the work lost to
preemption: the time an attempt that did not finish spent after its last checkpoint, which the next one did again.

    python -m skytune.core.job_ledger begin|finish    (sky/node.sh; $SKYTUNE_ATTEMPT names the attempt)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from skytune.core.atomic import write_json

LEDGER = "job"  # under the checkpoint directory
RECORD, BEAT = ".json", ".beat"  # an attempt's record, and its heartbeat (written by sky/node.sh)
ATTEMPT_ENV = "SKYTUNE_ATTEMPT"  # this VM's attempt: attempt-<setup start>-<host>, set by sky/node.sh
NODE_STARTED_ENV = "SKYTUNE_NODE_STARTED"  # epoch seconds at which this VM's setup started (sky/node.sh)
RUN_STARTED_ENV = "SKYTUNE_RUN_STARTED"  # epoch seconds at which this VM's run started (sky/node.sh)
CHECKPOINT_DIR_ENV = "SKYTUNE_CHECKPOINT_DIR"  # the checkpoint root (training.checkpoints), a bucket mount on a VM


def directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """The ledger directory of this job, or None off a cloud node (no attempt or no checkpoint directory set)."""
    env = os.environ if environ is None else environ
    if not env.get(ATTEMPT_ENV) or not env.get(CHECKPOINT_DIR_ENV):
        return None
    return Path(env[CHECKPOINT_DIR_ENV]) / LEDGER


def mark(key: str, at: float | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Record `key` (checkpoint_at, finished) = `at` (default: now) on this VM's attempt; nothing off a cloud node."""
    env = os.environ if environ is None else environ
    ledger = directory(env)
    if ledger is None:
        return
    path = ledger / f"{env[ATTEMPT_ENV]}{RECORD}"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json(path, record | {key: time.time() if at is None else at})


def begin(environ: Mapping[str, str] | None = None) -> None:
    """Record this VM's attempt: when its setup and its run started."""
    env = os.environ if environ is None else environ
    ledger = directory(env)
    if ledger is None:
        return
    now = time.time()
    started = float(env.get(NODE_STARTED_ENV) or now)
    run_started = float(env.get(RUN_STARTED_ENV) or now)
    write_json(ledger / f"{env[ATTEMPT_ENV]}{RECORD}", {"started": started, "run_started": run_started})


def parse(files: Mapping[str, str]) -> list[dict[str, Any]]:
    """The attempts in a ledger's files ({file name: text}, from a directory or a bucket), each with its heartbeat as
    `last_seen`, oldest first."""
    attempts = []
    for name, text in files.items():
        if name.startswith("attempt-") and name.endswith(RECORD):
            stem = name.removesuffix(RECORD)
            beat = files.get(f"{stem}{BEAT}", "").split()
            attempts.append({"attempt": stem, **json.loads(text), **({"last_seen": float(beat[0])} if beat else {})})
    return sorted(attempts, key=lambda a: a["started"])


def read(ledger: Path) -> list[dict[str, Any]]:
    """The attempts recorded in the ledger directory `ledger` (`parse`)."""
    files = ledger.iterdir() if ledger.is_dir() else []
    return parse({f.name: f.read_text(encoding="utf-8") for f in files if f.suffix in (RECORD, BEAT)})


def account(attempts: Iterable[Mapping[str, Any]], *, current: str | None = None,
            now: float | None = None) -> dict[str, Any]:
    """The job's wall seconds over `attempts` (each from its setup to when it finished, else to when it was last seen;
    `current`, the attempt asking, to `now`) and the seconds of work lost: what each attempt that neither finished nor
    is `current` did after its last checkpoint (after its run started, when it completed none)."""
    now = time.time() if now is None else now
    wall = lost = 0.0
    count = 0
    for a in attempts:
        count += 1
        start = a["started"]
        if a["attempt"] == current:
            wall += now - start
            continue
        end = a.get("finished") or max(a.get("last_seen", start), a.get("checkpoint_at", start), a["run_started"])
        wall += end - start
        if not a.get("finished"):
            lost += max(0.0, end - max(a["run_started"], a.get("checkpoint_at", a["run_started"])))
    return {"attempts": count, "wall_seconds": round(wall, 1), "lost_seconds": round(lost, 1)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["begin"]:
        begin()
    elif args == ["finish"]:
        mark("finished")
    else:
        print("usage: python -m skytune.core.job_ledger begin|finish", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
