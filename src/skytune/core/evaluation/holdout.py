"""The project's own benchmark items and probes in two halves, split by a seeded hash of their text: `dev`, which a
recipe may be tuned on, and `heldout`, which the README and the metrics report. A recipe tuned on the numbers that
report it flatters itself; one tuned on the dev half is judged on items it never saw. The split is a fixed function
of the text (SHA-256 with SALT), so it is the same for every experiment, seed and machine, and adding an item moves
no other."""

from __future__ import annotations

import hashlib
from typing import Literal

SALT = "skytune-holdout-1"
DEV, HELDOUT = "dev", "heldout"
Half = Literal["dev", "heldout"]


def half(text: str) -> Half:
    """The half an item belongs to, from its text (a question, a prompt)."""
    return DEV if hashlib.sha256(f"{SALT}\n{text.strip()}".encode()).digest()[0] % 2 == 0 else HELDOUT
