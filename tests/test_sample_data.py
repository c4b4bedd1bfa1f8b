"""The sample data shipped in data/raw/ is exactly what skytune.core.data.sample_data writes."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO

from skytune.core.data import sample_data


def test_shipped_sample_data_is_reproducible(tmp_path: Path) -> None:
    written = sample_data.write(tmp_path)
    assert len(written) == 2
    for path in written:
        assert path.read_bytes() == (REPO / "data" / "raw" / path.name).read_bytes(), path.name
        assert len(path.read_text().splitlines()) >= 150
