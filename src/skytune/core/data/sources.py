"""Raw sources: local files (jsonl, json, parquet, csv; a file or a glob) and hub datasets, read as a stream of
rows that each carry where they came from, with a seeded subsample when a source asks for fewer rows.

Everything here streams: a row is read, handed on, and forgotten, so a 1M-row source never sits in memory.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skytune.core import hub
from skytune.core.errors import SkytuneError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PARQUET_BATCH = 8192


@dataclass(frozen=True)
class RawRow:
    """One row of a raw source and where it came from (for rejects and error messages)."""

    file: str
    line: int
    row: dict[str, Any]


@dataclass(frozen=True)
class Reject:
    """A row that could not be used, with the field at fault and why."""

    file: str
    line: int
    field: str
    reason: str  # a fixed phrase, so that rejects group by reason in the metrics
    detail: str = ""  # what varies: a byte offset, a parser message

    def as_dict(self, source: str) -> dict[str, Any]:
        return {"source": source, "file": self.file, "line": self.line, "field": self.field, "reason": self.reason,
                "detail": self.detail}


class SourceError(SkytuneError):
    """A source that cannot be read at all (missing, offline, unknown type): names the source and what to do."""


def expand(raw_dir: Path, pattern: str, source: str) -> list[Path]:
    """The files a source's `path` names: one file or a glob, relative to `raw_dir`, always sorted."""
    full = raw_dir / pattern
    files = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
    if not files:
        raise SourceError(f"source {source!r}: no file matches {full}; check data.sources[].path in params.yaml")
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise SourceError(f"source {source!r}: {f} has an unknown type; use one of {', '.join(SUFFIXES)}")
    return files


def read_file(path: Path) -> Iterator[RawRow | Reject]:
    """Every row of one local file, by its type. Line numbers are 1-based lines (jsonl, csv: the data row after
    the header) or row indices (json array, parquet)."""
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "json":
        yield from _read_json(path)
    elif kind == "csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[RawRow | Reject]:
    import orjson

    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as uexc:
                    yield Reject(str(path), number, "<line>", "not valid UTF-8", f"at byte {uexc.start}")
                    continue
                yield Reject(str(path), number, "<line>", "not valid JSON", str(exc))
                continue
            if not isinstance(row, dict):
                yield Reject(str(path), number, "<line>", f"expected a JSON object, got {type(row).__name__}")
                continue
            yield RawRow(str(path), number, row)


def _read_json(path: Path) -> Iterator[RawRow | Reject]:
    """A JSON array of objects (or {"data": [...]}, as some hub exports have). Read whole: JSON arrays do not
    stream; use JSONL for large sources."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc}); a large source should be JSONL, one object a line") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for index, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield RawRow(str(path), index, row)
        else:
            yield Reject(str(path), index, "<row>", f"expected a JSON object, got {type(row).__name__}")


def _read_csv(path: Path) -> Iterator[RawRow | Reject]:
    import csv

    with open(path, encoding="utf-8-sig", errors="strict", newline="") as fh:  # -sig: Excel writes a BOM
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                line = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    yield Reject(str(path), line, "<row>", f"expected {len(reader.fieldnames or [])} columns")
                    continue
                yield RawRow(str(path), line, dict(row))
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path}: not valid UTF-8 near line {reader.line_num + 1} ({exc.reason}); "
                              "re-encode the file as UTF-8") from exc


def _read_parquet(path: Path) -> Iterator[RawRow | Reject]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise SourceError(f"{path}: not a readable parquet file ({exc})") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            index += 1
            yield RawRow(str(path), index, row)


def read_hub(repo_id: str, *, config: str | None, split: str, revision: str | None) -> tuple[str, Iterator[RawRow]]:
    """A hub dataset's split, streamed from the local `datasets` cache or the hub; returns the commit it
    resolved to and the rows. Offline, it must already be cached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    offline = hub.offline()
    try:
        commit = revision if offline and revision else HfApi().dataset_info(repo_id, revision=revision).sha
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        raise SourceError(
            f"hub dataset {repo_id!r} (revision {revision!r}) could not be resolved: {exc}. Check the name and "
            "revision; for a gated dataset set HF_TOKEN; offline (HF_HUB_OFFLINE=1), pin `revision` to a commit "
            "that is in the local cache."
        ) from exc
    import datasets

    try:
        stream = datasets.load_dataset(repo_id, config, split=split, revision=commit, streaming=not offline)
    except Exception as exc:  # datasets raises many types for missing configs, splits and connections
        raise SourceError(f"hub dataset {repo_id!r} config {config!r} split {split!r} @ {commit}: {exc}") from exc
    where = f"hub:{repo_id}@{commit}/{split}"
    return commit, (RawRow(where, i, dict(row)) for i, row in enumerate(stream, start=1))


def subsample(rows: Iterable[RawRow | Reject], max_samples: int | None, seed: int) -> Iterator[RawRow | Reject]:
    """At most `max_samples` rows, chosen by a seeded hash of their provenance, in their original order.

    Streams with a heap of `max_samples` entries; rejects always pass through so they stay counted.
    """
    if max_samples is None:
        yield from rows
        return
    keep: list[tuple[int, int, RawRow]] = []  # max-heap on the hash, through negation
    order = 0
    for item in rows:
        if isinstance(item, Reject):
            yield item
            continue
        digest = hashlib.blake2b(f"{seed}:{item.file}:{item.line}".encode(), digest_size=8).digest()
        key = -int.from_bytes(digest, "big")
        order += 1
        if len(keep) < max_samples:
            heapq.heappush(keep, (key, order, item))
        elif key > keep[0][0]:
            heapq.heapreplace(keep, (key, order, item))
    for _key, _order, item in sorted(keep, key=lambda entry: entry[1]):
        yield item
