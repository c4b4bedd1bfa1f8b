"""Reading raw sources: file types, globs, subsampling, hub errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skytune.core.data import sources
from skytune.core.data.sources import RawRow, Reject, SourceError


def rows(items) -> list[tuple[int, dict]]:
    return [(i.line, i.row) for i in items if isinstance(i, RawRow)]


def test_jsonl_json_csv_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [{"instruction": "a", "output": "b"}, {"instruction": "ç", "output": "👍"}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in data) + "\n\n")
    (tmp_path / "x.json").write_text(json.dumps({"data": data}))
    (tmp_path / "x.csv").write_text("instruction,output\na,b\nç,👍\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "x.parquet")
    for name, first_line in (("x.jsonl", 1), ("x.json", 1), ("x.csv", 2), ("x.parquet", 1)):
        got = rows(sources.read_file(tmp_path / name))
        assert [r for _, r in got] == data, name
        assert got[0][0] == first_line, name


def test_json_that_is_not_an_array_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"rows": 3}')
    with pytest.raises(SourceError, match="bad.json: expected a JSON array of objects"):
        list(sources.read_file(tmp_path / "bad.json"))


def test_globs_are_sorted_and_unknown_types_rejected(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.jsonl"):
        (tmp_path / "part").mkdir(exist_ok=True)
        (tmp_path / "part" / name).write_text("{}\n")
    assert [p.name for p in sources.expand(tmp_path, "part/*.jsonl", "s")] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    (tmp_path / "part" / "d.txt").write_text("x")
    with pytest.raises(SourceError, match="d.txt has an unknown type"):
        sources.expand(tmp_path, "part/*", "s")


def test_subsample_is_seeded_keeps_order_and_passes_rejects() -> None:
    items = [RawRow("f", i, {"i": i}) for i in range(1, 1001)] + [Reject("f", 1001, "<line>", "bad")]
    a = list(sources.subsample(items, 100, seed=1))
    b = list(sources.subsample(items, 100, seed=1))
    c = list(sources.subsample(items, 100, seed=2))
    kept = [i for i in a if isinstance(i, RawRow)]
    assert a == b and a != c
    assert len(kept) == 100 and [i.line for i in kept] == sorted(i.line for i in kept)
    assert sum(isinstance(i, Reject) for i in a) == 1
    assert list(sources.subsample(items, None, seed=1)) == items


def test_hub_dataset_offline_and_uncached_names_the_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SourceError, match="hub dataset 'org/absent'"):
        commit, stream = sources.read_hub("org/absent", config=None, split="train", revision="main")
        list(stream)
