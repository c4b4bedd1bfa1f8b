"""What a cloud experiment ran on and cost (skytune.core.cloud_node), from the variables SkyPilot sets and a real
HTTP metadata endpoint on loopback."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO

from skytune.core import cloud_node, job_ledger

NODE = {"SKYPILOT_TASK_ID": "sky-managed-1", "SKYPILOT_NUM_GPUS_PER_NODE": "8", "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "AWS", "region": "us-east-1",
                                             "zone": "us-east-1a"}),
        cloud_node.MARKET_ENV: "spot",
        cloud_node.PRICES_ENV: json.dumps({"A10": {"aws/us-east-1": {"spot": 0.5}, "*": {"spot": 0.5}},
                                           "A10G": {"aws/us-east-1": {"spot": 0.4, "on-demand": 1.0},
                                                    "aws/us-east-1/us-east-1a": {"spot": 0.45, "on-demand": 1.0},
                                                    "aws/us-east-1/us-east-1b": {"spot": 0.4, "on-demand": 1.0},
                                                    "aws/us-west-2": {"spot": 0.3, "on-demand": 0.9},
                                                    "*": {"spot": 0.3, "on-demand": 0.9}}})}


def test_a_node_records_its_hardware_market_hours_and_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=0: "NVIDIA A10G")
    block = cloud_node.describe(5400.0, NODE)  # 1.5 h of wall time
    assert block == {"accelerator": "NVIDIA A10G", "gpus_per_node": 8, "nodes": 2, "cloud": "AWS",
                     "region": "us-east-1", "zone": "us-east-1a", "market": "spot", "attempts": None,
                     "hours_cover": "the run through training, each attempt up to its last checkpoint (no job ledger)",
                     "wall_hours": 1.5, "gpu_hours": 24.0, "lost_wall_hours": 0.0, "lost_gpu_hours": 0.0,
                     "price_per_gpu_hour": 0.45, "price_basis": "zone", "cost": 10.8,
                     "lost_cost": 0.0}  # A10G's in us-east-1a: not A10's, not us-east-1b's or us-west-2's cheaper one
    on_demand = cloud_node.describe(3600.0, {**NODE, cloud_node.MARKET_ENV: "on-demand"})
    assert on_demand["cost"] == 16.0
    unlisted_zone = json.dumps({"cloud": "AWS", "region": "us-east-1", "zone": "us-east-1f"})
    in_region = cloud_node.describe(3600.0, {**NODE, "SKYPILOT_CLUSTER_INFO": unlisted_zone})
    assert (in_region["price_per_gpu_hour"], in_region["price_basis"]) == (0.4, "region")  # its cheapest zone
    elsewhere = json.dumps({"cloud": "AWS", "region": "eu-north-1", "zone": "eu-north-1a"})
    unlisted = cloud_node.describe(3600.0, {**NODE, "SKYPILOT_CLUSTER_INFO": elsewhere})
    assert unlisted["price_per_gpu_hour"] == 0.3 and unlisted["price_basis"] == "cheapest in the catalog"
    unpriced = cloud_node.describe(3600.0, {**NODE, cloud_node.PRICES_ENV: ""})
    assert "cost" not in unpriced and unpriced["gpu_hours"] == 16.0
    assert cloud_node.describe(3600.0, {}) is None  # not on a SkyPilot node: no cloud block


def test_the_job_ledger_counts_every_attempt_from_its_setup_and_the_work_preemption_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two VMs: the first set up at t=0, ran from t=600, completed a checkpoint at t=4200, was last seen at t=5400
    and vanished; the second, set up at t=6000, is training at t=9000. Wall: 5400 + 3000 s; lost: 5400 - 4200 s."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=0: "NVIDIA A10G")
    ledger = tmp_path / "ckpt" / job_ledger.LEDGER
    ledger.mkdir(parents=True)
    (ledger / "attempt-0-vm1.json").write_text(json.dumps({"started": 0, "run_started": 600, "checkpoint_at": 4200}))
    (ledger / "attempt-0-vm1.beat").write_text("5400\n")
    second = {**NODE, job_ledger.ATTEMPT_ENV: "attempt-6000-vm2", job_ledger.CHECKPOINT_DIR_ENV: str(tmp_path / "ckpt"),
              job_ledger.NODE_STARTED_ENV: "6000", job_ledger.RUN_STARTED_ENV: "6300"}
    job_ledger.begin(second)
    monkeypatch.setattr(job_ledger.time, "time", lambda: 9000.0)
    block = cloud_node.describe(1.0, second)  # the run's own seconds are not what counts with a ledger
    wall, lost = (5400 + 3000) / 3600, 1200 / 3600
    assert block["attempts"] == 2 and block["hours_cover"] == "setup and every attempt, through training"
    assert block["wall_hours"] == round(wall, 4) and block["gpu_hours"] == round(wall * 16, 4)
    assert block["lost_wall_hours"] == round(lost, 4) and block["lost_gpu_hours"] == round(lost * 16, 4)
    assert block["cost"] == round(0.45 * round(wall * 16, 4), 4)  # us-east-1a's spot price

    # The second VM finishes at t=9600 (the experiment pushed): the whole job, as make sweep-pull reads it.
    monkeypatch.setattr(job_ledger.time, "time", lambda: 9600.0)
    job_ledger.mark("finished", environ=second)
    assert job_ledger.account(job_ledger.read(ledger)) == {"attempts": 2, "wall_seconds": 5400 + 3600,
                                                            "lost_seconds": 1200}
    # A VM that vanished before any checkpoint lost everything it ran; one never seen after its start, nothing.
    assert job_ledger.account([{"attempt": "a", "started": 0, "run_started": 100, "last_seen": 700}]) == {
        "attempts": 1, "wall_seconds": 700, "lost_seconds": 600}
    assert job_ledger.account([{"attempt": "a", "started": 0, "run_started": 100}])["lost_seconds"] == 0


def test_the_market_comes_from_the_instance_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"/preemptible": "TRUE"}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Metadata-Flavor") == "Google"  # GCP refuses a request without it
            body = answers.get(self.path, "") if ok else ""
            self.send_response(200 if ok else 403)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/preemptible"
        monkeypatch.setitem(cloud_node._METADATA, "gcp", (url, {"Metadata-Flavor": "Google"}, "TRUE"))
        assert cloud_node.market_from_metadata("GCP") == "spot"
        answers["/preemptible"] = "FALSE"
        assert cloud_node.market_from_metadata("GCP") == "on-demand"
        monkeypatch.setitem(cloud_node._METADATA, "gcp", (url, {}, "TRUE"))  # refused: no guess
        assert cloud_node.market_from_metadata("GCP") == "unknown"
    finally:
        server.shutdown()
    assert cloud_node.market_from_metadata("Kubernetes") == "unknown"


def gpu_info(name: str, count: int, mib: int) -> str:
    """A catalog's GpuInfo cell, as SkyPilot's catalogs write it (a Python literal, quoted for CSV)."""
    gpus = [{"Name": name, "Manufacturer": "NVIDIA", "Count": float(count), "MemoryInfo": {"SizeInMiB": mib}}]
    return '"' + repr({"Gpus": gpus, "TotalGpuMemoryInMiB": mib * count}) + '"'


CATALOG = "\n".join([
    "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,SpotPrice,Region,GpuInfo",
    f"gpu_1x_a10,A10,1.0,30.0,200.0,0.75,,us-east-1,{gpu_info('A10', 1, 24576)}",
    f"gpu_1x_a10,A10,1.0,30.0,200.0,0.86,,europe-central-1,{gpu_info('A10', 1, 24576)}",
    f"gpu_8x_a100,A100,8.0,124.0,1800.0,10.32,,us-east-1,{gpu_info('A100', 8, 40960)}",
    f"gpu_1x_a100,A100,1.0,30.0,200.0,1.29,,us-east-1,{gpu_info('A100', 1, 40960)}",
    f"gpu_1x_a100,A100,1.0,30.0,200.0,1.49,,us-west-1,{gpu_info('A100', 1, 40960)}",
    "cpu_4x,,,4.0,16.0,0.1,,us-east-1,", ""])
# AWS's format: a row per zone; spot prices differ between zones, on-demand ones do not. Two instance types carry one
# A10G: each place is priced at the cheaper.
AWS_CATALOG = "\n".join([
    "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone",
    f"g5.xlarge,A10G,1.0,4.0,16.0,{gpu_info('A10G', 1, 24576)},1.006,0.45,us-east-1,us-east-1a",
    f"g5.xlarge,A10G,1.0,4.0,16.0,{gpu_info('A10G', 1, 24576)},1.006,0.39,us-east-1,us-east-1b",
    f"g5.2xlarge,A10G,1.0,8.0,32.0,{gpu_info('A10G', 1, 24576)},1.212,0.5,us-east-1,us-east-1a",
    f"g5.xlarge,A10G,1.0,4.0,16.0,{gpu_info('A10G', 1, 24576)},1.006,0.52,us-west-2,us-west-2a", ""])


@pytest.mark.skipif(not (REPO / ".venv-sky" / "bin" / "python").is_file(), reason="make launcher builds SkyPilot")
def test_the_catalog_query_reads_skypilots_own_catalog_per_region_and_zone(tmp_path: Path) -> None:
    """The launcher's query, run in SkyPilot's environment by SkyPilot's own catalog code, on catalog files written
    here (Lambda's format, regions only; AWS's, a row per zone) in place of the ones SkyPilot downloads."""
    from skytune.face.cloud import prices

    sky = REPO / ".venv-sky" / "bin" / "sky"
    env = {**os.environ, "HOME": str(tmp_path)}
    for cloud, catalog in (("lambda", CATALOG), ("aws", AWS_CATALOG)):
        query = f"from sky.catalog import common; print(common.get_catalog_path('{cloud}/vms.csv'))"
        where = subprocess.run([str(sky.parent / "python"), "-c", query], env=env, capture_output=True, text=True,
                               check=True).stdout.strip()
        assert where.startswith(str(tmp_path))
        Path(where).parent.mkdir(parents=True)
        Path(where).write_text(catalog)
    (tmp_path / "train.yaml").write_text("resources:\n  accelerators: {A10: 1, A10G: 1, A100: 1, H100: 1}\n")
    table = prices.catalog_prices(tmp_path / "train.yaml", sky, clouds=["lambda", "aws"], environ=env)
    assert table == {  # per GPU-hour: the 8-GPU A100 machine is not a 1-GPU offer; H100 is not in these catalogs
        "A10": {"lambda/us-east-1": {"on-demand": 0.75}, "lambda/europe-central-1": {"on-demand": 0.86},
                "*": {"on-demand": 0.75}},
        "A10G": {"aws/us-east-1": {"on-demand": 1.006, "spot": 0.39},
                 "aws/us-east-1/us-east-1a": {"on-demand": 1.006, "spot": 0.45},
                 "aws/us-east-1/us-east-1b": {"on-demand": 1.006, "spot": 0.39},
                 "aws/us-west-2": {"on-demand": 1.006, "spot": 0.52},
                 "aws/us-west-2/us-west-2a": {"on-demand": 1.006, "spot": 0.52},
                 "*": {"on-demand": 1.006, "spot": 0.39}},
        "A100": {"lambda/us-east-1": {"on-demand": 1.29}, "lambda/us-west-1": {"on-demand": 1.49},
                 "*": {"on-demand": 1.29}}}
    price = cloud_node.hourly_price(table, "NVIDIA A100-SXM4-40GB", "on-demand", "Lambda", "us-west-1")
    assert price == (1.49, "region")
    assert cloud_node.hourly_price(table, "NVIDIA A10G", "spot", "AWS", "us-east-1", "us-east-1a") == (0.45, "zone")


def test_launch_prices_come_from_the_yamls_accelerators(tmp_path) -> None:
    from conftest import REPO

    from skytune.face.cloud import prices

    assert prices.accelerators(REPO / "sky" / "train.yaml") == {"L4": 1, "A10G": 1, "A100": 1}
    assert prices.accelerators(REPO / "sky" / "train-multinode.yaml") == {"A100": 8, "H100": 8}
    assert prices.catalog_prices(REPO / "sky" / "train.yaml", tmp_path / "no-sky" / "sky") == {}  # no SkyPilot here
