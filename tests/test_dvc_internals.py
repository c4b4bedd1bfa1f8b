"""What skytune.face.cloud.dvc_internals relies on in DVC, pinned on a real repository with a local remote: the
run-cache key and layout, where `dvc push --run-cache` puts a run on the remote, and the log line of a stage that
ran. A DVC upgrade that changes one of them fails here, not on a user's launch."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import sh

from skytune.face.cloud import dvc_internals

STAGE = "make"


def project(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=repo)
    (repo / "input.txt").write_text("an input\n")
    (repo / "dvc.yaml").write_text(f"stages:\n  {STAGE}:\n    cmd: cp input.txt out.txt\n    deps: [input.txt]\n"
                                   "    outs: [out.txt]\n")
    return repo


def test_a_stage_run_is_filed_where_the_adapter_says_here_and_on_the_remote(tmp_path: Path) -> None:
    repo = project(tmp_path)
    log = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    assert dvc_internals.stages_run(log) == [STAGE]
    with dvc_internals.opened(repo) as dvc_repo:
        key = dvc_internals.stage_key(dvc_repo, STAGE)
        assert len(key) == 64 and int(key, 16) >= 0  # a sha256
        run = dvc_internals.run_dir(key)
        local_fs, local_root = dvc_internals.local_runs(dvc_repo)
        assert local_fs.find(local_fs.join(local_root, run))  # the run DVC just cached, under the adapter's path
        remote_fs, remote_root = dvc_internals.remote_runs(dvc_repo)
        assert not remote_fs.exists(remote_fs.join(remote_root, run))
    sh(sys.executable, "-m", "dvc", "push", "--run-cache", cwd=repo)
    with dvc_internals.opened(repo) as dvc_repo:
        remote_fs, remote_root = dvc_internals.remote_runs(dvc_repo)
        assert remote_fs.exists(remote_fs.join(remote_root, run))  # where push --run-cache put it
    # The key is the run dvc.lock records: an edited input changes nothing until the stage runs again.
    (repo / "input.txt").write_text("another input\n")
    with dvc_internals.opened(repo) as dvc_repo:
        assert dvc_internals.stage_key(dvc_repo, STAGE) == key
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    with dvc_internals.opened(repo) as dvc_repo:
        assert dvc_internals.stage_key(dvc_repo, STAGE) != key


def test_a_stage_restored_from_the_run_cache_is_not_said_to_run(tmp_path: Path) -> None:
    repo = project(tmp_path)
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    (repo / "dvc.lock").unlink()
    (repo / "out.txt").unlink()
    log = sh(sys.executable, "-m", "dvc", "repro", cwd=repo)
    assert dvc_internals.stages_run(log) == [] and (repo / "out.txt").read_text() == "an input\n", log
