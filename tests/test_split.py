"""split: dedup (exact and normalized), per-source val fractions, stability, and the leakage check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_stages, write_params

from skytune.core.atomic import read_jsonl, write_jsonl
from skytune.core.data.records import content_hash
from skytune.core.errors import SkytuneError
from skytune.core.params import load_params
from skytune.stages import split


def record(source: str, q: str, a: str) -> dict:
    body = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    return {"id": content_hash(body), "source": source, **body}


def run_split(root: Path, chats: dict[str, list[dict]], **split_params: object) -> dict:
    paths = load_params(write_params(root, lambda params: params["split"].update(split_params))).paths
    for name, rows in chats.items():
        write_jsonl(root / paths.chat_dir / f"{name}.jsonl", rows)
    run_stages(root, split)
    return json.loads((root / paths.split_dir / "summary.json").read_text())


def test_dedup_exact_and_normalized_and_same_prompt_same_side(tmp_path: Path) -> None:
    rows = [record("a", f"What is {i}?", f"It is {i}.") for i in range(300)]
    rows += [rows[0], record("a", "what is 1", "it is 1"), record("a", "WHAT IS 2 ?!", "It is 2")]
    rows += [record("a", f"What is {i}?", f"Maybe {i}.") for i in range(300)]  # same prompts, other answers
    summary = run_split(tmp_path, {"a": rows}, val_fraction=0.3)
    assert summary["a"]["exact_duplicates"] == 1 and summary["a"]["normalized_duplicates"] == 2
    train = read_jsonl(tmp_path / "data/split/train/a.jsonl")
    val = read_jsonl(tmp_path / "data/split/val/a.jsonl")
    assert len(train) + len(val) == 600 and 0.2 < len(val) / 600 < 0.4
    train_prompts = {r["messages"][0]["content"] for r in train}
    assert not train_prompts & {r["messages"][0]["content"] for r in val}  # a prompt never straddles the split


def test_adding_rows_never_moves_existing_rows(tmp_path: Path) -> None:
    rows = [record("a", f"q{i}", f"a{i}") for i in range(400)]
    run_split(tmp_path / "one", {"a": rows[:200]}, val_fraction=0.25)
    run_split(tmp_path / "two", {"a": rows}, val_fraction=0.25)
    for part in ("train", "val"):
        before = {r["id"] for r in read_jsonl(tmp_path / "one/data/split" / part / "a.jsonl")}
        after = {r["id"] for r in read_jsonl(tmp_path / "two/data/split" / part / "a.jsonl")}
        assert before <= after


def test_leakage_across_sources_fails_the_stage(tmp_path: Path) -> None:
    shared = [record("a", f"shared question {i}", "x") for i in range(50)]
    other = [record("b", f"shared question {i}", "a different answer") for i in range(50)]
    with pytest.raises(SkytuneError, match=r"val prompts also appear in train.*\('a', 'b'\)"):
        run_split(tmp_path, {"a": shared, "b": other}, val_fraction=0.5, val_fraction_by_source={"b": 0.0})
