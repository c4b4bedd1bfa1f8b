"""The one process runner of the face: a failing or overrunning command is one clear error, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from skytune.core.errors import SkytuneError
from skytune.face import commands


def test_a_failing_command_names_itself_its_directory_and_its_output(tmp_path: Path) -> None:
    script = "import sys; print('made some progress'); sys.exit('gave up here')"
    with pytest.raises(SkytuneError) as caught:
        commands.run([sys.executable, "-c", script], cwd=tmp_path)
    said = str(caught.value)
    assert f"in {tmp_path} (exit 1):" in said and "made some progress" in said and said.endswith("gave up here")
    assert commands.run([sys.executable, "-c", script], error=None).returncode == 1  # left to the caller


@pytest.mark.parametrize("error", [SkytuneError, None], ids=["error", "error-None"])
def test_a_command_past_its_timeout_is_stopped_with_one_clear_error(error: type[SkytuneError] | None) -> None:
    script = "import time; print('started', flush=True); time.sleep(30)"
    with pytest.raises(SkytuneError) as caught:
        commands.run([sys.executable, "-c", script], timeout=1.5, error=error)
    said = str(caught.value)
    assert "did not finish within 1.5 s, and was stopped" in said and said.endswith("started"), said
