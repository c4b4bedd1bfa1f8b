"""Canonical records: content hashes, the keys used for dedup and splitting, and the seeded order.

A record is either a conversation `{"id", "source", "messages"}` or a preference pair
`{"id", "source", "prompt", "chosen", "rejected"}` (kept for a later DPO stage).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

REJECTS_FILE = "rejects.jsonl"  # inside a stage's output directory: every row it could not use, and why

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def content_hash(messages: Any) -> str:
    """A stable hash of content (roles and texts only), used as a record's id."""
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def normalize(text: str) -> str:
    """Text as a reader compares it: Unicode NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    return _SPACE.sub(" ", _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold())).strip()


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """What the model is asked: the preference prompt, or every turn before the last assistant turn."""
    return record["prompt"] if "prompt" in record else record["messages"][:-1]


def prompt_key(record: dict[str, Any]) -> int:
    """A 64-bit key of the normalized prompt: records that ask the same thing share it."""
    return _key("\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in prompt_messages(record)))


def normalized_key(record: dict[str, Any]) -> int:
    """A 64-bit key of the whole normalized record: near-identical duplicates share it."""
    turns = record["messages"] if "messages" in record else (
        record["prompt"] + [{"role": "chosen", "content": json.dumps(record["chosen"])},
                            {"role": "rejected", "content": json.dumps(record["rejected"])}])
    return _key("\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in turns))


def is_val(key: int, val_fraction: float, seed: int) -> bool:
    """Whether a prompt key goes to val: decided by the key alone, salted by the seed.

    Adding rows never moves existing rows between train and val, and the same prompt always lands on one side.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def order_key(seed: int, *parts: object) -> int:
    """A seeded 64-bit sort key: sorting by it is a shuffle that depends on content and seed only."""
    return _key(f"{seed}:" + ":".join(map(str, parts)))
