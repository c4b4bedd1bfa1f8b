"""The launcher: the world read from SkyPilot's or torchrun's variables, the commands it builds, the accelerate
configs, and a real 2-process CPU (gloo) DDP run of the train stage through it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, PipelineRun, write_params
from test_resume import workspace

from skytune import launch, sft


def test_world_from_skypilot_variables() -> None:
    env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n",
           "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    world = launch.world_from_env(env, gpus=8)
    assert world == launch.World(nnodes=2, node_rank=1, nproc_per_node=8, master_addr="10.0.0.5",
                                 master_port=29500)
    assert world.size == 16
    gpu = launch.command("skytune.stages.train", world, gpu=True, config=Path("configs/accelerate/ddp.yaml"))
    assert gpu[1:3] == ["-m", "accelerate.commands.launch"]
    flags = dict(zip(gpu[3::2], gpu[4::2], strict=False))
    assert flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--num_processes"] == "16" and flags["--main_process_ip"] == "10.0.0.5"
    assert flags["--module"] == "skytune.stages.train"


def test_world_defaults_and_overrides() -> None:
    assert launch.world_from_env({}, gpus=0).size == 1
    assert launch.world_from_env({}, gpus=4).nproc_per_node == 4  # one process per visible GPU
    assert launch.world_from_env({"SKYPILOT_NUM_GPUS_PER_NODE": "0"}, gpus=0).nproc_per_node == 1  # a CPU node
    cpu = launch.world_from_env({"SKYTUNE_NPROC_PER_NODE": "2", "SKYTUNE_MASTER_PORT": "1234"}, gpus=0)
    command = launch.command("m", cpu, gpu=False, config=Path("unused"))
    assert command[1:3] == ["-m", "torch.distributed.run"]  # accelerate launch --cpu would start one process
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[command.index("--master_port") + 1] == "1234"


def test_gradient_accumulation_keeps_the_total_batch() -> None:
    assert [sft.grad_accum(32, 4, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="total_batch_size .32. is not a multiple of batch_size .4. x 3"):
        sft.grad_accum(32, 4, 3)


@pytest.mark.parametrize("name", ["ddp", "fsdp_qlora"])
def test_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs/accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp" else "FSDP")
    assert name in {p.stem for p in (REPO / launch.CONFIG_DIR).glob("*.yaml")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_through_the_launcher(pipeline: PipelineRun, tmp_path: Path) -> None:
    root = workspace(pipeline, tmp_path / "ddp")
    write_params(root, lambda p: p["train"].update(epochs=1, batch_size=4, total_batch_size=8, save_steps=20))
    env = {**os.environ, "SKYTUNE_NPROC_PER_NODE": "2", "SKYTUNE_MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "skytune.launch", "skytune.stages.train"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["world_size"] == 2  # the trainer really saw two processes
    assert metrics["gradient_accumulation_steps"] == 1 and metrics["distributed"] == "ddp"
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["steps"] == -(-len((root / "data/train.jsonl").read_text().splitlines()) // 8)
    # The same artifact layout as a single-process run.
    single = pipeline.root / "models/adapter"
    assert sorted(p.name for p in (root / "models/adapter").iterdir()) == sorted(p.name for p in single.iterdir())
    assert (root / "dvclive/metrics.json").is_file() and (root / "metrics/train_samples.md").is_file()
