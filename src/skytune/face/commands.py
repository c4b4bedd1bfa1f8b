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
    `error=None` leaves the exit status to the caller. A command still running after `timeout` seconds is killed and
    raises `error` (SkytuneError with `error=None`) the same way. `capture=False` lets the output through to the
    terminal (a launch the user watches)."""
    words = [str(a) for a in argv]
    where = f" in {cwd}" if cwd else ""
    try:
        done = subprocess.run(words, cwd=cwd, capture_output=capture, text=True, timeout=timeout, check=False,
                              env={**(os.environ if env is None else env), "DVC_NO_ANALYTICS": "1"})
    except subprocess.TimeoutExpired as late:
        raise (error or SkytuneError)(f"`{shown(words)}` did not finish within {timeout:g} s{where}, and was stopped"
                                      + _tail(late.stdout, late.stderr)) from None
    if error is not None and done.returncode != 0:
        raise error(f"`{shown(words)}` failed{where} (exit {done.returncode})" + _tail(done.stdout, done.stderr))
    return done


def _tail(stdout: str | bytes | None, stderr: str | bytes | None) -> str:
    """The last TAIL_CHARS of a command's output, after a colon and a new line; nothing for none."""
    text = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o for o in (stdout, stderr) if o)
    output = text.strip()[-TAIL_CHARS:]
    return f":\n{output}" if output else ""


def dvc(*args: str, cwd: Path | None = None, error: type[SkytuneError] = SkytuneError) -> str:
    """`dvc <args>` in this environment: its stdout."""
    return run([*DVC, *args], cwd=cwd, error=error).stdout


def git(*args: str, cwd: Path | None = None, error: type[SkytuneError] = SkytuneError) -> str:
    """`git <args>`: its stdout, stripped."""
    return run(["git", *args], cwd=cwd, error=error).stdout.strip()
