"""Start a stage on every process of the cluster: `python -m skytune.core.processes skytune.stages.train`.

The world comes from the environment, so the same command runs on a laptop, a GPU box and a SkyPilot cluster:
- already under torchrun or accelerate (`WORLD_SIZE` set): the stage runs in this process;
- SkyPilot: `SKYPILOT_NUM_NODES`, `SKYPILOT_NODE_RANK`, `SKYPILOT_NODE_IPS` (first line = head node),
  `SKYPILOT_NUM_GPUS_PER_NODE`;
- `SKYTUNE_NPROC_PER_NODE` overrides the processes per node (on CPU: gloo processes, for tests and debugging),
  `SKYTUNE_MASTER_PORT` the rendezvous port (29500);
- otherwise one process per visible GPU, or one on CPU.

One process in all: the stage replaces this process. More: on GPUs `accelerate launch` with
`<paths.accelerate_dir>/<train.distributed>.yaml` (DDP, or FSDP with QLoRA); on CPU `torchrun` (`accelerate launch --cpu
--num_processes 2` silently starts one process). A stage stopped by SIGTERM exits with PREEMPTED_EXIT_CODE; the
launcher passes that code on, which torchrun alone would turn into 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from skytune.core.errors import SkytuneError, reported
from skytune.core.params import load_params
from skytune.core.training.checkpoints import (
    ENV_DIR,
    PREEMPTED_EXIT_CODE,
    PREEMPTED_FILE_ENV,
)


@dataclass(frozen=True)
class World:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    @property
    def size(self) -> int:
        return self.nnodes * self.nproc_per_node


def world_from_env(env: dict[str, str] | os._Environ[str], gpus: int) -> World:
    """The cluster as the environment describes it; `gpus` is the number of GPUs visible here."""
    ips = [line.strip() for line in env.get("SKYPILOT_NODE_IPS", "").splitlines() if line.strip()]
    nproc = env.get("SKYTUNE_NPROC_PER_NODE") or env.get("SKYPILOT_NUM_GPUS_PER_NODE") or str(max(gpus, 1))
    return World(
        nnodes=int(env.get("SKYPILOT_NUM_NODES", "1")),
        node_rank=int(env.get("SKYPILOT_NODE_RANK", "0")),
        nproc_per_node=max(int(nproc), 1),  # a CPU node reports SKYPILOT_NUM_GPUS_PER_NODE=0: one process
        master_addr=ips[0] if ips else "127.0.0.1",
        master_port=int(env.get("SKYTUNE_MASTER_PORT", "29500")),
    )


def command(module: str, world: World, *, gpu: bool, config: Path, precision: str = "bf16") -> list[str]:
    """The command that starts `module` on this node's processes (`precision`: accelerate's mixed precision, which
    follows train.compute_dtype)."""
    if gpu:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "--mixed_precision", precision,
                "--num_machines", str(world.nnodes), "--machine_rank", str(world.node_rank),
                "--num_processes", str(world.size), "--main_process_ip", world.master_addr,
                "--main_process_port", str(world.master_port), "--module", module]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(world.nnodes),
            "--node_rank", str(world.node_rank), "--nproc_per_node", str(world.nproc_per_node),
            "--master_addr", world.master_addr, "--master_port", str(world.master_port), "--module", module]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m skytune.core.processes <module>   (e.g. skytune.stages.train)", file=sys.stderr)
        return 2
    module = argv[0]
    if "WORLD_SIZE" in os.environ:  # torchrun or accelerate started us already
        os.execv(sys.executable, [sys.executable, "-m", module])
    import torch

    gpus = torch.cuda.device_count()
    world = world_from_env(os.environ, gpus)
    if world.size == 1:
        os.execv(sys.executable, [sys.executable, "-m", module])
    params = load_params()  # a ParamsError is reported as a message (reported() below)
    train = params.train
    config = Path(params.paths.accelerate_dir) / f"{train.distributed}.yaml"
    from skytune.core.models.devices import (
        compute_dtype,  # late: the single-process path above needs no torch
    )

    dtype = compute_dtype(train.compute_dtype)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    if world.nnodes > 1 and not os.environ.get(ENV_DIR):
        raise SkytuneError(f"{world.nnodes} nodes need a checkpoint directory every node sees (a bucket mount): set "
                           f"{ENV_DIR}; node-local checkpoints would let the nodes resume from different steps")
    with tempfile.TemporaryDirectory(prefix="skytune-launch-") as tmp:
        # Reuse the flag of a caller that waits on us (skytune.face.cli preemptible around dvc exp run).
        flag = Path(os.environ.get(PREEMPTED_FILE_ENV) or Path(tmp) / "preempted")
        # The workers get SIGTERM from the agent and need time to finish a step and write a checkpoint before the
        # agent's SIGKILL (30 s by default).
        env = {**os.environ, PREEMPTED_FILE_ENV: str(flag), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
        print(f"skytune.core.processes: {world.size} processes ({world.nnodes} node(s) x {world.nproc_per_node}), "
              f"this node {world.node_rank}, head {world.master_addr}:{world.master_port}", file=sys.stderr)
        pending: list[int] = []  # a SIGTERM that arrives before the child exists is passed on once it does
        signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
        child = subprocess.Popen(command(module, world, gpu=gpus > 0, config=config, precision=precision), env=env)
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
        if pending:
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        return PREEMPTED_EXIT_CODE if flag.exists() else (code if code >= 0 else 128 - code)


if __name__ == "__main__":
    with reported():
        raise SystemExit(main(sys.argv[1:]))
