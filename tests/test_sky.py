"""The sky/ YAMLs: SkyPilot's own validation in the launcher's environment, the project's promises about them, and a
local-node simulation of the training job's setup and run (real git, DVC and a bare origin; no cloud)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import git_http
import pytest
import yaml
from conftest import BUCKETS, REPO, free_port
from test_pipeline_e2e import PATHS, clone_project, sh, stages_ran

from skytune.core import job_ledger
from skytune.core.errors import SkytuneError
from skytune.core.training.checkpoints import PREEMPTED_EXIT_CODE
from skytune.stages import DATA_STAGES

DVC_REMOTE_URL = "s3://my-dvc/skytune"  # the remote the user commits (README: "Cloud"); the project names none

# SkyPilot's environment (`make launcher`, a prerequisite of `make test`, which exports SKY=<it>/bin/sky).
SKY_ENV = Path(os.environ["SKY"]).parents[1] if os.environ.get("SKY") else Path("/nonexistent")
YAMLS = sorted((REPO / "sky").glob("*.yaml"))
TRAINING = [REPO / "sky" / "train.yaml", REPO / "sky" / "train-multinode.yaml"]
needs_launcher = pytest.mark.skipif(not (SKY_ENV / ".installed").is_file(),
                                    reason="SkyPilot's environment is not built: run through `make test` (or `make "
                                           "launcher` and set SKY)")


def validate(*paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    return subprocess.run([str(SKY_ENV / "bin" / "python"), str(REPO / "sky" / "validate.py"), *map(str, paths)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


@needs_launcher
def test_every_sky_yaml_passes_skypilots_validation(tmp_path: Path) -> None:
    assert {p.name for p in YAMLS} == {"train.yaml", "train-multinode.yaml", "dev.yaml", "serve.yaml"}
    done = validate(*YAMLS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == len(YAMLS)
    # ... and the validation is real: typos in a service, a storage mode and job recovery are caught.
    broken = [
        ("serve.yaml", "readiness_probe:", "readines_probe:", "did you mean 'readiness_probe'"),
        ("train.yaml", "mode: MOUNT_CACHED", "mode: MOUNT_CACHE", "'MOUNT_CACHE' is not one of"),
        ("train.yaml", "ref: ${GIT_REF}", "ref: ${GIT_COMMIT}", "a variable was not substituted"),
        ("train-multinode.yaml", "recover_on_exit_codes", "recover_on_exit_code", "unknown key(s)"),
    ]
    for name, old, new, expected in broken:
        assert old in (REPO / "sky" / name).read_text()
        bad = tmp_path / name
        bad.write_text((REPO / "sky" / name).read_text().replace(old, new))
        done = validate(bad)
        assert done.returncode == 1 and expected in done.stdout, done.stdout + done.stderr


def params_keys(node: object) -> set[str]:
    """Every key name in params.yaml, at any depth (lowercase, as params.yaml writes them)."""
    if isinstance(node, dict):
        return {str(k).lower() for k in node} | {k for v in node.values() for k in params_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in params_keys(v)}
    return set()


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_yamls_keep_the_projects_promises(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    resources = config["resources"]
    assert resources["any_of"] == [{"use_spot": True}, {"use_spot": False}]  # spot, on-demand fallback
    assert len(resources["accelerators"]) >= 2  # a set: the cheapest available
    recovery = resources["job_recovery"]
    assert PREEMPTED_EXIT_CODE in recovery["recover_on_exit_codes"] and recovery["max_restarts_on_errors"] >= 1
    assert config["file_mounts"]["${CHECKPOINT_MOUNT}"]["mode"] == "MOUNT_CACHED"
    assert config["envs"]["CHECKPOINT_MOUNT"].startswith("/")  # node.sh reads it (nowhere else writes the path)
    assert set(config["secrets"]) >= {"HF_TOKEN", "GIT_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v is None for v in config["secrets"].values())  # given at launch, never written here
    text = path.read_text().lower()
    assert ".ssh" not in text and "id_rsa" not in text  # never SSH keys on a spot VM
    assert config["setup"] == "bash sky/node.sh setup" and config["run"] == "bash sky/node.sh run"
    # No hyperparameter in a sky YAML: they live in params.yaml and arrive only through OVERRIDES.
    assert not {k.lower() for k in config["envs"]} & params_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert config["envs"]["OVERRIDES"] == ""
    if path.name == "train-multinode.yaml":
        assert config["num_nodes"] >= 2


def test_the_project_names_no_bucket() -> None:
    """Bucket names are global: a default one would send a user's data toward a stranger's bucket."""
    assert not [line for line in (REPO / ".dvc" / "config").read_text().splitlines()
                if not line.lstrip().startswith("#") and ("remote" in line or "url" in line)]
    for path in TRAINING:
        assert yaml.safe_load(path.read_text())["envs"]["CHECKPOINT_BUCKET"] is None  # required at launch
    assert urlparse(DVC_REMOTE_URL).netloc in BUCKETS


def test_skyignore_keeps_environments_and_outputs_off_the_upload() -> None:
    ignored = (REPO / ".skyignore").read_text().splitlines()
    assert {".venv/", ".venv-*/", "models/checkpoints/", ".dvc/cache/"} <= set(ignored)


def layered_venv(dest: Path) -> Path:
    """A node's own virtualenv on top of the tests' one: its site-packages reads the tests' environment after its
    own, so a node's `setup` (make install) finds the pinned packages installed and installs into `dest` only, the
    editable install of the node's clone included. The tests' environment, which other tests (and other xdist
    workers) import from meanwhile, is never written."""
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, timeout=120)
    ours = sysconfig.get_path("purelib")
    theirs = Path(sysconfig.get_path("purelib", vars={"base": str(dest), "platbase": str(dest)}))
    # A .pth line that imports runs at startup: addsitedir also reads the tests' .pth files (their editable install
    # sorts after the node's own `__editable__` file, so the node's clone comes first on sys.path).
    (theirs / "zz_tests_venv.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return dest


@dataclass(frozen=True)
class Origin:
    """The project pushed to a bare repository served over git's smart HTTP: anyone reads, the token pushes."""

    url: str
    commit: str
    token: str
    pushes: list[str]
    project: Path


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    root = tmp_path / "git"
    sh("git", "init", "-q", "--bare", "-b", "main", str(root / "skytune.git"), cwd=tmp_path)
    project = clone_project(tmp_path / "project")
    # What the README asks of a user first: a DVC remote of their own, committed.
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", DVC_REMOTE_URL, cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@l", "commit", "-qm", "DVC remote", ".dvc/config", cwd=project)
    sh("git", "push", "-q", str(root / "skytune.git"), "main", cwd=project)
    commit = sh("git", "rev-parse", "HEAD", cwd=project, stdout_only=True).strip()
    with git_http.serve(root, token="ghp-test-token") as (base, pushes):
        url = f"{base}/skytune.git"
        sh("git", "remote", "add", "origin", url, cwd=project)
        yield Origin(url, commit, "ghp-test-token", pushes, project)


TASK = "sky-managed-2026-11-24_skytune-train_7"  # a managed job's task id, the same across its recoveries


def node_env(tmp_path: Path, s3: dict[str, str], origin: Origin) -> dict[str, str]:
    """What SkyPilot gives sky/train.yaml's commands on a one-node, CPU-only job: its envs (GIT_REMOTE and GIT_REF as
    `make launch` passes them, GIT_URL as SkyPilot derives it from the git workdir) and secrets. The nodes of a test
    share one environment (`layered_venv`), as a managed job's recoveries share the image."""
    venv = tmp_path / "node-venv"
    return {**os.environ, **s3, "VENV": str(venv if venv.is_dir() else layered_venv(venv)),
            "SKYPILOT_TASK_ID": TASK, "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_GPUS_PER_NODE": "0",
            "OVERRIDES": "train.lora_r=4 train.epochs=3 train.save_steps=20",
            "SKYTUNE_MARKET": "spot", "SKYPILOT_CLUSTER_INFO": '{"cloud": "local", "region": "loopback"}',
            "GIT_REMOTE": origin.url, "GIT_REF": origin.commit, "GIT_URL": origin.url, "GIT_TOKEN": origin.token,
            # The checkpoint bucket's mount: a directory the S3 server serves as s3://my-checkpoints/<experiment>.
            "SKYTUNE_CHECKPOINT_DIR": str(Path(s3["S3_ROOT"], "my-checkpoints", TASK)),
            "SKYTUNE_HEARTBEAT_S": "0.2", "GIT_AUTHOR_NAME": "node",
            "GIT_AUTHOR_EMAIL": "node@localhost", "GIT_COMMITTER_NAME": "node", "GIT_COMMITTER_EMAIL": "node@localhost"}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, wherever their sessions are (skytune.face.cli preemptible starts DVC in
    its own session), as a VM that is gone takes all its processes with it."""
    tree, frontier = [pid], [pid]
    while frontier:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", ",".join(map(str, frontier))], capture_output=True,
                                  text=True, check=False).stdout.split()
        frontier = [int(c) for c in children]
        tree += frontier
    for victim in tree:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def new_node(tmp_path: Path, name: str, origin: Origin) -> Path:
    """A fresh VM's workdir as SkyPilot makes it from sky/train.yaml's git workdir: SkyPilot's own git_clone.sh
    with the environment SkyPilot gives it (GIT_URL, GIT_COMMIT_HASH for a commit ref, the GIT_TOKEN secret)."""
    node = tmp_path / name
    script = next((SKY_ENV / "lib").glob("python3*/site-packages/sky/utils/git_clone.sh"))
    env = {**os.environ, "GIT_URL": origin.url, "GIT_COMMIT_HASH": origin.commit, "GIT_TOKEN": origin.token}
    done = subprocess.run(["bash", str(script), str(node)], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # For an https URL git_clone.sh clones from https://<token>@host/..., which stays in origin; node.sh must undo
    # that. The test server is plain http, so put the token there as SkyPilot would.
    sh("git", "remote", "set-url", "origin", origin.url.replace("http://", f"http://{origin.token}@"), cwd=node)
    return node


@needs_launcher
@pytest.mark.slow
def test_training_job_survives_preemption_and_its_experiment_is_pulled_elsewhere(
        tmp_path: Path, s3: dict[str, str], origin: Origin) -> None:
    """sky/train.yaml's setup and run, as SkyPilot runs them on a node, against a real S3 server and a bare git
    origin: the first VM is killed mid-training, a fresh one resumes from the bucket checkpoint and pushes the
    experiment, and a second clone pulls it and shows it."""
    config = yaml.safe_load((origin.project / "sky" / "train.yaml").read_text())
    assert config["workdir"] == {"url": "${GIT_REMOTE}", "ref": "${GIT_REF}"}  # what new_node simulates
    env = node_env(tmp_path, s3, origin)
    name = TASK  # the experiment: node.sh names it after the task id

    # VM 1: setup, then run until the first checkpoint is complete in the bucket, then the VM disappears.
    first = new_node(tmp_path, "vm1", origin)
    done = subprocess.run(["bash", "-c", config["setup"]], cwd=first, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run = subprocess.Popen(["bash", "-c", config["run"]], cwd=first, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not any(Path(env["SKYTUNE_CHECKPOINT_DIR"]).rglob("COMPLETE.json")):
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    ledger_dir = Path(env["SKYTUNE_CHECKPOINT_DIR"]) / job_ledger.LEDGER
    # Training goes on past the checkpoint until a heartbeat follows it: work the next VM does again.
    while not [a for a in job_ledger.read(ledger_dir) if a.get("last_seen", 0) > a.get("checkpoint_at", float("inf"))]:
        assert run.poll() is None and time.monotonic() < deadline, "the checkpoint never reached the job ledger"
        time.sleep(0.05)
    kill_tree(run.pid)  # the VM disappears without notice: the worst case
    run.wait()
    first_seconds = json.loads(next(Path(env["SKYTUNE_CHECKPOINT_DIR"]).rglob("skytune_state.json")).read_text())[
        "node_seconds"]  # the first VM's wall time up to its checkpoint, carried by the checkpoint

    # VM 2 (a managed-job recovery: same task id, same bucket): resumes, finishes, pushes.
    second = new_node(tmp_path, "vm2", origin)
    for step in ("setup", "run"):
        done = subprocess.run(["bash", "-c", config[step]], cwd=second, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, f"{step}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"pushed experiment {name}" in done.stdout
    assert origin.pushes  # through the token-checking server: sky/git-askpass.sh answered DVC with GIT_TOKEN
    assert origin.token not in (second / ".git" / "config").read_text()  # node.sh took it out of origin
    train = json.loads((second / PATHS.train_metrics).read_text())
    assert train["resumed_from_step"] >= 20 and train["steps"] > train["resumed_from_step"]
    # What the experiment ran on and its wall hours: both VMs' (the first up to its checkpoint), not the second's alone.
    cloud = train["cloud"]
    assert {k: cloud[k] for k in ("accelerator", "gpus_per_node", "nodes", "market")} == {
        "accelerator": "cpu", "gpus_per_node": 0, "nodes": 1, "market": "spot"}
    assert cloud["wall_hours"] * 3600 > first_seconds + train["train_seconds"] and cloud["gpu_hours"] == 0
    # ... from the job ledger: both VMs from their setup (the first up to its last heartbeat), and the first VM's
    # seconds after its checkpoint apart, as lost.
    ledger = job_ledger.read(ledger_dir)
    first_vm, second_vm = ledger
    assert cloud["attempts"] == 2 and cloud["hours_cover"] == "setup and every attempt, through training"
    assert first_vm["last_seen"] > first_vm["run_started"] > first_vm["started"] and "finished" not in first_vm
    assert second_vm["finished"] > second_vm["checkpoint_at"] > second_vm["run_started"] > second_vm["started"]
    lost = max(0.0, first_vm["last_seen"] - first_vm["checkpoint_at"])  # a checkpoint may have completed meanwhile
    assert cloud["lost_wall_hours"] * 3600 == pytest.approx(lost, abs=0.2)
    assert cloud["wall_hours"] * 3600 >= first_vm["last_seen"] - first_vm["started"] + train["train_seconds"]
    assert list((Path(s3["S3_ROOT"]) / urlparse(DVC_REMOTE_URL).netloc).rglob("*"))  # the DVC cache is in S3

    # A recovery after the experiment was pushed (a fresh VM) has nothing to do: no training, no push.
    third = new_node(tmp_path, "vm3", origin)
    pushes = len(origin.pushes)
    again = subprocess.run(["bash", "-c", config["run"]], cwd=third, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0 and "already on origin" in again.stdout, again.stdout + again.stderr
    assert len(origin.pushes) == pushes and not (third / "dvc.lock").exists()

    # Anyone else: clone, point the remote at the endpoint, pull the experiment, compare.
    laptop = new_node(tmp_path, "laptop", origin)
    client = {**os.environ, **{k: v for k, v in s3.items() if k.startswith("AWS_")},
              "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
              "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
    sh_env = {"cwd": laptop}
    subprocess.run(["dvc", "remote", "modify", "--local", "storage", "endpointurl", s3["AWS_ENDPOINT_URL"]],
                   check=True, env=client, **sh_env)
    subprocess.run(["dvc", "exp", "pull", "origin", name], check=True, env=client, capture_output=True, **sh_env)
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, env=client, capture_output=True,
                                      text=True, **sh_env).stdout)
    found = {exp["name"]: rev["data"] for base in shown for exp in base.get("experiments") or []
             for rev in exp["revs"]}
    data = found[name]
    assert data["params"]["params.yaml"]["data"]["train"]["lora_r"] == 4
    assert data["metrics"][PATHS.train_metrics]["data"]["resumed_from_step"] >= 20
    assert {"val_perplexity_tuned", "ends_with_eot_tuned"} <= set(data["metrics"][PATHS.sanity_metrics]["data"])
    subprocess.run(["dvc", "exp", "apply", name], check=True, env=client, capture_output=True, **sh_env)
    sh("git", "checkout", "-q", "--", ".", cwd=laptop)  # back to the commit, for the launch below
    assert (laptop / PATHS.adapter_dir / "adapter_model.safetensors").is_file()  # its bytes came from S3

    # The sweep's comparison command on what was pushed (a sweep's experiments share a name prefix).
    table = subprocess.run([sys.executable, "-m", "skytune.face.cloud.sweep", "pull", "sky-managed"], check=True,
                           env={**client, "CHECKPOINT_BUCKET": "my-checkpoints"}, capture_output=True, text=True,
                           **sh_env).stdout
    header, _, row = (line.strip("|").split(" | ") for line in table.strip().splitlines()[-3:])
    job = dict(zip([h.strip() for h in header], [v.strip() for v in row], strict=True))
    # The whole job, read from the ledger in the checkpoint bucket: every stage and the push of the second VM too.
    whole = job_ledger.account(ledger)
    assert job["experiment"] == name and job["lora_r"] == "4" and job["accelerator"] == "cpu"
    assert job["hours"] == "whole job" and job["attempts"] == "2" and job["market"] == "spot"
    assert float(job["wall_hours"]) == round(whole["wall_seconds"] / 3600, 4) > cloud["wall_hours"]
    # Launching that name again at the same commit is refused on the laptop (the node would skip it as done).
    again = subprocess.run([sys.executable, "-m", "skytune.face.cloud.jobs", "launch", "--name", name, "--dry-run"],
                           env={**client, "CHECKPOINT_BUCKET": "my-checkpoints"}, capture_output=True, text=True,
                           check=False, **sh_env)
    assert again.returncode == 1 and f"experiment name(s) {name} already on origin" in again.stderr, again.stderr


@needs_launcher
def test_a_workdir_uploaded_without_git_stops_with_a_clear_error(tmp_path: Path, s3: dict[str, str],
                                                                origin: Origin) -> None:
    """What `sky jobs launch` does to `workdir: .` (uploaded through a bucket, .git left out): node.sh says so
    instead of failing inside DVC; sky/train.yaml therefore uses a git workdir."""
    upload = tmp_path / "upload"
    shutil.copytree(origin.project, upload, ignore=shutil.ignore_patterns(".git"))
    done = subprocess.run(["bash", "sky/node.sh", "run"], cwd=upload, env=node_env(tmp_path, s3, origin),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "not a git repository" in done.stderr and "git workdir" in done.stderr


@pytest.mark.slow
@needs_launcher
def test_preflight_checks_bucket_git_and_launcher(tmp_path: Path, s3: dict[str, str], origin: Origin) -> None:
    project = origin.project
    env = {**os.environ, **{k: v for k, v in s3.items() if k.startswith("AWS_")}, "GIT_TOKEN": origin.token,
           "CHECKPOINT_BUCKET": "my-checkpoints"}

    def preflight(*args: str, **changes: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "skytune.face.cloud.preflight",
                               "--sky", str(SKY_ENV / "bin" / "sky"), "--no-sky-check", *args], cwd=project,
                              env={**env, **changes}, capture_output=True, text=True, timeout=300, check=False)

    done = preflight()
    assert done.returncode == 0 and "preflight: 7/7 passed" in done.stdout, done.stdout + done.stderr
    assert "the DVC remote lacks" in done.stdout and "remote_data push" in done.stdout  # nothing pushed yet
    assert f"DVC remote storage: {DVC_REMOTE_URL} listed" in done.stdout and "my-checkpoints: listed" in done.stdout
    fresh = preflight(CHECKPOINT_BUCKET="my-new-checkpoints")
    assert "ok    checkpoints my-new-checkpoints: not created yet (SkyPilot creates it" in fresh.stdout
    assert f"HEAD {origin.commit[:12]} is on {origin.url}; pushing there is allowed" in done.stdout
    assert not origin.pushes  # a dry run: authenticated, nothing written
    wrong = preflight(AWS_SECRET_ACCESS_KEY="not-the-secret", GIT_TOKEN="not-the-token")
    assert wrong.returncode == 1 and "FAIL  bucket" in wrong.stdout and "signature" in wrong.stdout
    assert "FAIL  git" in wrong.stdout and "cannot push" in wrong.stdout and "GIT_TOKEN" in wrong.stdout
    missing = preflight("--remote", "nowhere", "--sky", str(tmp_path / "sky"))
    assert "FAIL  git" in missing.stdout and "FAIL  launcher" in missing.stdout and "make launcher" in missing.stdout
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("lora_r:", "lora_rank:"))
    typo = preflight()
    assert typo.returncode == 1 and "did you mean 'train.lora_r'" in typo.stdout
    assert "uncommitted changes (params.yaml)" in typo.stdout  # the node would not see the edit
    sh("git", "-c", "user.name=t", "-c", "user.email=t@l", "commit", "-qam", "unpushed", cwd=project)
    unpushed = preflight()
    assert "is not on origin" in unpushed.stdout and "git push origin" in unpushed.stdout


@needs_launcher
def test_sky_check_summary_is_read_as_skypilot_prints_it() -> None:
    """preflight reads `sky check`'s closing summary; the texts come from SkyPilot's own formatter."""
    from skytune.face.cloud.preflight import enabled_infra

    code = ("from sky import check, clouds; C = clouds.CloudCapability; "
            "print(check._summary_message({}, {}, 'default', True, []), '\\n\\n=====', "
            "check._summary_message({'AWS': [C.COMPUTE, C.STORAGE], 'Cloudflare': [C.STORAGE]}, {}, 'default', "
            "True, []))")
    done = subprocess.run([str(SKY_ENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    none, some = done.stdout.split("=====")
    assert enabled_infra("Checking credentials...\n  AWS: disabled\n" + none) == []
    clouds = enabled_infra(some)
    assert len(clouds) == 2 and [c for c in clouds if "compute" in c.lower()] == [clouds[0]] and "AWS" in clouds[0]


def test_sweep_fans_a_grid_out_to_one_job_each(origin: Origin, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from skytune.face.cloud import jobs, overrides, sweep

    prepared: list[list[list[tuple[str, str]]]] = []  # the data push has its own test (a real S3 server)
    monkeypatch.setattr(sweep.remote_data, "prepare", lambda points, **_: prepared.append(points) or [])

    points = sweep.grid(["train.lora_r=4,8,16,32", "train.learning_rate=1e-4,2e-4"])
    assert len(points) == 8 and points[0] == {"train.lora_r": "4", "train.learning_rate": "1e-4"}
    for point in points:
        overrides.check(point, REPO / "params.yaml")  # 1e-4 as -S writes it is a float
    monkeypatch.chdir(origin.project)
    for name in ("HF_TOKEN", "GIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("CHECKPOINT_BUCKET", "my-checkpoints")
    axes = ["train.lora_r=4,8", "identity.creator=The Lab"]
    with pytest.raises(SystemExit, match="GIT_TOKEN not set here"):  # SkyPilot would fail every job on it
        sweep.launch("rank", axes, dry_run=True, sky=Path("sky"), remote="origin", extra=[])
    monkeypatch.setenv("GIT_TOKEN", "token")
    assert sweep.launch("rank", axes, dry_run=True, sky=Path("sky"), remote="origin",
                        extra=["--env", "AWS_ENDPOINT_URL=https://s3.example"]) == 0
    printed = capsys.readouterr().out
    assert f"2 managed job(s) at {origin.commit[:12]}" in printed
    assert prepared[-1] == [[("train.lora_r", "4"), ("identity.creator", "The Lab")],
                            [("train.lora_r", "8"), ("identity.creator", "The Lab")]]
    secrets = "--secret HF_TOKEN= --secret GIT_TOKEN --secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY"
    passed = f"{secrets} --env CHECKPOINT_BUCKET=my-checkpoints --env AWS_ENDPOINT_URL=https://s3.example"
    assert printed.count(passed) == 2, printed
    source = jobs.pushed_commit("origin", origin.project)
    command = jobs.launch_command("rank-01", [("train.lora_r", "8"), ("identity.creator", "The Lab")],
                                  "rank-01", source, sky=Path("sky"), extra=["--secret", "HF_TOKEN"])
    assert command[:3] == ["sky", "jobs", "launch"] and "--detach-run" in command and "sky/train.yaml" in command
    assert f"GIT_REF={origin.commit}" in command and f"GIT_REMOTE={origin.url}" in command
    assert "EXP_NAME=rank-01" in command and command[-2:] == ["--secret", "HF_TOKEN"]
    # The value with a space survives the trip through OVERRIDES to the node's -S arguments.
    rendered = next(c for c in command if c.startswith("OVERRIDES=")).removeprefix("OVERRIDES=")
    assert overrides.parse(rendered) == [("train.lora_r", "8"), ("identity.creator", "The Lab")]
    with pytest.raises(SystemExit, match="train.lora_rank: unknown key; did you mean 'train.lora_r'"):
        sweep.launch("rank", ["train.lora_rank=4,8"], dry_run=True, sky=Path("sky"), remote="origin", extra=[])
    with pytest.raises(SkytuneError, match="expected key=value1,value2"):
        sweep.grid(["train.lora_r"])


@pytest.mark.slow
@needs_launcher
def test_cloud_commands_refuse_without_your_buckets(tmp_path: Path, s3: dict[str, str], origin: Origin) -> None:
    """No bucket is named by the project: launch, sweep, preflight and publish-model each refuse, with the exact
    command that sets the user's own, before anything is launched or written."""
    env = client_env(s3, GIT_TOKEN=origin.token)
    env.pop("CHECKPOINT_BUCKET", None)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "storage", "endpointurl",
                    s3["AWS_ENDPOINT_URL"]], cwd=origin.project, check=True, env=env)

    def run(*args: str, cwd: Path, **changes: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**env, **changes}, capture_output=True,
                              text=True, timeout=300, check=False)

    launch = ("skytune.face.cloud.jobs", "launch", "--dry-run")
    sweep = ("skytune.face.cloud.sweep", "launch", "r", "train.lora_r=4,8", "--dry-run")
    set_bucket = "export CHECKPOINT_BUCKET=<a bucket you own"
    for command in (launch, sweep):
        done = run(*command, cwd=origin.project)
        assert done.returncode == 1 and "CHECKPOINT_BUCKET is not set" in done.stderr + done.stdout, done.stderr
        assert set_bucket in done.stderr and "Traceback" not in done.stderr
        bad = run(*command, cwd=origin.project, CHECKPOINT_BUCKET="s3://mine")
        assert bad.returncode == 1 and "is not a bucket name" in bad.stderr
        ok = run(*command, cwd=origin.project, CHECKPOINT_BUCKET="my-checkpoints")
        assert ok.returncode == 0 and "CHECKPOINT_BUCKET=my-checkpoints" in ok.stdout, ok.stderr
    # A clone without a committed DVC remote (the project's own state): refused, with the command that sets one.
    bare = clone_project(tmp_path / "no-remote")
    for command in (launch, sweep):
        done = run(*command, cwd=bare, CHECKPOINT_BUCKET="my-checkpoints")
        assert done.returncode == 1 and "no default DVC remote" in done.stderr, done.stderr
        assert "dvc remote add -d storage s3://<a bucket you own>/skytune && git commit" in done.stderr
    checks = run("skytune.face.cloud.preflight", "--no-sky-check", "--sky", "/nonexistent", cwd=bare)
    assert "FAIL  bucket" in checks.stdout and "dvc remote add -d storage" in checks.stdout
    assert "FAIL  checkpoints" in checks.stdout and set_bucket in checks.stdout
    publish = run("skytune.face.cloud.buckets", "publish", cwd=bare)
    assert publish.returncode == 1 and "make publish-model MODEL_URL=s3://<a bucket you own>/" in publish.stderr
    assert "Traceback" not in publish.stderr


def client_env(s3: dict[str, str], **more: str) -> dict[str, str]:
    """A laptop's environment for the S3 server: its credentials, the checksum settings S3-compatible stores need,
    and this environment's dvc on PATH."""
    return {**os.environ, **{k: v for k, v in s3.items() if k.startswith("AWS_")},
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            **more}


@needs_launcher
@pytest.mark.slow
def test_a_sweeps_node_restores_the_data_stages_pushed_at_launch(tmp_path: Path, s3: dict[str, str],
                                                                  origin: Origin) -> None:
    """make sweep computes the data stages once on the laptop and pushes them with their run-cache; a node of the
    sweep then restores them from the remote and runs train onward only."""
    project = origin.project
    laptop = client_env(s3, GIT_TOKEN=origin.token, CHECKPOINT_BUCKET="my-checkpoints")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "storage", "endpointurl",
                    s3["AWS_ENDPOINT_URL"]], cwd=project, check=True, env=laptop)
    sky = tmp_path / "sky-cli"  # stands in for `sky jobs launch` only: records what would be launched
    sky.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'launched.txt'}\n")
    sky.chmod(0o755)

    def sweep(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "skytune.face.cloud.sweep", "launch", "r", "train.lora_r=4,8",
                               *args, "--sky", str(sky)], cwd=project, env=laptop, capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    status = sweep("--dry-run")  # two points, one data set: reported missing, nothing pushed
    assert status.count("data stages (params.yaml as committed)") == 1 and "missing on the remote" in status
    launched = sweep()
    assert "data stages (params.yaml as committed): " in launched and "pushed with their run-cache entries" in launched
    assert len((tmp_path / "launched.txt").read_text().splitlines()) == 2
    again = sweep("--dry-run")
    assert "restored from this machine's run-cache; all on the remote" in again, again

    env = {**node_env(tmp_path, s3, origin), "EXP_NAME": "r-01", "OVERRIDES": "train.lora_r=8"}
    node = new_node(tmp_path, "vm-r-01", origin)
    start = time.monotonic()
    done = subprocess.run(["bash", "sky/node.sh", "run"], cwd=node, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    ran = stages_ran(output)
    assert ran[0] == "train" and not set(ran) & set(DATA_STAGES), ran
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' is cached - skipping run" in output, output[-4000:]
    assert "computing" not in output and "pushed experiment r-01" in output
    print(f"node r-01: {seconds:.0f} s, data stages restored from the remote")


@pytest.mark.slow
def test_a_data_stage_on_a_cloud_node_says_it_computes(tmp_path: Path) -> None:
    project = clone_project(tmp_path / "p")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for on_node in (False, True):
        extra = {"SKYPILOT_TASK_ID": "sky-managed-1"} if on_node else {}
        done = subprocess.run([sys.executable, "-m", "skytune.stages.ingest"], cwd=project, env={**env, **extra},
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        said = "computing ingest on this cloud node" in done.stderr
        assert said == on_node, done.stderr[-2000:]
        assert "as dvc.yaml declares them for ingest):\n  base.seed = " in done.stderr  # run as python -m


def test_data_overrides_are_prepared_once_per_distinct_set() -> None:
    from skytune.face.cloud import remote_data

    keys = remote_data.data_keys(REPO / "dvc.yaml")
    assert {"data.sources", "merge_data.mixture", "train.max_length", "base.seed"} <= keys and "train" not in keys
    points = [[("train.lora_r", r), ("train.max_length", m)] for r in ("4", "8") for m in ("512", "1024")]
    assert remote_data.distinct(points, keys) == [[("train.max_length", "512")], [("train.max_length", "1024")]]
    assert remote_data.distinct([[("train.lora_r", "4")], [("train.lora_r", "8")]], keys) == [[]]
    assert remote_data.data_pairs([("merge_data.mixture.alpaca.rows", "0")], keys) == [
        ("merge_data.mixture.alpaca.rows", "0")]
    assert remote_data.data_pairs([("paths.raw_dir", "elsewhere")], keys) == [("paths.raw_dir", "elsewhere")]


def test_overrides_parse_quote_and_name_the_bad_word() -> None:
    from skytune.face.cloud import overrides

    pairs = overrides.parse("train.lora_r=16 'identity.creator=Be brief, and kind.' train.learning_rate=1e-4")
    assert pairs == [("train.lora_r", "16"), ("identity.creator", "Be brief, and kind."),
                     ("train.learning_rate", "1e-4")]
    assert overrides.parse(overrides.render(pairs)) == pairs
    with pytest.raises(overrides.OverridesError, match="'lora_r=16' is not section.key=value"):
        overrides.parse("lora_r=16")
    with pytest.raises(overrides.OverridesError, match="No closing quotation"):
        overrides.parse("'identity.creator=Be brief")
    # Checked as dvc exp run -S reads them (Hydra): a comma is a sweep, an apostrophe does not parse.
    overrides.check([("identity.creator", "The Lab"), ("train.learning_rate", "1e-4")], REPO / "params.yaml")
    overrides.check([("identity.creator", '"The Lab, Inc."')], REPO / "params.yaml")
    with pytest.raises(overrides.OverridesError, match="would be a Hydra sweep"):
        overrides.check([("identity.creator", "Be brief, and kind.")], REPO / "params.yaml")
    with pytest.raises(overrides.OverridesError, match="cannot parse it"):
        overrides.check([("identity.creator", "it's us")], REPO / "params.yaml")
    env = {**os.environ, "OVERRIDES": "train.lora_r=16 'identity.creator=a b'"}
    out = subprocess.run([sys.executable, "-m", "skytune.face.cloud.overrides"], env=env, capture_output=True,
                         check=True).stdout
    assert out == b"train.lora_r=16\0identity.creator=a b\0"


def test_git_remote_urls_become_https_for_the_node() -> None:
    from skytune.face.cloud.jobs import https_url

    assert https_url("git@github.com:org/repo.git") == "https://github.com/org/repo.git"
    assert https_url("ssh://git@gitlab.com:2222/org/repo.git") == "https://gitlab.com/org/repo.git"
    assert https_url("https://github.com/org/repo.git") == "https://github.com/org/repo.git"
    assert https_url("https://me:ghp_secret@github.com/org/repo.git") == "https://github.com/org/repo.git"
    assert https_url("http://tok@127.0.0.1:8080/r.git") == "http://127.0.0.1:8080/r.git"


@needs_launcher
@pytest.mark.slow
def test_multinode_job_runs_on_two_simulated_nodes(tmp_path: Path, s3: dict[str, str], origin: Origin) -> None:
    """sky/train-multinode.yaml's setup and run on two "nodes" on localhost (two clones, SKYPILOT_NODE_RANK 0 and 1,
    one CPU process each): the train stage runs as one 2-process gloo job across them; the head node pushes."""
    config = yaml.safe_load((origin.project / "sky" / "train-multinode.yaml").read_text())
    port = free_port()
    base = {**node_env(tmp_path, s3, origin), "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1", "SKYTUNE_MASTER_PORT": str(port),
            "OVERRIDES": "train.epochs=1 train.batch_size=4",
            "SKYPILOT_TASK_ID": "sky-managed-2026-11-24_skytune-train-multinode_3"}
    nodes = {rank: new_node(tmp_path, f"node{rank}", origin) for rank in (0, 1)}
    for node in nodes.values():
        done = subprocess.run(["bash", "-c", config["setup"]], cwd=node, env=base, capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = {rank: subprocess.Popen(["bash", "-c", config["run"]], cwd=node,
                                   env={**base, "SKYPILOT_NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            for rank, node in nodes.items()}
    outputs = {rank: run.communicate(timeout=900)[0] for rank, run in runs.items()}
    failed = {rank: outputs[rank][-4000:] for rank, run in runs.items() if run.returncode != 0}
    assert not failed, "\n".join(f"--- node {rank}:\n{tail}" for rank, tail in failed.items())
    train = json.loads((nodes[0] / PATHS.train_metrics).read_text())
    assert train["world_size"] == 2  # one job across both nodes, not two jobs
    assert "pushed experiment sky-managed-2026-11-24_skytune-train-multinode_3" in outputs[0]
    assert "pushed experiment" not in outputs[1]  # workers never push
    # A recovery after the push: a worker on a fresh VM exits at once instead of waiting for a head that never comes.
    late = new_node(tmp_path, "node1-recovered", origin)
    done = subprocess.run(["bash", "-c", config["run"]], cwd=late, env={**base, "SKYPILOT_NODE_RANK": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "already on origin" in done.stdout, done.stdout + done.stderr


@needs_launcher
@pytest.mark.slow
def test_a_preemption_notice_reaches_skypilot_as_exit_75(tmp_path: Path, s3: dict[str, str], origin: Origin) -> None:
    """SIGTERM to the job (what a spot preemption notice becomes) while training: the train stage saves a
    checkpoint, and `bash sky/node.sh run` exits 75, the code train.yaml's recover_on_exit_codes names, not 143."""
    config = yaml.safe_load((origin.project / "sky" / "train.yaml").read_text())
    env = node_env(tmp_path, s3, origin)
    node = new_node(tmp_path, "vm", origin)
    run = subprocess.Popen(["bash", "-c", config["run"]], cwd=node, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = Path(env["SKYTUNE_CHECKPOINT_DIR"])
    deadline = time.monotonic() + 600
    while not any(checkpoints.rglob("COMPLETE.json")):
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    # The notice saved a checkpoint at the step it stopped on (save_steps=20 would not have: it is no multiple).
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of \d+; checkpoint saved", output)
    assert stopped and int(stopped.group(1)) % 20, output[-3000:]
    assert (next(checkpoints.rglob(f"checkpoint-{stopped.group(1)}")) / "COMPLETE.json").is_file()
    assert "pushed experiment" not in output  # an unfinished experiment is never pushed


def test_every_command_of_the_readme_cloud_path_exists() -> None:
    """The README's cloud path names only make targets, modules and files that exist."""
    readme = (REPO / "README.md").read_text()
    cloud = readme[readme.index("## Cloud"):readme.index("\n## ", readme.index("## Cloud") + 1)]
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"\bmake ([a-z][a-z-]*)", cloud))
    assert {"launcher", "preflight", "launch", "sweep", "sweep-pull", "serve", "report"} <= targets
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"make {target}: no such target"
    for path in set(re.findall(r"\b(sky/[\w.-]+\.(?:yaml|sh|py))", cloud)):
        assert (REPO / path).is_file(), path
    modules = set(re.findall(r"python -m (skytune(?:\.\w+)+)", cloud + makefile))
    assert {"skytune.face.cloud.jobs", "skytune.face.cloud.sweep", "skytune.face.cli"} <= modules
    for module in modules:
        assert (REPO / "src" / (module.replace(".", "/") + ".py")).is_file(), module
