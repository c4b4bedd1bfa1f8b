"""S3-compatible buckets (AWS S3, OCI Object Storage, MinIO, rclone) through s3fs, the filesystem dvc-s3 uses.

    python -m skytune.face.cloud.buckets publish [--source models/merged] s3://<bucket>/<path>     (make publish-model)

`publish` copies an exported model to the bucket sky/serve.yaml mounts, then checks every object's size against
the local file. The endpoint comes from AWS_ENDPOINT_URL (empty: AWS), the credentials from the AWS_* variables.

Bucket names are global, so the project names none: the DVC remote (committed in .dvc/config, so nodes see it),
the checkpoint bucket ($CHECKPOINT_BUCKET, passed to the training YAMLs at launch) and the model's URL are the
user's own. `dvc_remote` and `checkpoint_bucket` refuse with the exact command that sets each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from skytune.core.errors import SkytuneError, reported
from skytune.core.params import load_params
from skytune.face.commands import SKY

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
DVC_DIR = Path(".dvc")  # DVC's own directory: config (committed), config.local, cache
CHECKPOINT_BUCKET = "CHECKPOINT_BUCKET"  # the env sky/train*.yaml mount checkpoints from (required there)
SET_CHECKPOINT_BUCKET = f"export {CHECKPOINT_BUCKET}=<a bucket you own, e.g. skytune-checkpoints-$USER>"
SET_DVC_REMOTE = ("dvc remote add -d storage s3://<a bucket you own>/skytune && "
                  "git commit -m 'DVC remote' .dvc/config && git push")
SET_MODEL_URL = "make publish-model MODEL_URL=s3://<a bucket you own>/<experiment>/merged"
CHECKSUMS = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}


def filesystem(endpoint: str | None = None, region: str | None = None) -> Any:
    """An s3fs filesystem on `endpoint` (default: $AWS_ENDPOINT_URL, else AWS) in `region` (default:
    $DVC_REMOTE_REGION; OCI signs per region), with the checksum settings that S3-compatible stores accept (boto3 >=
    1.36 sends checksums OCI and rclone refuse)."""
    from s3fs import S3FileSystem

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    region = region or os.environ.get("DVC_REMOTE_REGION") or None
    client = {"endpoint_url": endpoint} if endpoint else {}
    if region:
        client["region_name"] = region
    return S3FileSystem(client_kwargs=client, config_kwargs=CHECKSUMS)


class BucketNotSet(SkytuneError):
    """A bucket the user must choose is not set; the message gives the command that sets it."""


def checkpoint_bucket(environ: Mapping[str, str] | None = None) -> str:
    """$CHECKPOINT_BUCKET, the bucket the training YAMLs mount for checkpoints (SkyPilot creates it if missing)."""
    name = (os.environ if environ is None else environ).get(CHECKPOINT_BUCKET, "").strip()
    if not name:
        raise BucketNotSet(f"{CHECKPOINT_BUCKET} is not set: the training jobs keep their checkpoints in a bucket of "
                           f"yours (bucket names are global; the project names none). Set it: "
                           f"{SET_CHECKPOINT_BUCKET}")
    if not _BUCKET_NAME.fullmatch(name):
        raise BucketNotSet(f"{CHECKPOINT_BUCKET}={name!r} is not a bucket name (3-63 lowercase letters, digits, dots "
                           f"and hyphens; no s3:// prefix): {SET_CHECKPOINT_BUCKET}")
    return name


def dvc_remote(root: Path = Path(".")) -> tuple[str, str]:
    """(name, URL) of the default DVC remote as committed in .dvc/config: what a node, which clones the commit, will
    push to. A remote set only in .dvc/config.local or nowhere is refused."""
    from dvc.config import Config

    config = Config(dvc_dir=str(root / DVC_DIR), validate=False).read("repo")
    name = config.get("core", {}).get("remote")
    url = config.get("remote", {}).get(name, {}).get("url") if name else None
    if not name or not url:
        raise BucketNotSet(f"{root / DVC_DIR / 'config'}: no default DVC remote. Every experiment's data and models "
                           f"go to a bucket of yours (the project names none). Set it: {SET_DVC_REMOTE}")
    return name, url


def publish(source: Path, url: str, fs: Any = None) -> list[str]:
    """Upload every file under `source` to `url` (s3://bucket/path); return the object keys, each verified."""
    if not url.startswith("s3://") or len(url.removeprefix("s3://").strip("/").split("/")) < 2:
        raise SkytuneError(f"{url!r}: expected s3://<bucket>/<path> (sky/serve.yaml's MODEL_URL)")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise SkytuneError(f"{source}: no files to publish (run the pipeline's export stage first)")
    fs = fs or filesystem()
    target = url.removeprefix("s3://").rstrip("/")
    keys = []
    for path in files:
        key = f"{target}/{path.relative_to(source).as_posix()}"
        fs.put_file(str(path), key)
        keys.append(key)
    fs.invalidate_cache()
    for path, key in zip(files, keys, strict=True):
        size = fs.info(key)["size"]
        if size != path.stat().st_size:
            raise OSError(f"s3://{key}: {size} bytes in the bucket, {path.stat().st_size} here")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skytune.face.cloud.buckets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("publish", help="copy an exported model to a bucket for sky/serve.yaml")
    up.add_argument("url", nargs="?", default="", help="s3://<bucket>/<path>")
    up.add_argument("--source", type=Path, help="the model directory (default: paths.merged_dir)")
    args = parser.parse_args(argv)
    if not args.url:
        raise BucketNotSet(f"no MODEL_URL: the model goes to a bucket of yours (the project names none): "
                           f"{SET_MODEL_URL}")
    try:
        keys = publish(args.source or Path(load_params().paths.merged_dir), args.url)
    except SkytuneError:
        raise
    except Exception as exc:
        raise SkytuneError(
            f"publishing to {args.url} failed ({type(exc).__name__}: {exc}). Check that the bucket exists and that "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_ENDPOINT_URL for OCI or MinIO) may write to it; "
            "`make preflight` checks them.") from exc
    print(f"published {len(keys)} file(s) to {args.url}; serve them with:\n"
          f"  {SKY} serve up sky/serve.yaml -n skytune --env MODEL_URL={args.url.rstrip('/')}")
    return 0


if __name__ == "__main__":
    with reported():
        sys.exit(main())
