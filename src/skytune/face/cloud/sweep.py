"""Sweeps: a grid of params.yaml overrides fanned out to parallel SkyPilot managed jobs, and pulled back to compare.

    python -m skytune.face.cloud.sweep launch NAME train.lora_r=4,8,16,32 [train.learning_rate=1e-4,2e-4]
        [--dry-run] [-- extra `sky jobs launch` arguments, e.g. --secret HF_TOKEN]
    python -m skytune.face.cloud.sweep pull NAME   # dvc exp pull origin <each experiment of the sweep>, then a table
    make sweep NAME=r GRID="train.lora_r=4,8,16,32"      make sweep-pull NAME=r

Each grid point is one `sky jobs launch sky/train.yaml` (skytune.face.cloud.jobs: at the pushed HEAD) with
OVERRIDES set to its values and EXP_NAME `<NAME>-<index>`, so each job trains on its own spot VM and pushes its own
DVC experiment.
Every grid point is checked against the params schema before the first job is launched: a typo costs nothing.
The data stages are computed here and pushed first, once per distinct set of data overrides
(skytune.face.cloud.remote_data): the GPU jobs restore them.
Values are split on commas; a value holding a comma is not expressible in a grid (launch it with make launch).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from skytune.core import job_ledger
from skytune.core.errors import SkytuneError, reported
from skytune.core.params import PARAMS_FILE, ParamsError
from skytune.face.cloud import buckets, jobs, overrides, prices, remote_data
from skytune.face.commands import SKY, dvc

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,40}")
COLUMNS = ("val_loss_after", "val_perplexity_tuned", "identity_exact_match_tuned", "ends_with_eot_tuned")


def grid(axes: list[str]) -> list[dict[str, str]]:
    """`["a.b=1,2", "c.d=x"]` -> every combination, as {key: value} (values kept as the text DVC's -S takes)."""
    parsed = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not key or not values:
            raise SkytuneError(f"{axis!r}: expected key=value1,value2,...")
        parsed.append([(key, v) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*parsed)]


def launch(name: str, axes: list[str], *, dry_run: bool, sky: Path, remote: str, extra: list[str]) -> int:
    if not NAME.fullmatch(name):
        raise SystemExit(f"sweep name {name!r}: letters, digits, - and _, starting with a letter")
    points = grid(axes)
    for point in points:
        try:
            overrides.check(point)
        except (ParamsError, overrides.OverridesError) as exc:
            raise SystemExit(f"grid point {point} is invalid, nothing launched:\n{exc}") from None
    names = [f"{name}-{index:02d}" for index in range(len(points))]
    try:
        bucket = jobs.owned_buckets()
        source = jobs.pushed_commit(remote)
        jobs.refuse_existing(names, source, remote)
        secrets = jobs.secrets_to_pass()
    except (jobs.JobError, buckets.BucketNotSet) as exc:
        raise SystemExit(f"nothing launched: {exc}") from None
    priced = prices.launch_env(jobs.TRAIN_YAML, sky)
    commands = [jobs.launch_command(job, list(point.items()), job, source, sky=sky,
                                    extra=[*secrets, *bucket, *priced, *extra])
                for job, point in zip(names, points, strict=True)]
    print(f"sweep {name}: {len(commands)} managed job(s) at {source.commit[:12]}")
    try:
        remote_data.prepare([list(point.items()) for point in points], dry_run=dry_run)
        jobs.run(commands, sky=sky, dry_run=dry_run)
    except (jobs.JobError, remote_data.RemoteDataError) as exc:
        raise SystemExit(str(exc)) from None
    if not dry_run:
        print(f"compare when done: python -m skytune.face.cloud.sweep pull {name}")
    return 0


def rows(shown: list[dict[str, Any]], prefix: str,
         jobs_done: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per experiment of the sweep from `dvc exp show --json`: its overridden train params, key metrics,
    the accelerator and market it ran on, and its GPU-hours and cost. With the experiment's job ledger
    (`jobs_done`: job_ledger.account of its attempts) these are the whole job's: every attempt from its setup to its
    end, every stage; else the train metrics' (through training; train_seconds x processes off a cloud node). Lost
    GPU-hours are the work preemption made the job do twice; cost is at the catalog price of where it ran."""
    out = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if not (exp.get("name") or "").startswith(prefix):
                continue
            data = exp["revs"][0]["data"]
            metrics: dict[str, Any] = {}
            for values in (data.get("metrics") or {}).values():
                metrics.update(values.get("data") or {})
            train = data["params"][str(PARAMS_FILE)]["data"]["train"]
            cloud = metrics.get("cloud") or {}  # skytune.core.cloud_node, on a SkyPilot node
            gpu = metrics.get("device", "cpu") != "cpu"
            hours = metrics.get("train_seconds", 0) * metrics.get("world_size", 1) / 3600 if gpu else 0.0
            gpu_hours, lost, cost = cloud.get("gpu_hours", hours), cloud.get("lost_gpu_hours"), cloud.get("cost")
            job = (jobs_done or {}).get(exp["name"])
            if job and cloud:
                gpus = cloud.get("gpus_per_node", 0) * cloud.get("nodes", 1)
                gpu_hours, lost = job["wall_seconds"] / 3600 * gpus, job["lost_seconds"] / 3600 * gpus
                price = cloud.get("price_per_gpu_hour")
                cost = round(price * gpu_hours, 4) if price is not None else None
            out.append({"experiment": exp["name"], "lora_r": train["lora_r"], "learning_rate": train["learning_rate"],
                        "epochs": train["epochs"], **{c: metrics.get(c) for c in COLUMNS},
                        "accelerator": cloud.get("accelerator"), "market": cloud.get("market"),
                        "hours": "whole job" if job and cloud else "through training",
                        "attempts": job["attempts"] if job else cloud.get("attempts"),
                        "wall_hours": round(job["wall_seconds"] / 3600, 4) if job else cloud.get("wall_hours"),
                        "gpu_hours": round(gpu_hours, 3), "lost_gpu_hours": lost, "cost": cost})
    return sorted(out, key=lambda r: r["experiment"])


def job_ledgers(names: list[str]) -> dict[str, dict[str, Any]]:
    """job_ledger.account of each experiment's attempts, read from the checkpoint bucket ($CHECKPOINT_BUCKET, where
    sky/train.yaml mounts the checkpoints: <bucket>/<experiment>/job/); {} without the bucket."""
    try:
        bucket = buckets.checkpoint_bucket()
    except buckets.BucketNotSet:
        print(f"({buckets.CHECKPOINT_BUCKET} is not set: hours and cost through training only)")
        return {}
    fs = buckets.filesystem()
    found = {}
    for name in names:
        try:
            paths = fs.ls(f"{bucket}/{name}/{job_ledger.LEDGER}")
        except FileNotFoundError:
            continue
        attempts = job_ledger.parse({path.rsplit("/", 1)[-1]: fs.cat(path).decode() for path in paths
                                     if path.endswith((job_ledger.RECORD, job_ledger.BEAT))})
        if attempts:
            found[name] = job_ledger.account(attempts)
    return found


def pull(name: str) -> int:
    prefix = f"{name}-"
    listed = dvc("exp", "list", "origin", "--all-commits", "--name-only").split()
    names = sorted(n for n in listed if n.startswith(prefix))
    if not names:
        raise SystemExit(f"no experiment named {prefix}* on origin yet (sky jobs queue shows the running jobs)")
    dvc("exp", "pull", "origin", *names)
    table = rows(json.loads(dvc("exp", "show", "--all-commits", "--json")), prefix, job_ledgers(names))
    if not table:
        raise SystemExit(f"pulled {names}, but dvc exp show --all-commits lists none of them")
    header = list(table[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join("" if row[h] is None else str(row[h]) for h in header) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, extra = jobs.split_sky_args(argv)
    parser = argparse.ArgumentParser(prog="python -m skytune.face.cloud.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("launch", help="one managed job per grid point")
    up.add_argument("name")
    up.add_argument("axes", nargs="+", help="key=value1,value2,... (params.yaml keys)")
    up.add_argument("--dry-run", action="store_true", help="check the grid and print the commands only")
    up.add_argument("--sky", type=Path, default=SKY)
    up.add_argument("--remote", default="origin", help="the git remote the nodes clone and push to")
    down = sub.add_parser("pull", help="pull the sweep's experiments and print the comparison")
    down.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "launch":
        return launch(args.name, args.axes, dry_run=args.dry_run, sky=args.sky, remote=args.remote, extra=extra)
    return pull(args.name)


if __name__ == "__main__":
    with reported():
        sys.exit(main())
