"""Data once: the data stages' outputs for the launched commit and overrides, computed on this machine and pushed
to the DVC remote with their run-cache, so that GPU nodes restore them instead of computing them.

    python -m skytune.face.cloud.remote_data status [--overrides "data.sources=..."]   what the remote lacks
    python -m skytune.face.cloud.remote_data push [--overrides "..."]      compute what it lacks here, then push it

`make launch` and `make sweep` push before launching (once per distinct set of data overrides: a sweep over
train.lora_r prepares its data once); `make preflight` reports. A node runs `dvc exp run --pull --allow-missing`
(sky/node.sh): DVC pulls the remote's run-cache, and a stage whose command, dependencies and params match an entry
there is restored ("Stage 'merge_data' is cached - skipping run"), not run. A data stage that still runs on a node
says so in its log (skytune.stages.run_stage).

The work happens in a temporary `git worktree` of HEAD (the commit the node clones) with the overrides applied by
DVC's own code and this repository's cache: the working tree is never touched, and a stage already run here is
restored from the local run-cache in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from skytune.core.errors import SkytuneError, reported
from skytune.face import commands
from skytune.face.cloud import buckets, dvc_internals
from skytune.face.cloud import overrides as ov
from skytune.stages import DATA_STAGES, DVC_FILE

Pairs = list[tuple[str, str]]


class RemoteDataError(SkytuneError):
    """The data stages could not be computed or pushed; the message says what DVC said."""


def data_keys(dvc_file: Path = DVC_FILE) -> set[str]:
    """The params keys the data stages declare in dvc.yaml (a key or a whole section)."""
    stages = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    # `paths` too: the stages' dependencies and outputs are ${paths.*}, part of every run-cache key.
    return {"paths"} | {key for name in DATA_STAGES for key in stages[name].get("params", [])}


def data_pairs(pairs: Pairs, keys: set[str]) -> Pairs:
    """The overrides that change what a data stage reads (`train.max_length` does; `train.lora_r` does not)."""
    return [(k, v) for k, v in pairs if any(k == key or k.startswith(key + ".") for key in keys)]


def distinct(points: list[Pairs], keys: set[str]) -> list[Pairs]:
    """One entry per distinct set of data overrides among `points`, in order: what must be prepared."""
    seen: dict[tuple[tuple[str, str], ...], Pairs] = {}
    for point in points:
        relevant = data_pairs(point, keys)
        seen.setdefault(tuple(sorted(relevant)), relevant)
    return list(seen.values())


def _dvc(cwd: Path, *args: str) -> str:
    """`dvc <args>` in `cwd`: what it printed, stdout and stderr (its log of the stages it ran)."""
    done = commands.run([*commands.DVC, *args], cwd=cwd, error=RemoteDataError)
    return done.stdout + done.stderr


@contextlib.contextmanager
def worktree(pairs: Pairs, repo: Path = Path(".")) -> Iterator[Path]:
    """HEAD checked out in a temporary git worktree with `pairs` applied to its params.yaml as `dvc exp run -S` does,
    sharing this repository's DVC cache and local config (the remote's endpoint)."""
    from dvc.utils.hydra import apply_overrides

    repo = repo.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="skytune-data-"))
    tree = tmp / "tree"
    commands.git("worktree", "prune", cwd=repo, error=RemoteDataError)  # trees a killed run left behind
    commands.git("worktree", "add", "--quiet", "--detach", str(tree), "HEAD", cwd=repo, error=RemoteDataError)
    try:
        local = repo / buckets.DVC_DIR / "config.local"
        if local.is_file():
            shutil.copyfile(local, tree / buckets.DVC_DIR / "config.local")
        _dvc(tree, "config", "--local", "cache.dir", str(repo / buckets.DVC_DIR / "cache"))
        if pairs:
            apply_overrides(str(tree / "params.yaml"), [f"{k}={v}" for k, v in pairs])
        yield tree
    finally:
        commands.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, error=None)
        shutil.rmtree(tmp, ignore_errors=True)


def compute(tree: Path) -> tuple[list[str], float]:
    """Run (or restore from the local run-cache) the data stages in `tree`: (the stages that really ran, seconds)."""
    start = time.monotonic()
    log = _dvc(tree, "repro", DATA_STAGES[-1])
    return dvc_internals.stages_run(log), time.monotonic() - start


@contextlib.contextmanager
def _run_cache(tree: Path) -> Iterator[tuple[Any, tuple[Any, str], dict[str, str]]]:
    """DVC's repository in `tree`, the default remote's run-cache (file system, root), and each data stage's
    run-cache directory."""
    with dvc_internals.opened(tree) as repo:
        runs = {name: dvc_internals.run_dir(dvc_internals.stage_key(repo, name)) for name in DATA_STAGES}
        yield repo, dvc_internals.remote_runs(repo), runs


def missing(tree: Path) -> list[str]:
    """What the default DVC remote lacks for the data stages as computed in `tree`: a run-cache entry (what lets a node
    skip the stage) or an output's files (what it restores)."""
    try:
        with _run_cache(tree) as (repo, (fs, root), runs):
            lacking = [f"{name}: run-cache entry" for name, run in runs.items() if not fs.exists(fs.join(root, run))]
            status = repo.status(targets=[DATA_STAGES[-1]], with_deps=True, cloud=True)
    except Exception as exc:  # noqa: BLE001 - botocore and DVC raise many types (auth, DNS, missing bucket)
        raise RemoteDataError(f"the DVC remote cannot be read ({type(exc).__name__}: {exc}): `make preflight` "
                              "checks its endpoint and the AWS_* credentials") from None
    return lacking + [f"{path}: {state}" for path, state in sorted(status.items())]


def push(tree: Path) -> None:
    """The data stages' outputs, and their run-cache entries alone, to the default remote. (`dvc push --run-cache`
    would send every entry of this machine's run-cache: other stages' too, such as an evaluate_base scored here on
    another engine than a GPU node's.)"""
    _dvc(tree, "push", "--with-deps", DATA_STAGES[-1])
    with _run_cache(tree) as (repo, (fs, root), runs):
        local_fs, local_root = dvc_internals.local_runs(repo)
        for run in runs.values():
            for entry in local_fs.find(local_fs.join(local_root, run)):
                fs.put_file(entry, fs.join(root, run, local_fs.name(entry)))


def prepare(points: list[Pairs], *, dry_run: bool = False, repo: Path = Path(".")) -> list[str]:
    """Make sure the remote holds the data stages' outputs for HEAD with each point's overrides (computed here once
    per distinct set of data overrides). Returns what was missing; with `dry_run`, only reports it."""
    buckets.dvc_remote(repo)
    reported_missing = []
    for pairs in distinct(points, data_keys(repo / DVC_FILE)):
        label = ov.render(pairs) or "params.yaml as committed"
        with worktree(pairs, repo) as tree:
            ran, seconds = compute(tree)
            lacking = missing(tree)
            where = f"data stages ({label}): " + (f"computed here in {seconds:.0f} s ({', '.join(ran)})" if ran
                                                  else "restored from this machine's run-cache")
            if not lacking:
                print(f"{where}; all on the remote")
                continue
            reported_missing += [f"{label}: {item}" for item in lacking]
            if dry_run:
                print(f"{where}; missing on the remote: {', '.join(lacking)}")
                continue
            push(tree)
            print(f"{where}; pushed with their run-cache entries ({len(lacking)} item(s) were missing)")
    return reported_missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.face.cloud.remote_data",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "push"])
    parser.add_argument("--overrides", default=os.environ.get(ov.ENV, ""), help='e.g. "train.max_length=512"')
    args = parser.parse_args(argv)
    pairs = ov.parse(args.overrides)
    ov.check(pairs)
    lacking = prepare([pairs], dry_run=args.command == "status")
    return 1 if lacking and args.command == "status" else 0


if __name__ == "__main__":
    with reported():
        sys.exit(main())
