"""Hourly GPU prices from SkyPilot's catalog at launch, passed to the node ($SKYTUNE_PRICES), which records the cost
of the experiment at the price of the cloud, region and market it got (skytune.core.cloud_node).

The catalog is read in SkyPilot's own environment (make launcher), for the accelerators the training YAML may get,
on the clouds `sky check` enabled: per GPU-hour, spot and on-demand, for every zone and every region that offers each
(a region's price is its cheapest zone's; zones are where the catalog lists them, as AWS's and GCP's do, and spot
prices differ between them), and the cheapest anywhere under "*" for a place the table lacks. Where several instance
types carry the accelerator, each place gets the cheapest (the node does not know which one SkyPilot picked). Where the catalog cannot be read (offline, no cloud enabled) the job launches without
prices: its metrics then hold GPU-hours only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from skytune.core.cloud_node import ANYWHERE, PRICES_ENV
from skytune.face.commands import run

# Runs in SkyPilot's environment: argv[1] is {"L4": 1, ...}, argv[2] the clouds to read (null: the enabled ones),
# argv[3] the key of the cheapest anywhere; prints {"L4": {"aws/us-east-1": {"spot": ..., "on-demand": ...},
# "aws/us-east-1/us-east-1a": {...}, ..., "*": {...}}, ...}, prices per GPU-hour. Only sky.catalog's public functions.
_QUERY = """
import json, sys
from sky import catalog, check
from sky.clouds import CloudCapability
wanted, clouds, anywhere = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
if clouds is None:
    clouds = [str(c).lower() for c in check.get_cached_enabled_clouds_or_refresh(
        CloudCapability.COMPUTE, raise_if_no_cloud_access=False)]
prices = {}
for name, count in wanted.items():
    for cloud in clouds:
        try:
            offers = catalog.list_accelerators(gpus_only=True, name_filter=name, quantity_filter=count,
                                               clouds=cloud, case_sensitive=False, all_regions=True)
        except Exception as exc:
            print(f"{cloud} catalog: {exc}", file=sys.stderr)
            continue
        for info in offers.get(name, []):
            region = str(info.region).lower()
            for market, price in (("on-demand", info.price), ("spot", info.spot_price)):
                if not (price and price == price):  # NaN where a market is not offered
                    continue
                places = [(f"{cloud}/{region}", price), (anywhere, price)]
                try:
                    zones = [z.name for r in catalog.get_region_zones_for_instance_type(
                                 info.instance_type, market == "spot", clouds=cloud)
                             if str(r.name).lower() == region for z in (r.zones or [])]
                    places += [(f"{cloud}/{region}/{str(z).lower()}", catalog.get_hourly_cost(
                                   info.instance_type, market == "spot", info.region, z, clouds=cloud)) for z in zones]
                except Exception as exc:  # zones are a refinement: the region's price stands without them
                    print(f"{cloud} zones of {info.instance_type}: {exc}", file=sys.stderr)
                for where, cost in places:
                    per_gpu = round(cost / info.accelerator_count, 4)
                    best = prices.setdefault(name, {}).setdefault(where, {})
                    best[market] = min(best.get(market, per_gpu), per_gpu)
print(json.dumps(prices))
"""


def accelerators(train_yaml: Path) -> dict[str, int]:
    """The accelerators `resources.accelerators` allows: {"L4": 1, "A100": 8}."""
    wanted = (yaml.safe_load(train_yaml.read_text(encoding="utf-8")).get("resources") or {}).get("accelerators")
    if isinstance(wanted, str):
        name, _, count = wanted.partition(":")
        return {name: int(count or 1)}
    return {str(k): int(v) for k, v in (wanted or {}).items()}


def catalog_prices(train_yaml: Path, sky: Path, clouds: list[str] | None = None,
                   environ: dict[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per-GPU hourly prices from SkyPilot's catalog, by accelerator and cloud/region ({} where it cannot be read,
    said on stdout); `clouds` (default: the ones `sky check` enabled) and `environ` (default: this one) for tests."""
    python = sky.parent / "python"
    wanted = accelerators(train_yaml)
    if not wanted or not python.is_file():
        return {}
    done = run([python, "-c", _QUERY, json.dumps(wanted), json.dumps(clouds), ANYWHERE], timeout=300, error=None,
               env={**(os.environ if environ is None else environ), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"})
    try:
        prices = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout else {}
    except ValueError:
        prices = {}
    if not prices:
        why = (done.stderr.strip().splitlines() or ["no cloud enabled"])[-1][:200]
        print(f"no GPU prices from SkyPilot's catalog ({why}): the jobs record GPU-hours, not cost")
    return prices


def launch_env(train_yaml: Path, sky: Path) -> list[str]:
    """`--env SKYTUNE_PRICES=...` for `sky jobs launch`, or nothing when no price is known."""
    prices = catalog_prices(train_yaml, sky)
    return ["--env", f"{PRICES_ENV}={json.dumps(prices, separators=(',', ':'))}"] if prices else []

