"""S3-compatible buckets (AWS S3, OCI Object Storage, MinIO, rclone) through s3fs, the filesystem dvc-s3 uses.

    python -m skytune.face.cloud.buckets publish [--source models/merged] s3://<bucket>/<path>     (make publish-model)

`publish` copies an exported model to the bucket sky/serve.yaml mounts, then checks every object's size against
the local file. The endpoint comes from AWS_ENDPOINT_URL (empty: AWS), the credentials from the AWS_* variables.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from skytune.core.errors import SkytuneError, reported
from skytune.core.params import load_params
from skytune.face.cloud import jobs

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
    up.add_argument("url", help="s3://<bucket>/<path>")
    up.add_argument("--source", type=Path, help="the model directory (default: paths.merged_dir)")
    args = parser.parse_args(argv)
    try:
        keys = publish(args.source or Path(load_params().paths.merged_dir), args.url)
    except SkytuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - s3fs and botocore raise many types for credentials, buckets, network
        raise SkytuneError(
            f"publishing to {args.url} failed ({type(exc).__name__}: {exc}). Check that the bucket exists and that "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_ENDPOINT_URL for OCI or MinIO) may write to it; "
            "`make preflight` checks them.") from exc
    print(f"published {len(keys)} file(s) to {args.url}; serve them with:\n"
          f"  {jobs.SKY} serve up sky/serve.yaml -n skytune --env MODEL_URL={args.url.rstrip('/')}")
    return 0


if __name__ == "__main__":
    with reported():
        sys.exit(main())
