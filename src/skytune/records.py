"""Records: reading raw rows with their provenance, content hashes, and the deterministic train/val split."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REJECTS_FILE = "rejects.jsonl"  # inside a stage's output directory: every row it could not use, and why


@dataclass(frozen=True)
class RawRow:
    """One row of a raw source, with where it came from (for rejects and error messages)."""

    file: str
    line: int
    row: dict[str, Any]


@dataclass(frozen=True)
class Reject:
    file: str
    line: int
    field: str
    reason: str

    def as_dict(self, source: str) -> dict[str, Any]:
        return {"source": source, "file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


def read_jsonl_source(path: Path) -> Iterator[RawRow | Reject]:
    """Yield each line of a raw JSONL file as a RawRow, or a Reject for a line that is not a JSON object.

    Bytes are decoded per line, so one bad line costs that line only.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Reject(str(path), number, "<line>", f"not valid UTF-8 at byte {exc.start}")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Reject(str(path), number, "<line>", f"not valid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(row, dict):
                yield Reject(str(path), number, "<line>", f"expected a JSON object, got {type(row).__name__}")
                continue
            yield RawRow(str(path), number, row)


def content_hash(messages: list[dict[str, str]]) -> str:
    """A stable hash of a conversation's content (roles and texts only), used as its id and for splitting."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def is_val(record_id: str, val_fraction: float, seed: int) -> bool:
    """Whether a record goes to val: decided by its content hash alone, salted by the seed.

    Adding rows to a source never moves existing rows between train and val.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def shuffled(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """A seeded shuffle of records sorted by id first, so the order depends on content and seed only."""
    ordered = sorted(records, key=lambda r: (r["id"], r["source"]))
    random.Random(seed).shuffle(ordered)
    return ordered
