"""What a cloud experiment ran on and cost (skytune.core.cloud_node), from the variables SkyPilot sets and a real
HTTP metadata endpoint on loopback."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from skytune.core import cloud_node

NODE = {"SKYPILOT_TASK_ID": "sky-managed-1", "SKYPILOT_NUM_GPUS_PER_NODE": "8", "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "AWS", "region": "us-east-1",
                                             "zone": "us-east-1a"}),
        cloud_node.MARKET_ENV: "spot",
        cloud_node.PRICES_ENV: json.dumps({"A10": {"spot": 0.5}, "A10G": {"spot": 0.4, "on-demand": 1.0}})}


def test_a_node_records_its_hardware_market_hours_and_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud_node.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cloud_node.torch.cuda, "get_device_name", lambda _=0: "NVIDIA A10G")
    block = cloud_node.describe(5400.0, NODE)  # 1.5 h of wall time
    assert block == {"accelerator": "NVIDIA A10G", "gpus_per_node": 8, "nodes": 2, "cloud": "AWS",
                     "region": "us-east-1", "zone": "us-east-1a", "market": "spot", "wall_hours": 1.5,
                     "gpu_hours": 24.0, "price_per_gpu_hour": 0.4, "cost": 9.6}  # A10G's price, not A10's
    on_demand = cloud_node.describe(3600.0, {**NODE, cloud_node.MARKET_ENV: "on-demand"})
    assert on_demand["cost"] == 16.0
    unpriced = cloud_node.describe(3600.0, {**NODE, cloud_node.PRICES_ENV: ""})
    assert "cost" not in unpriced and unpriced["gpu_hours"] == 16.0
    assert cloud_node.describe(3600.0, {}) is None  # not on a SkyPilot node: no cloud block


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


def test_launch_prices_come_from_the_yamls_accelerators(tmp_path) -> None:
    from conftest import REPO

    from skytune.face.cloud import prices

    assert prices.accelerators(REPO / "sky" / "train.yaml") == {"L4": 1, "A10G": 1, "A100": 1}
    assert prices.accelerators(REPO / "sky" / "train-multinode.yaml") == {"A100": 8, "H100": 8}
    assert prices.catalog_prices(REPO / "sky" / "train.yaml", tmp_path / "no-sky" / "sky") == {}  # no SkyPilot here
