"""Checkpoint bookkeeping: the completion marker, torn and damaged checkpoints, pruning, the SIGTERM flag."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

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


# One "node" of the two-node simulations below: a gloo process whose checkpoint root is its node's own directory.
NODE = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
from skytune.core.training import checkpoints
rank, phase, root, step = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", rank=rank, world_size=2)
if phase == "save":  # what each node writes of checkpoint-<step>: rank 0 the adapter, every rank its rng state
    directory = root / f"checkpoint-{step}"
    before = checkpoints.listing(directory)  # what an earlier attempt at this step left here (Checkpointing)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rng_state_{rank}.pth").write_bytes(bytes([rank]) * 1000)
    if rank == 0:
        (directory / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    dist.barrier()
    checkpoints.seal(directory, before)
elif phase == "prune":
    checkpoints.prune(root, keep=int(step))
else:
    resume = checkpoints.newest_complete(root)
    print(json.dumps(None if resume is None else resume.name))
dist.destroy_process_group()
"""
ADAPTER = hashlib.sha256(b"weights" * 100).hexdigest()
RNG_1 = hashlib.sha256(bytes([1]) * 1000).hexdigest()


def run_nodes(phase: str, views: dict[int, Path], step: int = 40) -> list[str]:
    """Both nodes at once, each on its own view of the checkpoint directory (MOUNT_CACHED gives every node its own
    cache of the bucket)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    nodes = [subprocess.Popen([sys.executable, "-c", NODE, str(rank), phase, str(view), str(step)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, view in views.items()]
    outs = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outs
    return [out.strip().splitlines()[-1] if out.strip() else "" for out, _ in outs]


def sync(source: Path, target: Path, *, rng_of: int | None = None) -> None:
    """The bucket sync, one way: every file `source` has reaches `target` (what MOUNT_CACHED does, later); with
    `rng_of`, only what that node wrote itself (its rng states), the upload of its own writes."""
    for path in source.rglob("*"):
        if path.is_file() and (rng_of is None or path.name == f"rng_state_{rng_of}.pth"):
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.relative_to(source))


def test_two_nodes_with_delayed_caches_agree_on_a_checkpoint_complete_on_both(tmp_path: Path) -> None:
    views = {0: tmp_path / "node0", 1: tmp_path / "node1"}
    make(views[0], 20)  # checkpoint-20: complete and synced everywhere
    sync(views[0], views[1])
    # checkpoint-40 is saved; rank 0 writes the marker from both nodes' listings, in its own view.
    run_nodes("save", views)
    marker = json.loads((views[0] / "checkpoint-40" / checkpoints.MARKER).read_text())["files"]
    assert set(marker) == {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"}  # node 1's file too
    assert marker["rng_state_1.pth"]["sha256"] == RNG_1
    assert not (views[1] / "checkpoint-40" / checkpoints.MARKER).exists()  # not yet synced to node 1
    sync(views[0], views[1])  # node 0's files and marker reached node 1: complete there, not on node 0
    assert checkpoints.check(views[1] / "checkpoint-40") is None
    # A torn checkpoint-60 on both nodes (killed mid-save).
    for rank, view in views.items():
        (view / "checkpoint-60").mkdir()
        (view / "checkpoint-60" / f"rng_state_{rank}.pth").write_bytes(b"partial")
    # Preempted now, before node 1's upload reached node 0: a resume on both views.
    assert checkpoints.check(views[0] / "checkpoint-40") == "rng_state_1.pth is missing"
    assert run_nodes("resume", views) == ['"checkpoint-20"', '"checkpoint-20"']  # complete on every node
    assert (views[0] / "checkpoint-40").is_dir()  # complete on node 1, node 1's part still on its way to node 0: kept
    assert (views[1] / "checkpoint-40" / "rng_state_1.pth").is_file()  # rank 1 deletes nothing
    assert not (views[0] / "checkpoint-60").exists()  # torn on every node: rank 0 removed it
    assert (views[1] / "checkpoint-60").is_dir()  # only rank 0 deletes (its removal reaches node 1 through the bucket)
    # Once the sync caught up both ways, both nodes resume from checkpoint-40.
    sync(views[1], views[0])
    sync(views[0], views[1])
    shutil.rmtree(views[1] / "checkpoint-60")
    assert run_nodes("resume", views) == ['"checkpoint-40"', '"checkpoint-40"']


def test_a_stale_copy_from_an_earlier_attempt_loses_to_the_fresh_one() -> None:
    """The copy a node wrote in this save wins, whatever the order of the nodes; mtimes play no part."""
    fresh = {"f": {"size": 1, "sha256": "new"}}
    stale = {"f": {"size": 1, "sha256": "old"}}
    assert checkpoints.merge([(stale, stale), (stale, fresh)])["f"]["sha256"] == "new"
    assert checkpoints.merge([(stale, fresh), (stale, stale)])["f"]["sha256"] == "new"
    assert checkpoints.merge([({}, fresh), ({}, stale)])["f"]["sha256"] == "new"  # both new: the first node's


def test_two_nodes_with_a_skewed_clock_and_two_uploads_in_flight(tmp_path: Path) -> None:
    """An earlier attempt at step 40 left stale copies on both nodes, node 1's clock an hour ahead (its stale file
    looks newest); then checkpoints 40 and 60 are saved and both uploads are in flight when pruning runs."""
    views = {0: tmp_path / "node0", 1: tmp_path / "node1"}
    make(views[0], 20)
    sync(views[0], views[1])  # checkpoint-20: complete on both nodes
    ahead = time.time() + 3600
    for rank, name in ((1, "adapter_model.safetensors"), (0, "rng_state_1.pth")):
        stale = views[rank] / "checkpoint-40" / name
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"an earlier attempt")
        os.utime(stale, (ahead, ahead))
    run_nodes("save", views, step=40)
    run_nodes("save", views, step=60)
    marker = json.loads((views[0] / "checkpoint-40" / checkpoints.MARKER).read_text())["files"]
    assert marker["adapter_model.safetensors"]["sha256"] == ADAPTER  # node 0 wrote it; node 1's copy is stale
    assert marker["rng_state_1.pth"]["sha256"] == RNG_1  # node 1 wrote it; node 0's copy is stale
    # Uploads in flight both ways: rank 0's own view has markers on 40 and 60, yet neither is complete on every
    # node. Pruning to 2 keeps checkpoint-20, the only one a resume can use.
    run_nodes("prune", views, step=2)
    assert [checkpoints.check(v / "checkpoint-20") for v in views.values()] == [None, None]
    assert checkpoints.check(views[0] / "checkpoint-40") == "rng_state_1.pth has 18 bytes, 1000 were written"
    assert checkpoints.check(views[1] / "checkpoint-60") == "no completion marker (torn by a kill mid-write?)"
    # The sync catches up: each node's writes reach the other; 40 and 60 are complete everywhere, and now
    # checkpoint-20 goes (from rank 0's view, the bucket's removal reaching node 1 later).
    sync(views[1], views[0], rng_of=1)
    for step in (40, 60):
        for name in ("adapter_model.safetensors", "rng_state_0.pth", checkpoints.MARKER):
            shutil.copy2(views[0] / f"checkpoint-{step}" / name, views[1] / f"checkpoint-{step}" / name)
    run_nodes("prune", views, step=2)
    assert sorted(p.name for p in views[0].iterdir()) == ["checkpoint-40", "checkpoint-60"]
    assert run_nodes("resume", views) == ['"checkpoint-60"', '"checkpoint-60"']


def test_the_callback_lists_what_an_earlier_attempt_left_before_the_save(tmp_path: Path) -> None:
    """Checkpointing.on_step_end lists a checkpoint directory of the coming step left by an earlier attempt, the
    `before` that lets the marker prefer this save's copies (nothing when there is none)."""
    from types import SimpleNamespace

    from skytune.core.training.callbacks import Checkpointing

    callback = Checkpointing(tmp_path / "dvclive", dict, keep=2)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=40)
    callback.on_step_end(args, state, None)
    assert callback.before == {}
    stale = tmp_path / "checkpoint-40" / "adapter_model.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier attempt")
    callback.on_step_end(args, state, None)
    assert callback.before == {"adapter_model.safetensors": {"size": 18, "sha256": hashlib.sha256(
        b"an earlier attempt").hexdigest()}}
