"""Canonical records: content hashes, the keys used for dedup and splitting, and the seeded order.

A record is a conversation `{"id", "source", "messages"}`, a preference pair `{"id", "source", "prompt", "chosen",
"rejected"}`, or a completion labelled undesirable `{"id", "source", "prompt", "completion", "label": false}` (the
last two kept apart for a later preference stage, never trained on by SFT).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

import numpy as np
import orjson

REJECTS_FILE = "rejects.jsonl"  # inside a stage's output directory: every row it could not use, and why
SUMMARY_FILE = "summary.json"  # a data stage's counts, beside its outputs

_EDGE = " \t\n\r.!?,;:"  # stripped from both ends: the punctuation that ends a sentence, not what is in it


def content_hash(messages: Any) -> str:
    """A stable hash of content (roles and texts only), used as a record's id."""
    return hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def normalize(text: str) -> str:
    """Text as a reader compares it: Unicode NFKC, case-folded, whitespace collapsed, sentence punctuation at
    the ends dropped. Punctuation inside stays: "12+3" and "123" must not be the same question."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split()).strip(_EDGE)


def _turns(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt turns, answer turns) of a conversation, a preference pair or a labelled completion."""
    if "completion" in record:
        return record["prompt"], record["completion"]
    if "prompt" in record:
        return record["prompt"], [{"role": "chosen", "content": json.dumps(record["chosen"])},
                                  {"role": "rejected", "content": json.dumps(record["rejected"])}]
    return record["messages"][:-1], record["messages"][-1:]


def _compared(message: dict[str, Any]) -> str:
    """A message as dedup compares it: role and normalized text, and its trace, calls and call id verbatim."""
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    text = f"{message['role']}\x1f{normalize(message['content'])}"
    return text + "\x1f" + orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else text


def dedup_keys(record: dict[str, Any]) -> tuple[int, int]:
    """(prompt key, normalized key): 64-bit keys of the normalized prompt (records that ask the same thing share
    it; the tools they may call are part of the prompt) and of the whole normalized record (near-identical
    duplicates share it). Normalizes each text once."""
    prompt, answer = _turns(record)
    head = "\x1e".join(map(_compared, prompt))
    if record.get("tools"):
        head += "\x1c" + orjson.dumps(record["tools"], option=orjson.OPT_SORT_KEYS).decode()
    tail = "\x1e".join(map(_compared, answer))
    return _key(head), _key(head + "\x1d" + tail)


def is_val(key: int, val_fraction: float, seed: int) -> bool:
    """Whether a prompt key goes to val: decided by the key alone, salted by the seed.

    Adding rows never moves existing rows between train and val, and the same prompt always lands on one side.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def order_key(seed: int, *parts: object) -> int:
    """A seeded 64-bit sort key: sorting by it is a shuffle that depends on content and seed only."""
    return _key(f"{seed}:" + ":".join(map(str, parts)))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """A seeded 64-bit hash of each uint64 in `values` (splitmix64's finalizer), vectorized: sorting by it is a
    shuffle that depends on the values and the salt only, the same on every platform."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + _GOLDEN * np.uint64(order_key(salt, "mix64") | 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
