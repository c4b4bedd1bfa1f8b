"""The few DVC internals the data push relies on, in one place (DVC has no public API for its run-cache).

- `stage_key`: the key DVC's stage cache files a stage's run under (`dvc.stage.cache._get_stage_hash`), and
  `run_dir`, where that run lives in a cache: `runs/<key[:2]>/<key>`;
- `local_runs` and `remote_runs`: the file systems and roots of this repository's run-cache (`repo.cache.legacy`) and
  of the default remote's (`repo.cloud.get_remote_odb(..., hash_name="md5-dos2unix")`, where `dvc push --run-cache`
  writes it);
- `stages_run`: the stages `dvc repro` ran rather than restored, read from its log ("Running stage 'name':").

tests/test_dvc_internals.py pins each of these on a real repository, so a DVC upgrade that changes one fails there
and not silently on a launch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_RAN = re.compile(r"Running stage '([\w@.-]+)'")


@contextlib.contextmanager
def opened(tree: Path) -> Iterator[Any]:
    """DVC's repository object for the project at `tree` (DVC resolves stage paths against the working directory,
    so the process works there meanwhile)."""
    from dvc.repo import Repo

    with contextlib.chdir(tree), Repo(".") as repo:
        yield repo


def stage_key(repo: Any, stage: str) -> str:
    """The run-cache key of `stage`'s run as dvc.lock records it (after `dvc repro`: the run just done or restored;
    an input edited since does not count until the stage runs again)."""
    from dvc.stage.cache import _get_stage_hash

    return _get_stage_hash(repo.stage.collect(stage)[0])


def run_dir(key: str) -> str:
    """Where a run-cache entry lives, relative to a cache's root."""
    return f"runs/{key[:2]}/{key}"


def local_runs(repo: Any) -> tuple[Any, str]:
    """(file system, root) of this repository's run-cache."""
    local = repo.cache.legacy
    return local.fs, local.path


def remote_runs(repo: Any) -> tuple[Any, str]:
    """(file system, root) of the default remote's run-cache."""
    odb = repo.cloud.get_remote_odb(None, "push --run-cache", hash_name="md5-dos2unix")
    return odb.fs, odb.path


def stages_run(log: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` log says it ran (a stage restored from the run-cache is not one)."""
    return _RAN.findall(log)
