"""The launcher: the world read from SkyPilot's or torchrun's variables, the commands it builds, the accelerate
configs, and a real 2-process CPU (gloo) DDP run of the train stage through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from conftest import REPO, PipelineRun, free_port, write_params
from safetensors.torch import load_file
from test_resume import workspace

from skytune.core import processes
from skytune.core.errors import SkytuneError
from skytune.core.params import TrainParams, load_params
from skytune.core.training.sft import grad_accum


def test_world_from_skypilot_variables() -> None:
    env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n",
           "SKYPILOT_NUM_GPUS_PER_NODE": "8"}
    world = processes.world_from_env(env, gpus=8)
    assert world == processes.World(nnodes=2, node_rank=1, nproc_per_node=8, master_addr="10.0.0.5",
                                 master_port=29500)
    assert world.size == 16
    gpu = processes.command("skytune.stages.train", world, gpu=True, config=Path("configs/accelerate/ddp.yaml"))
    assert gpu[1:3] == ["-m", "accelerate.commands.launch"]
    flags = dict(zip(gpu[3::2], gpu[4::2], strict=False))
    assert flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--num_processes"] == "16" and flags["--main_process_ip"] == "10.0.0.5"
    assert flags["--module"] == "skytune.stages.train"


def test_world_defaults_and_overrides() -> None:
    assert processes.world_from_env({}, gpus=0).size == 1
    assert processes.world_from_env({}, gpus=4).nproc_per_node == 4  # one process per visible GPU
    assert processes.world_from_env({"SKYPILOT_NUM_GPUS_PER_NODE": "0"}, gpus=0).nproc_per_node == 1  # a CPU node
    cpu = processes.world_from_env({"SKYTUNE_NPROC_PER_NODE": "2", "SKYTUNE_MASTER_PORT": "1234"}, gpus=0)
    command = processes.command("m", cpu, gpu=False, config=Path("unused"))
    assert command[1:3] == ["-m", "torch.distributed.run"]  # accelerate launch --cpu would start one process
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[command.index("--master_port") + 1] == "1234"


def test_gradient_accumulation_keeps_the_total_batch() -> None:
    assert [grad_accum(32, 4, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(SkytuneError, match="total_batch_size .32. is not a multiple of batch_size .4. x 3"):
        grad_accum(32, 4, 3)


@pytest.mark.parametrize("name", typing.get_args(typing.get_type_hints(TrainParams)["distributed"]))
def test_every_distributed_mode_has_an_accelerate_config_that_loads(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    directory = REPO / load_params(REPO / "params.yaml").paths.accelerate_dir
    config = load_config_from_file(str(directory / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp_qlora": "FSDP"}[name]


def test_two_process_ddp_run_through_the_launcher_trains_what_one_process_trains(pipeline: PipelineRun,
                                                                                 tmp_path: Path) -> None:
    """2 gloo processes x batch 4 and 1 process x batch 4 x 2 accumulation steps see the same 8 sequences per
    optimizer step (accelerate hands out whole batches round-robin from one seeded order) and normalise the loss by
    the same token count, so they must end at the same val loss and adapter. LoRA dropout is off: each process
    draws its own masks, which would make the runs differ by more than arithmetic. (The val loss before training,
    an evaluate() before train(), once left the model out of DDP: the processes trained apart, 0.8% off here.)"""
    def train(name: str, processes: int) -> tuple[dict, dict]:
        root = workspace(pipeline, tmp_path / name)
        write_params(root, lambda p: p["train"].update(epochs=1, batch_size=4, total_batch_size=8, save_steps=20,
                                                        lora_dropout=0.0))
        env = {**os.environ, "SKYTUNE_NPROC_PER_NODE": str(processes), "SKYTUNE_MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "skytune.core.processes", "skytune.stages.train"], cwd=root,
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        return (json.loads((root / "metrics/train.json").read_text()),
                load_file(str(root / "models/adapter/adapter_model.safetensors")))

    ddp, ddp_weights = train("ddp", 2)
    single, single_weights = train("single", 1)
    assert ddp["world_size"] == 2 and single["world_size"] == 1  # the trainer really saw two processes
    assert ddp["gradient_accumulation_steps"] == 1 and single["gradient_accumulation_steps"] == 2
    assert ddp["steps"] == single["steps"] == -(-len((tmp_path / "ddp/data/train.jsonl").read_text().splitlines()) // 8)
    assert ddp["val_loss_after"] < ddp["val_loss_before"]
    # Float sums in another order (gloo's all-reduce vs accumulation): measured 7e-7 relative after 46 steps. 1e-4 is
    # far above that and far below what processes training apart moved it (8e-3 here).
    assert ddp["val_loss_after"] == pytest.approx(single["val_loss_after"], rel=1e-4)
    assert ddp_weights.keys() == single_weights.keys()
    for name, tensor in ddp_weights.items():
        assert torch.allclose(tensor, single_weights[name], rtol=1e-2, atol=1e-4), name
    assert (tmp_path / "ddp/dvclive/metrics.json").is_file() and (tmp_path / "ddp/metrics/train_samples.md").is_file()
