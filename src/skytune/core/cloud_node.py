"""What a cloud experiment ran on and cost, as the node sees it: recorded in the train stage's metrics, so that
`make sweep-pull` (skytune.face.cloud.sweep) shows GPU-hours and cost per experiment.

On a SkyPilot node (SKYPILOT_TASK_ID set): the accelerator (CUDA's device name, else "cpu"), GPUs per node and
nodes (SKYPILOT_NUM_GPUS_PER_NODE, SKYPILOT_NUM_NODES), the cloud, region and zone (SKYPILOT_CLUSTER_INFO), the market
(spot or on-demand: $SKYTUNE_MARKET if set, else the cloud's instance metadata: AWS, GCP, Azure), and the hourly
price per GPU in that cloud's region and market when the launcher passed SkyPilot's catalog prices ($SKYTUNE_PRICES,
skytune.face.cloud.prices; `price_basis` says whether the region's price was known or the catalog's cheapest
stood in).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Mapping
from typing import Any

from skytune.core import job_ledger

log = logging.getLogger(__name__)

# Per GPU-hour, from the launcher: {"L4": {"aws/us-east-1": {"spot": 0.25, "on-demand": 0.8},
# "aws/us-east-1/us-east-1a": {...}, ..., "*": {...}}, ...}: by cloud/region and cloud/region/zone, "*" the cheapest
# anywhere (skytune.face.cloud.prices).
PRICES_ENV = "SKYTUNE_PRICES"
ANYWHERE = "*"
MARKET_ENV = "SKYTUNE_MARKET"  # spot | on-demand, when the instance metadata cannot tell
# The instance metadata that says whether a VM is spot, per cloud (SKYPILOT_CLUSTER_INFO's "cloud"): the URL, its
# headers and the answer that means spot.
_METADATA = {
    "aws": ("http://169.254.169.254/latest/meta-data/instance-life-cycle", {}, "spot"),
    "gcp": ("http://metadata.google.internal/computeMetadata/v1/instance/scheduling/preemptible",
            {"Metadata-Flavor": "Google"}, "TRUE"),
    "azure": ("http://169.254.169.254/metadata/instance/compute/priority?api-version=2021-02-01&format=text",
              {"Metadata": "true"}, "Spot"),
}


def market_from_metadata(cloud: str | None, timeout: float = 1.0) -> str:
    """spot | on-demand from the cloud's instance metadata service, or "unknown" (another cloud, no answer)."""
    if not cloud or cloud.lower() not in _METADATA:
        return "unknown"
    url, headers, spot = _METADATA[cloud.lower()]
    try:
        if cloud.lower() == "aws":  # IMDSv2: a session token first
            token = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
                                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
            with urllib.request.urlopen(token, timeout=timeout) as answer:
                headers = {"X-aws-ec2-metadata-token": answer.read().decode()}
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return "spot" if answer.read().decode().strip() == spot else "on-demand"
    except OSError as exc:
        log.info("instance metadata of %s did not answer (%s): market unknown", cloud, exc)
        return "unknown"


def hourly_price(prices: Mapping[str, Mapping[str, Mapping[str, float]]], accelerator: str, market: str,
                 cloud: str | None, region: str | None, zone: str | None = None) -> tuple[float | None, str | None]:
    """The price per GPU-hour of `accelerator` (a CUDA device name such as "NVIDIA A100-SXM4-80GB": the catalog name it
    contains, the longest, so A10G is not taken for A10) on `market` in `cloud`'s `region` and `zone`, and where that
    price is from: "zone"; "region" where the table has the region but not the zone (its cheapest zone: a lower
    bound where zones differ); "cheapest in the catalog" where it has neither (a lower bound)."""
    names = sorted((n for n in prices if n.lower() in accelerator.lower()), key=len, reverse=True)
    if not names:
        return None, None
    table = prices[names[0]]
    place = f"{(cloud or '').lower()}/{(region or '').lower()}"
    for key, basis in ((f"{place}/{zone.lower()}" if zone else None, "zone"), (place, "region"),
                       (ANYWHERE, "cheapest in the catalog")):
        price = table.get(key, {}).get(market) if key else None
        if price is not None:
            return price, basis
    return None, None


def describe(seconds: float, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The cloud block of the train metrics, or None off a SkyPilot node. Its hours are the job's so far, from the
    attempts' ledger (`job_ledger`): every attempt from its VM's setup, this one up to the end of training, and the
    work lost to preemption apart (`lost_*_hours`). Without a ledger, `seconds` (the run's wall time on the node,
    all attempts together up to their last checkpoint) stands in, a lower bound."""
    env = os.environ if environ is None else environ
    if not env.get("SKYPILOT_TASK_ID"):
        return None
    import torch  # here: the launcher's commands import this module for its names, and need no torch

    info = json.loads(env.get("SKYPILOT_CLUSTER_INFO") or "{}")
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    gpus = int(env.get("SKYPILOT_NUM_GPUS_PER_NODE") or 0)
    nodes = int(env.get("SKYPILOT_NUM_NODES") or 1)
    market = env.get(MARKET_ENV) or market_from_metadata(info.get("cloud"))
    ledger = job_ledger.directory(env)
    attempts = job_ledger.read(ledger) if ledger is not None else []
    if attempts:
        job = job_ledger.account(attempts, current=env[job_ledger.ATTEMPT_ENV])
        hours, lost = job["wall_seconds"] / 3600, job["lost_seconds"] / 3600
        covers = "setup and every attempt, through training"
    else:
        hours, lost = seconds / 3600, 0.0
        covers = "the run through training, each attempt up to its last checkpoint (no job ledger)"
    block: dict[str, Any] = {"accelerator": accelerator, "gpus_per_node": gpus, "nodes": nodes,
                             "cloud": info.get("cloud"), "region": info.get("region"), "zone": info.get("zone"),
                             "market": market, "attempts": len(attempts) or None, "hours_cover": covers,
                             "wall_hours": round(hours, 4), "gpu_hours": round(hours * gpus * nodes, 4),
                             "lost_wall_hours": round(lost, 4), "lost_gpu_hours": round(lost * gpus * nodes, 4)}
    prices = json.loads(env.get(PRICES_ENV) or "{}")
    where = (info.get("cloud"), info.get("region"), info.get("zone"))
    price, basis = hourly_price(prices, accelerator, market, *where) if market != "unknown" else (None, None)
    if price is not None:
        block |= {"price_per_gpu_hour": price, "price_basis": basis, "cost": round(price * block["gpu_hours"], 4),
                  "lost_cost": round(price * block["lost_gpu_hours"], 4)}
    return block
