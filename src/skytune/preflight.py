"""Preflight: everything a cloud run needs, checked from this machine in seconds, before any money is spent.

    python -m skytune.preflight [--remote origin] [--no-sky-check]      (make preflight)

Checks, each reported with what to do when it fails (exit 1 if any fails):
- params: params.yaml loads (every problem, with file and line);
- launcher: SkyPilot is installed in its own environment and `sky check` finds an enabled cloud;
- bucket: the DVC remote (with its endpoint and the AWS_* credentials in the environment) can be listed;
- model: the base model can be read with $HF_TOKEN at the pinned revision (gated models too);
- git: the git remote the experiments are pushed to answers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from skytune.params import ParamsError, load_params

SKY = Path(".venv-sky/bin/sky")


class CheckFailed(Exception):
    """A check failed; the message says why and what to do."""


def check_params() -> str:
    try:
        params = load_params()
    except ParamsError as exc:
        raise CheckFailed(str(exc)) from None
    return f"params.yaml: base {params.model.base}, method {params.train.method}"


def check_launcher(sky: Path, run_sky_check: bool) -> str:
    if not sky.is_file():
        raise CheckFailed(f"{sky} not found: `make launcher` installs SkyPilot in its own environment")
    if not run_sky_check:
        return f"{sky} installed (sky check skipped)"
    done = subprocess.run([str(sky), "check"], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 or "enabled" not in done.stdout.lower():
        raise CheckFailed(f"`sky check` found no usable cloud: {done.stdout[-800:]}{done.stderr[-800:]}")
    return "sky check: " + " ".join(line.strip() for line in done.stdout.splitlines() if "enabled" in line.lower())[:200]


def check_bucket() -> str:
    """List the DVC remote's bucket with the credentials in the environment (dvc-s3's own filesystem)."""
    from dvc.repo import Repo
    from s3fs import S3FileSystem

    config = Repo().config
    name = config["core"].get("remote")
    if not name:
        raise CheckFailed("no default DVC remote: `dvc remote add -d storage s3://<bucket>/<path>`")
    remote = config["remote"][name]
    url = remote["url"]
    if not url.startswith("s3://"):
        return f"remote {name} is {url} (not S3: nothing to check)"
    endpoint = remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")
    fs = S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {},
                      config_kwargs={"request_checksum_calculation": "when_required",
                                     "response_checksum_validation": "when_required"})
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except Exception as exc:  # noqa: BLE001 - botocore raises many types (auth, DNS, missing bucket)
        raise CheckFailed(f"DVC remote {name} ({url}, endpoint {endpoint or 'AWS'}) cannot be listed with the "
                          f"AWS_* credentials in the environment: {type(exc).__name__}: {exc}") from None
    return f"DVC remote {name}: {url} listed (endpoint {endpoint or 'AWS'})"


def check_model() -> str:
    from skytune import models

    try:
        params = load_params()
    except ParamsError:
        raise CheckFailed("params.yaml does not load (see params above)") from None
    base, revision = params.model.base, params.model.revision
    if base.startswith(models.BUILTIN_PREFIX) or Path(base).is_dir():
        return f"{base}: built or read locally, no hub access needed"
    try:
        commit = models.resolve_hub(base, revision)
    except RuntimeError as exc:
        raise CheckFailed(f"{exc} (the node reads it with the HF_TOKEN secret you pass at launch)") from None
    return f"{base}@{revision or 'main'} readable: commit {commit}"


def check_git(remote: str) -> str:
    done = subprocess.run(["git", "ls-remote", "--heads", remote], capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise CheckFailed(f"git remote {remote!r} does not answer: {done.stderr.strip()[-500:]} (experiments are "
                          "pushed there with dvc exp push; a node needs GIT_REMOTE and a GIT_TOKEN secret)")
    return f"git remote {remote} answers ({len(done.stdout.splitlines())} branch(es))"


def run(checks: list[tuple[str, Callable[[], str]]]) -> int:
    failed = 0
    for name, check in checks:
        try:
            print(f"ok    {name:9s} {check()}")
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL  {name:9s} {exc}")
    print(f"preflight: {len(checks) - failed}/{len(checks)} passed" + ("" if not failed else "; fix the above first"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--remote", default="origin", help="the git remote experiments are pushed to")
    parser.add_argument("--sky", type=Path, default=Path(os.environ.get("SKY", SKY)))
    parser.add_argument("--no-sky-check", action="store_true", help="only check SkyPilot is installed")
    args = parser.parse_args(argv)
    return run([
        ("params", check_params),
        ("launcher", lambda: check_launcher(args.sky, not args.no_sky_check)),
        ("bucket", check_bucket),
        ("model", check_model),
        ("git", lambda: check_git(args.remote)),
    ])


if __name__ == "__main__":
    sys.exit(main())
