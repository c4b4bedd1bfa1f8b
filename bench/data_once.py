"""What "data once" saves a GPU node per sweep point: the data stages computed, against the same stages restored
from a DVC remote's run-cache on a fresh clone, side by side in one run, on params.yaml as committed (the embedded
default).

    .venv/bin/python bench/data_once.py

A clone of HEAD with a local directory as its DVC remote computes ingest -> merge_data (`dvc repro merge_data`) and
pushes them as `make launch` does (skytune.face.cloud.remote_data.push: outputs and the data stages' run-cache
entries); a second clone then restores them as a node does (`dvc repro --pull --allow-missing merge_data`).
Printed: the seconds of each, the stages each really ran, and the remote's size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skytune.face.cloud import remote_data

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.monotonic()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.monotonic() - start, done.stdout + done.stderr


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        laptop, node, store = Path(tmp) / "laptop", Path(tmp) / "node", Path(tmp) / "remote"
        run("git", "clone", "-q", str(REPO), str(laptop), cwd=Path(tmp))
        run(sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(store), cwd=laptop)
        run("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "remote",
            ".dvc/config", cwd=laptop)
        computed, log = run(sys.executable, "-m", "dvc", "repro", "merge_data", cwd=laptop)
        ran = re.findall(r"Running stage '(\w+)'", log)
        start = time.monotonic()
        remote_data.push(laptop)
        pushed = time.monotonic() - start
        run("git", "clone", "-q", str(laptop), str(node), cwd=Path(tmp))
        restored, log = run(sys.executable, "-m", "dvc", "repro", "--pull", "--allow-missing", "merge_data", cwd=node)
        rerun = re.findall(r"Running stage '(\w+)'", log)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(f"computed (laptop):        {computed:6.1f} s  ran {ran}")
    print(f"pushed with the run-cache: {pushed:5.1f} s  remote {size / 1e6:.2f} MB")
    print(f"restored (node):          {restored:6.1f} s  ran {rerun}")
    print(f"per sweep point off the GPU: {computed - restored:.1f} s ({computed / max(restored, 1e-9):.0f}x)")


if __name__ == "__main__":
    main()
