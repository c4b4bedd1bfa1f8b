"""Checkpoint bookkeeping: the completion marker, torn and damaged checkpoints, pruning, the SIGTERM flag."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import skytune
from skytune.core.models.base import BaseModel
from skytune.core.training import checkpoints


def make(run_dir: Path, step: int, complete: bool = True) -> Path:
    directory = run_dir / f"checkpoint-{step}"
    (directory / "sub").mkdir(parents=True)
    (directory / "adapter.safetensors").write_bytes(os.urandom(64))
    (directory / "sub" / "optimizer.pt").write_bytes(os.urandom(32))
    if complete:
        checkpoints.mark_complete(directory)
    return directory


def test_newest_complete_skips_torn_and_damaged_checkpoints(tmp_path: Path) -> None:
    c10, c20 = make(tmp_path, 10), make(tmp_path, 20)
    c30 = make(tmp_path, 30, complete=False)  # killed mid-write: no marker
    assert checkpoints.newest_complete(tmp_path) == c20
    assert not c30.exists()  # removed, so the trainer never writes into a torn directory
    (c20 / "sub" / "optimizer.pt").write_bytes(b"flipped bits, same size!" + bytes(8))
    assert "sha256" in checkpoints.check(c20)
    assert checkpoints.newest_complete(tmp_path) == c10
    (c10 / "adapter.safetensors").unlink()
    assert checkpoints.newest_complete(tmp_path) is None
    assert checkpoints.newest_complete(tmp_path / "absent") is None


def test_check_names_what_is_wrong(tmp_path: Path) -> None:
    directory = make(tmp_path, 5)
    assert checkpoints.check(directory) is None
    with (directory / "adapter.safetensors").open("ab") as fh:
        fh.write(b"x")
    assert "65 bytes, 64 were written" in checkpoints.check(directory)
    (directory / checkpoints.MARKER).write_text("{not json")
    assert "unreadable completion marker" in checkpoints.check(directory)


def test_prune_keeps_the_newest_complete_ones_only(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        make(tmp_path, step)
    make(tmp_path, 5, complete=False)  # older than a complete one: can never be resumed
    make(tmp_path, 40, complete=False)  # being written right now: must survive
    checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]


def test_a_bucket_mount_keeps_the_checkpoint_before_the_newest(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On MOUNT_CACHED the newest checkpoint may still be uploading when the VM dies: the one before it stays."""
    monkeypatch.delenv(checkpoints.ENV_DIR, raising=False)
    assert checkpoints.keep_count(1) == 1
    monkeypatch.setenv(checkpoints.ENV_DIR, str(tmp_path / "bucket"))
    assert checkpoints.keep_count(1) == 2 and checkpoints.keep_count(3) == 3
    for step in (10, 20):
        make(tmp_path, step)
    checkpoints.prune(tmp_path, keep=checkpoints.keep_count(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]


def test_fingerprint_is_stable_and_input_sensitive() -> None:
    a = checkpoints.fingerprint({"train": {"lr": 1e-4, "r": 8}, "data": ["abc"]})
    assert a == checkpoints.fingerprint({"data": ["abc"], "train": {"r": 8, "lr": 1e-4}})
    assert a != checkpoints.fingerprint({"train": {"lr": 1e-4, "r": 16}, "data": ["abc"]})


def test_the_code_digest_covers_every_module_of_the_package(tmp_path: Path) -> None:
    import shutil

    package = Path(skytune.__file__).parent
    copy = tmp_path / "skytune"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert checkpoints.code_digest(copy) == checkpoints.code_digest() == checkpoints.code_digest(package)
    module = copy / "stages" / "export.py"  # a module the train stage does not even import
    module.write_text(module.read_text() + "\n# an edit\n")
    assert checkpoints.code_digest(copy) != checkpoints.code_digest()


def test_the_train_fingerprint_covers_code_and_library_versions(monkeypatch: pytest.MonkeyPatch, pipeline) -> None:
    import contextlib

    from skytune.core.params import load_params
    from skytune.stages import train

    with contextlib.chdir(pipeline.root):
        params = load_params()
        base = BaseModel.load(params.paths.base_model_dir)
        before = train._fingerprint(params, base)
        monkeypatch.setattr(checkpoints, "code_digest", lambda: "another code")
        after_code = train._fingerprint(params, base)
        installed = checkpoints.library_versions()
        monkeypatch.setattr(checkpoints, "library_versions", lambda: {**installed, "torch": "9.9"})
        after_versions = train._fingerprint(params, base)
    assert len({before, after_code, after_versions}) == 3
    assert set(installed) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}


def test_root_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(checkpoints.ENV_DIR, raising=False)
    assert checkpoints.root("models/checkpoints") == Path("models/checkpoints")
    monkeypatch.setenv(checkpoints.ENV_DIR, str(tmp_path / "bucket"))
    assert checkpoints.root("models/checkpoints") == tmp_path / "bucket"


def test_sigterm_sets_the_notice_and_the_handler_is_restored(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with checkpoints.PreemptionNotice() as notice:
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.received
    assert signal.getsignal(signal.SIGTERM) == previous
    flag = tmp_path / "preempted"
    monkeypatch.setenv(checkpoints.PREEMPTED_FILE_ENV, str(flag))
    with pytest.raises(SystemExit) as exc:
        checkpoints.exit_preempted()
    assert exc.value.code == checkpoints.PREEMPTED_EXIT_CODE and flag.exists()
