"""Resumable checkpoints that survive spot preemption: a completion marker, the newest complete one, pruning,
and the SIGTERM notice.

A checkpoint directory (`checkpoint-<step>`, as the transformers Trainer writes it) counts only once its marker
`COMPLETE.json` exists and every file listed there has its size and sha256: a checkpoint torn by a kill mid-write, or
damaged later, is skipped and the one before it is used (transformers#35782 has no such fallback). The marker is
written last, through a temporary file, fsync and rename, so it never exists half-written.

On several nodes each node may see its own copy of the checkpoint directory (a MOUNT_CACHED bucket mount is a
per-node cache, uploaded in the background and synced with a delay). So the marker is written by rank 0 only after a
barrier, from every node's listing of the files it sees (`seal`), and the checkpoint to resume is chosen by rank 0
from every node's view, as the newest one complete in all of them, and broadcast (`newest_complete`). Only rank 0
deletes.

Checkpoints of different training inputs never mix: each run writes under `<root>/<fingerprint>/`, the fingerprint
hashing everything that determines the result (params, base model, data, this package's code and the versions of
the training libraries). A run that finishes and writes its outputs removes its checkpoints (`finished`), so a
forced re-run (`dvc exp run -f`) trains again instead of passing a finished run's last checkpoint off as a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import skytune
from skytune.core.atomic import file_sha256
from skytune.core.job_ledger import CHECKPOINT_DIR_ENV
from skytune.core.training.distributed import all_gather, broadcast, local_main, rank

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
MISSING = "is missing"  # check()'s word for a listed file not there: on several nodes, possibly still syncing
ENV_DIR = CHECKPOINT_DIR_ENV
# Exit code of a training run stopped by SIGTERM after saving a checkpoint: EX_TEMPFAIL ("try again"). SkyPilot's
# `job_recovery.recover_on_exit_codes: [75]` relaunches on it; the relaunch resumes from that checkpoint.
PREEMPTED_EXIT_CODE = 75
PREEMPTED_FILE_ENV = "SKYTUNE_PREEMPTED_FILE"  # set by skytune.core.processes, which cannot see its workers' exit codes
_STEP = re.compile(r"^checkpoint-(\d+)$")
# The libraries whose version changes what training computes (a checkpoint written under one is not resumed under
# another).
TRAINING_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def fingerprint(inputs: dict[str, Any]) -> str:
    """A short stable hash of JSON-able `inputs`."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(package_dir: Path | None = None) -> str:
    """The sha256 of this package's Python sources (every `.py` under `package_dir`, default the installed skytune
    package), paths and contents, in sorted order: a code change gives another checkpoint directory."""
    root = package_dir or Path(skytune.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The installed versions of TRAINING_PACKAGES."""
    return {name: metadata.version(name) for name in TRAINING_PACKAGES}


def root(configured: str) -> Path:
    """The checkpoint root: $SKYTUNE_CHECKPOINT_DIR (a bucket mount on a spot VM) or `configured`."""
    return Path(os.environ.get(ENV_DIR) or configured)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER and not p.name.startswith(".tmp"))


Listing = dict[str, dict[str, Any]]  # file (relative) -> {"size", "sha256"}


def listing(directory: Path) -> Listing:
    """Every file of a checkpoint directory as this node sees it, with its size and sha256 ({} if it is absent)."""
    if not directory.is_dir():
        return {}
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in _files(directory)}


def merge(parts: list[tuple[Listing, Listing]]) -> Listing:
    """The nodes' listings as one. Each part is a node's (before, after): what it saw of the directory before this
    save (a stale copy left by an earlier attempt at the same step) and after it. Where the nodes see different
    copies of a file, the right one is the copy a node wrote in this save: its content differs from what that node
    saw before. Contents decide, never modification times, which nodes' clocks and a bucket sync both change. A file
    no node wrote in this save keeps the copy the first node (rank 0's) sees."""
    written: Listing = {}
    kept: Listing = {}
    for before, after in parts:
        for name, entry in after.items():
            if before.get(name, {}).get("sha256") != entry["sha256"]:
                written.setdefault(name, entry)
            else:
                kept.setdefault(name, entry)
    return kept | written


def seal(directory: Path, before: Listing | None = None) -> None:
    """Every process: each node's main process lists the checkpoint's files it sees (and gives `before`, its
    listing from before the save); rank 0 writes the marker from all of them, after all of them are in (a
    collective: call it on every process, after the save)."""
    parts = all_gather((before or {}, listing(directory)) if local_main() else None)
    if rank() == 0:
        mark_complete(directory, [part for part in parts if part is not None])


def mark_complete(directory: Path, parts: list[tuple[Listing, Listing]] | None = None) -> None:
    """Write the completion marker of a fully written checkpoint directory, from the nodes' (before, after)
    listings (default: this process's own view)."""
    merged = merge(parts if parts is not None else [({}, listing(directory))])
    files = {name: {"size": entry["size"], "sha256": entry["sha256"]} for name, entry in merged.items()}
    tmp = directory / f".tmp-{MARKER}"
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump({"files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MARKER)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some mounts cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check(directory: Path, *, hashes: bool = True) -> str | None:
    """Why `directory` is not a complete checkpoint, or None if it is (`hashes=False`: every listed file there with
    its size, without reading it: what pruning needs at every save, which must not re-read whole checkpoints)."""
    marker = directory / MARKER
    if not marker.is_file():
        return "no completion marker (torn by a kill mid-write?)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable completion marker: {exc}"
    if not files:
        return "empty checkpoint"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} {MISSING}"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if hashes and file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def step_of(directory: Path) -> int:
    match = _STEP.match(directory.name)
    return int(match.group(1)) if match else -1


def checkpoints(run_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory in `run_dir`, newest first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)


def newest_complete(run_dir: Path) -> Path | None:
    """The checkpoint to resume from, the same on every process (a collective: call it on every process): each node's
    main process checks the checkpoints it sees; rank 0 picks the newest one complete in every node's view and
    broadcasts its step. Rank 0 alone removes newer ones, and only those torn or damaged in every view; a newer one
    complete on some node, or sealed but with files not yet synced to a node (an upload in flight), is kept and
    skipped."""
    view = {step_of(d): check(d) for d in checkpoints(run_dir)} if local_main() else None
    views = [v for v in all_gather(view) if v is not None]
    chosen = None
    if rank() == 0:
        for step in sorted(set().union(*views), reverse=True):
            problems = [(f"node {i}: " if len(views) > 1 else "") + v.get(step, "not there")
                        for i, v in enumerate(views) if v.get(step, "") is not None]
            if not problems:
                chosen = step
                break
            directory = run_dir / f"checkpoint-{step}"
            syncing = len(views) > 1 and any(p.endswith(MISSING) for p in problems)
            if len(problems) < len(views) or syncing:
                log.warning("skipping checkpoint %s: not complete on every node yet (%s); kept", directory,
                            "; ".join(problems))
            else:
                log.warning("skipping checkpoint %s: %s; removing it", directory, "; ".join(problems))
                shutil.rmtree(directory, ignore_errors=True)
    chosen = broadcast(chosen)
    return None if chosen is None else run_dir / f"checkpoint-{chosen}"


def prune(run_dir: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints complete on every node, and every newer one; delete the older ones (a
    collective: call it on every process). Each node's main process checks the checkpoints it sees; rank 0, which
    alone deletes, counts only the ones complete in every view. So while uploads are in flight (a checkpoint sealed
    on one node, its files not yet synced to another) the newest checkpoint complete everywhere is never removed,
    whatever rank 0's own view says."""
    view = {step_of(d) for d in checkpoints(run_dir) if check(d, hashes=False) is None} if local_main() else None
    views = [v for v in all_gather(view) if v is not None]
    if rank() != 0 or not views:
        return
    everywhere = sorted(set.intersection(*views), reverse=True)
    if len(everywhere) < max(keep, 1):
        return
    oldest_kept = everywhere[max(keep, 1) - 1]
    for directory in checkpoints(run_dir):
        if step_of(directory) < oldest_kept:
            shutil.rmtree(directory, ignore_errors=True)


def finished(run_dir: Path) -> None:
    """A run wrote its outputs: remove its checkpoints (optimizer states included). Call only after the outputs are
    complete; a run killed before that keeps them and resumes."""
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("training finished and its outputs are written: removed its checkpoints in %s", run_dir)


def keep_count(configured: int) -> int:
    """How many complete checkpoints to keep. On a bucket mount ($SKYTUNE_CHECKPOINT_DIR, MOUNT_CACHED) files upload
    in the background after they are written, so the newest complete checkpoint may not be in the bucket yet when
    the VM dies: the one before it is kept too, whatever train.save_total_limit says."""
    if configured < 2 and os.environ.get(ENV_DIR):
        log.warning("train.save_total_limit %d on a bucket mount (%s): keeping 2, so an upload still in flight "
                    "never leaves the bucket without a complete checkpoint", configured, ENV_DIR)
        return 2
    return configured


def exit_preempted() -> NoReturn:
    """Exit with PREEMPTED_EXIT_CODE, telling a launcher that waits on this process (skytune.core.processes) as well."""
    flag = os.environ.get(PREEMPTED_FILE_ENV)
    if flag:
        Path(flag).touch()
    raise SystemExit(PREEMPTED_EXIT_CODE)


class PreemptionNotice:
    """Turns SIGTERM (a spot preemption notice, `sky jobs cancel`, a scheduler's stop) into a flag the training loop
    polls, so it can save a checkpoint and exit with PREEMPTED_EXIT_CODE instead of dying mid-step."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting with %d",
                        PREEMPTED_EXIT_CODE)
        self.received = True

    def __enter__(self) -> PreemptionNotice:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)
