"""Preflight: everything a cloud run needs, checked from this machine in seconds, before any money is spent.

    python -m skytune.face.cloud.preflight [--remote origin] [--no-sky-check]      (make preflight)

Checks, each reported with what to do when it fails (exit 1 if any fails):
- params: params.yaml loads (every problem, with file and line);
- launcher: SkyPilot is installed in its own environment and `sky check` enables a cloud that can compute;
- bucket: the DVC remote, committed in .dvc/config (the project names none), can be listed with its endpoint and
  the AWS_* credentials in the environment;
- checkpoints: $CHECKPOINT_BUCKET is set to a bucket that is yours: listed, or not created yet (SkyPilot creates
  it at launch), never one that exists and refuses you;
- data: the data stages' outputs for HEAD are on the DVC remote with their run-cache (computed here, or restored
  from this machine's run-cache; make launch and make sweep push what is missing);
- model: the base model's files can be read with $HF_TOKEN at the pinned revision (gated models: access granted);
- git: HEAD is committed and pushed (the node clones it), and $GIT_TOKEN may push to the remote (a dry-run push).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from skytune.core.errors import SkytuneError, reported
from skytune.core.hub import resolve_model
from skytune.core.models.builtin import BUILTIN_PREFIX
from skytune.core.params import ParamsError, load_params
from skytune.face import commands
from skytune.face.cloud import buckets, jobs, remote_data
from skytune.face.commands import SKY

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckFailed(Exception):
    """A check failed; the message says why and what to do."""


def check_params() -> str:
    try:
        params = load_params()
    except ParamsError as exc:
        raise CheckFailed(str(exc)) from None
    return f"params.yaml: base {params.model.base}, method {params.train.method}"


def enabled_infra(sky_check_output: str) -> list[str]:
    """The clouds `sky check` lists under its closing "Enabled infra" summary (none: an empty list)."""
    text = _ANSI.sub("", sky_check_output)
    if "Enabled infra" not in text:
        return []
    summary = text.rsplit("Enabled infra", 1)[1].splitlines()[1:]
    clouds = []
    for line in summary:
        if not line.strip() or line.startswith("Note:"):
            break
        if "No infra to check/enabled" not in line:
            clouds.append(line.strip())
    return clouds


def check_launcher(sky: Path, run_sky_check: bool) -> str:
    if not sky.is_file():
        raise CheckFailed(f"{sky} not found: `make launcher` installs SkyPilot in its own environment")
    if not run_sky_check:
        return f"{sky} installed (sky check skipped)"
    done = commands.run([sky, "check"], timeout=300, error=None)
    clouds = enabled_infra(done.stdout)
    computing = [c for c in clouds if "compute" in c.lower()]
    if done.returncode != 0 or not computing:
        raise CheckFailed(f"`sky check` enables no cloud that can run a job ({'; '.join(clouds) or 'none'}): set "
                          "up a cloud's credentials and install its SDK (make launcher SKY_EXTRAS=aws), then "
                          f"`{sky} check`. {_ANSI.sub('', done.stderr)[-400:]}")
    return "sky check: " + "; ".join(computing)[:200]


def check_bucket() -> str:
    """List the DVC remote's bucket with the credentials in the environment (dvc-s3's own filesystem)."""
    from dvc.repo import Repo

    try:
        name, url = buckets.dvc_remote()
    except buckets.BucketNotSet as exc:
        raise CheckFailed(str(exc)) from None
    remote = Repo().config["remote"][name]  # with .dvc/config.local's endpoint and region
    if not url.startswith("s3://"):
        return f"remote {name} is {url} (not S3: nothing to check)"
    endpoint = remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")
    fs = buckets.filesystem(endpoint, remote.get("region"))
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except Exception as exc:  # noqa: BLE001 - botocore raises many types (auth, DNS, missing bucket)
        raise CheckFailed(f"DVC remote {name} ({url}, endpoint {endpoint or 'AWS'}) cannot be listed with the "
                          f"AWS_* credentials in the environment: {type(exc).__name__}: {exc}") from None
    return f"DVC remote {name}: {url} listed (endpoint {endpoint or 'AWS'})"


def check_checkpoints() -> str:
    """$CHECKPOINT_BUCKET is set, and the bucket is yours or does not exist yet (the endpoint of the DVC remote, else
    AWS: where the launch cloud's store is S3-compatible)."""
    try:
        name = buckets.checkpoint_bucket()
    except buckets.BucketNotSet as exc:
        raise CheckFailed(str(exc)) from None
    fs = buckets.filesystem()
    try:
        fs.ls(name, refresh=True)
    except FileNotFoundError:
        return f"{name}: not created yet (SkyPilot creates it at the first launch)"
    except Exception as exc:  # noqa: BLE001 - botocore raises many types (auth, DNS, someone else's bucket)
        raise CheckFailed(f"{buckets.CHECKPOINT_BUCKET}={name} cannot be listed with the AWS_* credentials here "
                          f"({type(exc).__name__}: {exc}): if the bucket is someone else's, choose another name: "
                          f"{buckets.SET_CHECKPOINT_BUCKET}") from None
    return f"{name}: listed"


def check_data() -> str:
    try:
        lacking = remote_data.prepare([[]], dry_run=True)
    except (buckets.BucketNotSet, remote_data.RemoteDataError) as exc:
        raise CheckFailed(str(exc)) from None
    if lacking:
        return (f"the DVC remote lacks {len(lacking)} item(s) of HEAD's data stages: make launch and make sweep "
                "compute and push them first (now: python -m skytune.face.cloud.remote_data push)")
    return "HEAD's data stages are on the DVC remote with their run-cache: nodes restore them"


def check_model() -> str:

    try:
        params = load_params()
    except ParamsError:
        raise CheckFailed("params.yaml does not load (see params above)") from None
    base, revision = params.model.base, params.model.revision
    if base.startswith(BUILTIN_PREFIX) or Path(base).is_dir():
        return f"{base}: built or read locally, no hub access needed"
    try:
        commit = resolve_model(base, revision)
    except SkytuneError as exc:
        raise CheckFailed(f"{exc} (the node reads it with the HF_TOKEN secret you pass at launch)") from None
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:  # model_info answers for a gated model without access; the files do not
        auth_check(base)
    except GatedRepoError:
        token = "has no access" if os.environ.get("HF_TOKEN") else "is not set"
        raise CheckFailed(f"{base} is gated and HF_TOKEN {token}: request access on its hub page, then pass "
                          "--secret HF_TOKEN") from None
    except HfHubHTTPError as exc:
        raise CheckFailed(f"{base}: its files cannot be read with HF_TOKEN: {exc}") from None
    return f"{base}@{revision or 'main'} readable: commit {commit}"


def check_git(remote: str) -> str:
    """HEAD is on the remote (skytune.face.cloud.jobs), and the credentials a node has (GIT_TOKEN over https, through
    sky/git-askpass.sh as on the node) may push there: `git push --dry-run` authenticates without writing."""
    try:
        source = jobs.pushed_commit(remote)
    except jobs.JobError as exc:
        raise CheckFailed(str(exc)) from None
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    if os.environ.get("GIT_TOKEN"):
        env["GIT_ASKPASS"] = str(Path("sky/git-askpass.sh").resolve())
    probe = "refs/heads/skytune-preflight-probe"
    done = commands.run(["git", "-c", "credential.helper=", "push", "--dry-run", source.url, f"HEAD:{probe}"],
                        timeout=60, env=env, error=None)
    if done.returncode != 0:
        token = "GIT_TOKEN" if os.environ.get("GIT_TOKEN") else "no GIT_TOKEN"
        raise CheckFailed(f"cannot push to {source.url} with {token}: {done.stderr.strip()[-400:]} (the node pushes "
                          "the experiment there: a token with write access to it, passed with --secret GIT_TOKEN)")
    return f"HEAD {source.commit[:12]} is on {source.url}; pushing there is allowed"


def run(checks: list[tuple[str, Callable[[], str]]]) -> int:
    failed = 0
    for name, check in checks:
        try:
            print(f"ok    {name:11s} {check()}")
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL  {name:11s} {exc}")
    print(f"preflight: {len(checks) - failed}/{len(checks)} passed" + ("" if not failed else "; fix the above first"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.face.cloud.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--remote", default="origin", help="the git remote experiments are pushed to")
    parser.add_argument("--sky", type=Path, default=SKY)
    parser.add_argument("--no-sky-check", action="store_true", help="only check SkyPilot is installed")
    args = parser.parse_args(argv)
    return run([
        ("params", check_params),
        ("launcher", lambda: check_launcher(args.sky, not args.no_sky_check)),
        ("bucket", check_bucket),
        ("checkpoints", check_checkpoints),
        ("data", check_data),
        ("model", check_model),
        ("git", lambda: check_git(args.remote)),
    ])


if __name__ == "__main__":
    with reported():
        sys.exit(main())
