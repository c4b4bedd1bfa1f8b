"""Raw rows with provenance, content hashes and the content-hash split."""

from __future__ import annotations

from pathlib import Path

from skytune.records import RawRow, Reject, content_hash, is_val, read_jsonl_source, shuffled


def test_read_jsonl_source_rejects_bad_lines_and_keeps_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n\n[1, 2]\n\xff\xfe{"a": 2}\n{"a": 3}\n')
    items = list(read_jsonl_source(path))
    rows = [i for i in items if isinstance(i, RawRow)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert [(r.line, r.row) for r in rows] == [(1, {"a": 1}), (6, {"a": 3})]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (2, "not valid JSON"), (4, "expected a JSON object, got list"), (5, "not valid UTF-8 at byte 0")]


def test_content_hash_depends_on_roles_and_text_only() -> None:
    a = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    b = [{"content": "q", "role": "user"}, {"role": "assistant", "content": "a"}]
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash([{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}])


def test_split_is_stable_when_rows_are_added() -> None:
    ids = [content_hash([{"role": "user", "content": str(i)}]) for i in range(2000)]
    before = {i: is_val(i, 0.2, seed=7) for i in ids[:1000]}
    after = {i: is_val(i, 0.2, seed=7) for i in ids}
    assert all(after[i] == v for i, v in before.items())
    assert 0.15 < sum(after.values()) / len(after) < 0.25
    assert {i: is_val(i, 0.2, seed=8) for i in ids} != after  # the seed salts the split


def test_shuffled_ignores_input_order() -> None:
    records = [{"id": f"{i:03d}", "source": "s"} for i in range(50)]
    assert shuffled(records, 1) == shuffled(list(reversed(records)), 1)
    assert shuffled(records, 1) != shuffled(records, 2)
