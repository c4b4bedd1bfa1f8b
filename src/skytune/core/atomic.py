"""Files: atomic writes (a killed stage never leaves a half-written output that looks complete), JSON lines, and
a file's sha256.

Every file or directory is written under a temporary name beside its target and renamed into place; a rename
within one filesystem is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block exits without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output should look like any other directory
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path | str, mode: str = "w") -> Iterator[Any]:
    """Yield an open file whose content replaces `target` when the block exits without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as fh:
            yield fh
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(target: Path | str, data: Any) -> None:
    """Write `data` as stable, sorted, indented JSON, atomically."""
    with atomic_file(target) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def dumps_line(record: dict[str, Any]) -> bytes:
    """One JSONL line: UTF-8, the record's own keys sorted (a record starts with its `id`) and nested objects in
    the order they were built or read, so the bytes depend on content only. Nested order is the data's: a tool
    call's arguments and a function schema's properties keep the order their author wrote, which is the order a
    model trained on them learns to write. Values JSON cannot hold (bytes, decimals from parquet) are written as
    strings."""
    import orjson  # here, not at the top: vLLM's environment (make serve) imports this module without orjson

    return orjson.dumps(dict(sorted(record.items())), option=orjson.OPT_APPEND_NEWLINE, default=str)


def write_jsonl(target: Path | str, records: Iterable[dict[str, Any] | bytes]) -> int:
    """Stream records (or lines already made by `dumps_line`) to a JSONL file, atomically; return the count."""
    n = 0
    with atomic_file(target, "wb") as fh:
        for record in records:
            fh.write(record if isinstance(record, bytes) else dumps_line(record))
            n += 1
    return n


def iter_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Stream a JSONL file written by this project (trusted: raw user files go through `sources`)."""
    import orjson

    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """A whole JSONL file written by this project, for small files (metrics, prompts, val records)."""
    return list(iter_jsonl(path))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
