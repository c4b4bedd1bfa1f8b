"""The programs the user's face runs (git, DVC, SkyPilot), and the one way it runs them.

Every short command goes through `run()`: output captured, DVC's analytics off, and a failure said as one
`SkytuneError` (or the caller's subclass) that names the command, where it ran and the tail of its output. A
caller that wants the exit status itself (a probe such as `git merge-base --is-ancestor`) passes `error=None`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from skytune.core.errors import SkytuneError

# The SkyPilot CLI: make exports SKY (the launcher environment of `make launcher`); else `sky` on PATH.
SKY = Path(os.environ.get("SKY") or "sky")
DVC = (sys.executable, "-m", "dvc")
TAIL_CHARS = 2000


def shown(argv: Sequence[str]) -> str:
    """`argv` as a user would type it (DVC as `dvc`, arguments with spaces quoted)."""
    words = ["dvc", *argv[len(DVC):]] if tuple(argv[:len(DVC)]) == DVC else list(argv)
    return " ".join(f"'{w}'" if " " in w else w for w in words)


def run(argv: Sequence[str | Path], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
        timeout: float | None = None, capture: bool = True,
        error: type[SkytuneError] | None = SkytuneError) -> subprocess.CompletedProcess[str]:
    """Run `argv` to its end. A non-zero exit raises `error` naming the command, `cwd` and the tail of its output;
    `error=None` leaves the exit status to the caller. `capture=False` lets the output through to the terminal (a
    launch the user watches)."""
    words = [str(a) for a in argv]
    done = subprocess.run(words, cwd=cwd, capture_output=capture, text=True, timeout=timeout, check=False,
                          env={**(os.environ if env is None else env), "DVC_NO_ANALYTICS": "1"})
    if error is not None and done.returncode != 0:
        output = ((done.stdout or "") + (done.stderr or "")).strip()[-TAIL_CHARS:]
        where = f" in {cwd}" if cwd else ""
        raise error(f"`{shown(words)}` failed{where} (exit {done.returncode})" + (f":\n{output}" if output else ""))
    return done


def dvc(*args: str, cwd: Path | None = None, error: type[SkytuneError] = SkytuneError) -> str:
    """`dvc <args>` in this environment: its stdout."""
    return run([*DVC, *args], cwd=cwd, error=error).stdout


def git(*args: str, cwd: Path | None = None, error: type[SkytuneError] = SkytuneError) -> str:
    """`git <args>`: its stdout, stripped."""
    return run(["git", *args], cwd=cwd, error=error).stdout.strip()
