"""The sky/ YAMLs: SkyPilot's own validation in the launcher's environment, the project's promises about them, and a
local-node simulation of the training job's setup and run (real git, DVC and a bare origin; no cloud)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from conftest import REPO
from test_pipeline_e2e import PATHS, clone_project, sh

from skytune.checkpoints import PREEMPTED_EXIT_CODE

DVC_REMOTE_URL = "s3://skytune-dvc/skytune"  # .dvc/config's remote "storage"

SKY_ENV = REPO / ".venv-sky"  # `make launcher` (a prerequisite of `make test`)
YAMLS = sorted((REPO / "sky").glob("*.yaml"))
TRAINING = [REPO / "sky" / "train.yaml", REPO / "sky" / "train-multinode.yaml"]
needs_launcher = pytest.mark.skipif(not (SKY_ENV / ".installed").is_file(), reason="run `make launcher`")


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
    broken = {
        "serve.yaml": ("readiness_probe:", "readines_probe:", "did you mean 'readiness_probe'"),
        "train.yaml": ("mode: MOUNT_CACHED", "mode: MOUNT_CACHE", "'MOUNT_CACHE' is not one of"),
        "train-multinode.yaml": ("recover_on_exit_codes", "recover_on_exit_code", "unknown key(s)"),
    }
    for name, (old, new, expected) in broken.items():
        bad = tmp_path / name
        bad.write_text((REPO / "sky" / name).read_text().replace(old, new))
        done = validate(bad)
        assert done.returncode == 1 and expected in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_yamls_keep_the_projects_promises(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    resources = config["resources"]
    assert resources["any_of"] == [{"use_spot": True}, {"use_spot": False}]  # spot, on-demand fallback
    assert len(resources["accelerators"]) >= 2  # a set: the cheapest available
    recovery = resources["job_recovery"]
    assert PREEMPTED_EXIT_CODE in recovery["recover_on_exit_codes"] and recovery["max_restarts_on_errors"] >= 1
    assert config["file_mounts"]["/checkpoints"]["mode"] == "MOUNT_CACHED"
    assert set(config["secrets"]) >= {"HF_TOKEN", "GIT_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v is None for v in config["secrets"].values())  # given at launch, never written here
    text = path.read_text().lower()
    assert ".ssh" not in text and "id_rsa" not in text  # never SSH keys on a spot VM
    assert config["setup"] == "bash sky/node.sh setup" and config["run"] == "bash sky/node.sh run"
    # No hyperparameter in a sky YAML: they live in params.yaml and arrive only through OVERRIDES.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert not set(config["envs"]) & {k for section in params.values() if isinstance(section, dict) for k in section}
    assert config["envs"]["OVERRIDES"] == ""
    if path.name == "train-multinode.yaml":
        assert config["num_nodes"] >= 2


def test_the_dvc_remote_is_the_bucket_the_tests_serve() -> None:
    config = (REPO / ".dvc" / "config").read_text()
    assert "remote = storage" in config and f"url = {DVC_REMOTE_URL}" in config


def test_skyignore_keeps_environments_and_outputs_off_the_upload() -> None:
    ignored = (REPO / ".skyignore").read_text().splitlines()
    assert {".venv/", ".venv-*/", "models/checkpoints/", ".dvc/cache/"} <= set(ignored)
    assert ".git/" not in ignored  # dvc exp run needs the commit on the node


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real S3-compatible server on loopback: `rclone serve s3` (the rclone SkyPilot's MOUNT_CACHED uses), serving
    a directory in which each sub-directory is a bucket. Yields the environment a client needs."""
    root = tmp_path / "s3"
    bucket = urlparse(DVC_REMOTE_URL).netloc
    (root / bucket).mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "rclone"), "serve", "s3", "--auth-key",
                               "AKSKYTUNE,sky-secret", "--addr", f"127.0.0.1:{port}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    try:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKSKYTUNE",
               "AWS_SECRET_ACCESS_KEY": "sky-secret", "S3_ROOT": str(root)}
    finally:
        server.terminate()
        server.wait(timeout=10)


def node_env(tmp_path: Path, s3: dict[str, str]) -> dict[str, str]:
    """What SkyPilot gives sky/train.yaml's commands on a one-node, CPU-only job (secrets included)."""
    return {**os.environ, **s3, "VENV": str(Path(sys.executable).parents[1]),
            "SKYPILOT_TASK_ID": "sky-managed-2026-11-24_skytune-train_7", "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_GPUS_PER_NODE": "0",
            "OVERRIDES": "train.lora_r=4 train.epochs=3 train.save_steps=20",
            "SKYTUNE_CHECKPOINT_DIR": str(tmp_path / "bucket-mount"), "GIT_AUTHOR_NAME": "node",
            "GIT_AUTHOR_EMAIL": "node@localhost", "GIT_COMMITTER_NAME": "node", "GIT_COMMITTER_EMAIL": "node@localhost"}


def published_project(tmp_path: Path) -> tuple[Path, Path]:
    """The project committed in a fresh repository and pushed to a bare origin: (origin, the repository)."""
    origin = tmp_path / "origin.git"
    sh("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path)
    project = clone_project(tmp_path / "project")
    sh("git", "push", "-q", str(origin), "main", cwd=project)
    return origin, project


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, wherever their sessions are (skytune.cli preemptible starts DVC in
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


def new_node(tmp_path: Path, name: str, origin: Path) -> Path:
    """A fresh VM: the workdir as SkyPilot uploads it (the repository at the pushed commit), nothing else."""
    node = tmp_path / name
    sh("git", "clone", "-q", str(origin), str(node), cwd=tmp_path)
    return node


@pytest.mark.slow
def test_training_job_survives_preemption_and_its_experiment_is_pulled_elsewhere(
        tmp_path: Path, s3: dict[str, str]) -> None:
    """sky/train.yaml's setup and run, as SkyPilot runs them on a node, against a real S3 server and a bare git
    origin: the first VM is killed mid-training, a fresh one resumes from the bucket checkpoint and pushes the
    experiment, and a second clone pulls it and shows it."""
    origin, project = published_project(tmp_path)
    config = yaml.safe_load((project / "sky" / "train.yaml").read_text())
    env = node_env(tmp_path, s3)
    name = "sky-managed-2026-11-24_skytune-train_7"

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
    kill_tree(run.pid)  # the VM disappears without notice: the worst case
    run.wait()

    # VM 2 (a managed-job recovery: same task id, same bucket): resumes, finishes, pushes.
    second = new_node(tmp_path, "vm2", origin)
    for step in ("setup", "run"):
        done = subprocess.run(["bash", "-c", config[step]], cwd=second, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, f"{step}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"pushed experiment {name}" in done.stdout
    train = json.loads((second / PATHS.train_metrics).read_text())
    assert train["resumed_from_step"] >= 20 and train["steps"] > train["resumed_from_step"]
    assert list((Path(s3["S3_ROOT"]) / urlparse(DVC_REMOTE_URL).netloc).rglob("*"))  # the DVC cache is in S3

    # A recovery after the experiment finished pushes again instead of training again.
    again = subprocess.run(["bash", "-c", config["run"]], cwd=second, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0 and "already ran" in again.stdout, again.stdout + again.stderr

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
    assert (laptop / PATHS.adapter_dir / "adapter_model.safetensors").is_file()  # its bytes came from S3

    # The sweep's comparison command on what was pushed (a sweep's experiments share a name prefix).
    table = subprocess.run([sys.executable, "-m", "skytune.sweep", "pull", "sky-managed"], check=True, env=client,
                           capture_output=True, text=True, **sh_env).stdout
    assert f"| {name} | 4 |" in table and "gpu_hours" in table


def test_preflight_checks_bucket_git_and_launcher(tmp_path: Path, s3: dict[str, str]) -> None:
    origin, project = published_project(tmp_path)
    env = {**os.environ, **{k: v for k, v in s3.items() if k.startswith("AWS_")}}

    def preflight(*args: str, **changes: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "skytune.preflight", "--remote", str(origin),
                               "--sky", str(SKY_ENV / "bin" / "sky"), "--no-sky-check", *args], cwd=project,
                              env={**env, **changes}, capture_output=True, text=True, timeout=300, check=False)

    done = preflight()
    assert done.returncode == 0 and "preflight: 5/5 passed" in done.stdout, done.stdout + done.stderr
    assert "DVC remote storage: s3://skytune-dvc/skytune listed" in done.stdout
    wrong = preflight(AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert wrong.returncode == 1 and "FAIL  bucket" in wrong.stdout and "signature" in wrong.stdout
    missing = preflight("--remote", str(tmp_path / "nowhere.git"), "--sky", str(tmp_path / "sky"))
    assert "FAIL  git" in missing.stdout and "FAIL  launcher" in missing.stdout and "make launcher" in missing.stdout
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("lora_r:", "lora_rank:"))
    typo = preflight()
    assert typo.returncode == 1 and "did you mean 'train.lora_r'" in typo.stdout


def test_sweep_fans_a_grid_out_to_one_job_each() -> None:
    from skytune import sweep

    points = sweep.grid(["train.lora_r=4,8,16,32", "train.learning_rate=1e-4,2e-4"])
    assert len(points) == 8 and points[0] == {"train.lora_r": "4", "train.learning_rate": "1e-4"}
    commands = sweep.launch_commands("rank", points, sky=Path("sky"), extra=["--secret", "HF_TOKEN"])
    assert len({c[c.index("--name") + 1] for c in commands}) == 8  # one managed job, one experiment each
    first = commands[0]
    assert first[:3] == ["sky", "jobs", "launch"] and "sky/train.yaml" in first and "--detach-run" in first
    assert "OVERRIDES=train.lora_r=4 train.learning_rate=1e-4" in first and "EXP_NAME=rank-00" in first
    assert first[-2:] == ["--secret", "HF_TOKEN"]
    for point in points:
        sweep.check_point(point, REPO / "params.yaml")  # 1e-4 as -S writes it is a float
    with pytest.raises(SystemExit, match="train.lora_rank: unknown key; did you mean 'train.lora_r'"):
        sweep.launch("rank", ["train.lora_rank=4,8"], dry_run=True, sky=Path("sky"), extra=[])
    with pytest.raises(ValueError, match="expected key=value1,value2"):
        sweep.grid(["train.lora_r"])


@pytest.mark.slow
def test_multinode_job_runs_on_two_simulated_nodes(tmp_path: Path, s3: dict[str, str]) -> None:
    """sky/train-multinode.yaml's setup and run on two "nodes" on localhost (two clones, SKYPILOT_NODE_RANK 0 and 1,
    one CPU process each): the train stage runs as one 2-process gloo job across them; the head node pushes."""
    origin, project = published_project(tmp_path)
    config = yaml.safe_load((project / "sky" / "train-multinode.yaml").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {**node_env(tmp_path, s3), "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
            "SKYTUNE_MASTER_PORT": str(port), "OVERRIDES": "train.epochs=1 train.batch_size=4", "GIT_REMOTE": str(origin),
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
    errors = {r: [line for line in o.splitlines() if "rror" in line][:12] for r, o in outputs.items()}
    assert all(run.returncode == 0 for run in runs.values()), errors
    train = json.loads((nodes[0] / PATHS.train_metrics).read_text())
    assert train["world_size"] == 2  # one job across both nodes, not two jobs
    assert "pushed experiment sky-managed-2026-11-24_skytune-train-multinode_3" in outputs[0]
    assert "pushed experiment" not in outputs[1]  # workers never push


@pytest.mark.slow
def test_a_preemption_notice_reaches_skypilot_as_exit_75(tmp_path: Path, s3: dict[str, str]) -> None:
    """SIGTERM to the job (what a spot preemption notice becomes) while training: the train stage saves a
    checkpoint, and `bash sky/node.sh run` exits 75, the code train.yaml's recover_on_exit_codes names, not 143."""
    origin, project = published_project(tmp_path)
    config = yaml.safe_load((project / "sky" / "train.yaml").read_text())
    env = node_env(tmp_path, s3)
    node = new_node(tmp_path, "vm", origin)
    run = subprocess.Popen(["bash", "-c", config["run"]], cwd=node, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = Path(env["SKYTUNE_CHECKPOINT_DIR"])
    deadline = time.monotonic() + 600
    while not any(checkpoints.rglob("COMPLETE.json")):
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    before = len(list(checkpoints.rglob("COMPLETE.json")))
    os.killpg(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert len(list(checkpoints.rglob("COMPLETE.json"))) >= before  # the notice saved (or kept) a checkpoint
    assert "pushed experiment" not in output  # an unfinished experiment is never pushed
