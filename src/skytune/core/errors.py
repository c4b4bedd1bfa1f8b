"""Expected failures: an error a user can fix, said as one message (what failed, where, what to do).

Stages and the command-line tools run under `reported()`, which prints such an error as one message and exits
non-zero, without a Python traceback; SKYTUNE_DEBUG=1 (or `base.log_level: DEBUG` in a stage) shows the traceback
too. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "SKYTUNE_DEBUG"


class SkytuneError(Exception):
    """A failure the user can fix from its message alone: bad params or data, a failed gate, a model that cannot be
    found or read, a missing credential. `exit_code` is what the process exits with. It is no `ValueError`, so no
    `except ValueError` meant for a parse swallows it."""

    exit_code = 1


def debugging() -> bool:
    """Whether SKYTUNE_DEBUG asks for tracebacks of expected failures too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def reported(*, debug: bool = False, quiet: bool = False) -> Iterator[None]:
    """Turn a `SkytuneError` into `error: <message>` on stderr and SystemExit(exit_code); re-raise it as is when
    `debug` or SKYTUNE_DEBUG is set. `quiet` exits without printing (the other processes of a distributed run,
    whose rank 0 says it once)."""
    try:
        yield
    except SkytuneError as exc:
        if debug or debugging():
            raise
        if not quiet:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
