"""The bad-input corpus (tests/assets/bad_inputs): every bad row is a clear error naming file, line and field,
or a counted reject, and no valid row is lost on the way from ingest to merge_data."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO, run_stages, write_params

from skytune.core.atomic import read_jsonl
from skytune.core.data.sources import SourceError
from skytune.core.errors import SkytuneError
from skytune.stages import ingest, merge_data, self_replay, split, to_chat

ASSETS = REPO / "tests" / "assets" / "bad_inputs"
TINY = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "max_position_embeddings": 512}


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    shutil.copytree(ASSETS, tmp_path / "data" / "raw")
    with contextlib.chdir(tmp_path):
        yield tmp_path


def configure(root: Path, sources: list[dict], **data: object) -> None:
    def edit(params: dict) -> None:
        params["data"].update({"sources": sources, "on_invalid": "skip", "max_reject_fraction": 1.0} | data)
        params["identity"]["enabled"] = False
        params["model"]["builtin"] = TINY
        # The shipped mixture, less the sources these tests do not have; its identity entry stays, with identity off.
        names = {source["name"] for source in sources} | {"identity"}
        params["merge_data"]["mixture"] = {k: v for k, v in params["merge_data"]["mixture"].items() if k in names}

    write_params(root, edit)


def run(*stages: ModuleType) -> None:
    run_stages(Path.cwd(), *stages)


def huge_record(root: Path) -> None:
    """A 10 MB record (valid JSON, valid conversation) beside a valid small one: made here, not committed."""
    rows = [{"instruction": "Say 50.", "input": "", "output": "50."},
            {"instruction": "Repeat: " + "word " * 2_000_000, "input": "", "output": "done"}]
    (root / "data" / "raw" / "huge.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


SOURCES = [
    {"name": "truncated", "path": "truncated_line.jsonl", "format": "alpaca"},
    {"name": "wrong_types", "path": "wrong_types.jsonl", "format": "alpaca"},
    {"name": "csv", "path": "missing_columns.csv", "format": "alpaca"},
    {"name": "latin1", "path": "non_utf8.jsonl", "format": "alpaca"},
    {"name": "roles", "path": "roles_out_of_order.jsonl", "format": "messages"},
    {"name": "huge", "path": "huge.jsonl", "format": "alpaca"},
]
VALID_PROMPTS = {"Say 1.", "Say 3.", "Say 10.", "Say 13.", "Say 20.", "Say 23.", "Say 30.", "Say 32.", "Hi 40",
                 "Hi 44", "Say 50."}


def test_every_bad_row_is_counted_with_file_line_and_field_and_no_valid_row_is_lost(workspace: Path) -> None:
    huge_record(workspace)
    configure(workspace, SOURCES)
    run(ingest, self_replay, to_chat, split, merge_data)

    rejects = {(Path(r["file"]).name, r["line"], r["field"], r["reason"])
               for r in read_jsonl(workspace / "data/chat/rejects.jsonl")}
    assert rejects == {
        ("truncated_line.jsonl", 2, "<line>", "not valid JSON"),
        ("wrong_types.jsonl", 2, "instruction", "expected a string, got list"),
        ("wrong_types.jsonl", 3, "output", "expected a string, got int"),
        ("missing_columns.csv", 3, "<row>", "expected 2 columns"),
        ("missing_columns.csv", 4, "<row>", "expected 2 columns"),
        ("non_utf8.jsonl", 2, "<line>", "not valid UTF-8"),
        ("roles_out_of_order.jsonl", 2, "messages[0].role", "expected user, got assistant"),
        ("roles_out_of_order.jsonl", 3, "messages[1].role", "expected assistant, got user"),
        ("roles_out_of_order.jsonl", 4, "messages", "the last turn must be from the assistant"),
    }
    details = {r["detail"] for r in read_jsonl(workspace / "data/chat/rejects.jsonl")}
    assert "at byte 20" in details  # where in the line, kept beside the reason
    metrics = json.loads((workspace / "metrics/to_chat.json").read_text())
    assert metrics["reject_reasons"]["roles: expected user, got assistant"] == 1
    assert metrics["rejected_total"] == 9
    assert metrics["rejected"] == {"csv": 2, "latin1": 1, "roles": 3, "truncated": 1, "wrong_types": 2}

    data = json.loads((workspace / "metrics/merge_data.json").read_text())
    dropped = sum(s.get("dropped_too_long", 0) for part in ("train", "val") for s in data[part]["sources"].values())
    assert dropped == 1  # the 10 MB record: valid, but longer than train.max_length
    kept = [r for f in ("data/train.jsonl", "data/val.jsonl") for r in read_jsonl(workspace / f)]
    assert {r["messages"][0]["content"] for r in kept} == VALID_PROMPTS


def test_on_invalid_error_stops_at_the_first_bad_row_naming_it(workspace: Path) -> None:
    configure(workspace, SOURCES[1:2], on_invalid="error")
    run(ingest)
    with pytest.raises(SkytuneError, match=r"wrong_types.jsonl:2: field instruction: expected a string, got list"):
        run(to_chat)
    configure(workspace, SOURCES[:1], on_invalid="error")
    with pytest.raises(SkytuneError, match=r"truncated_line.jsonl:2: not valid JSON"):
        run(ingest)


def test_an_empty_file_is_a_clear_error(workspace: Path) -> None:
    configure(workspace, [{"name": "empty", "path": "empty.jsonl", "format": "alpaca"}])
    with pytest.raises(SourceError, match="source 'empty': empty.jsonl has no rows"):
        run(ingest)


def test_a_parquet_file_with_an_unexpected_schema(workspace: Path) -> None:
    configure(workspace, [{"name": "pq", "path": "unexpected_schema.parquet", "format": "auto"}])
    run(ingest)
    with pytest.raises(SkytuneError, match=r"format auto cannot tell .*\['bar', 'foo'\].*set format:"):
        run(to_chat)
    configure(workspace, [{"name": "pq", "path": "unexpected_schema.parquet", "format": "alpaca"}],
              max_reject_fraction=0.1)
    run(ingest)
    with pytest.raises(SkytuneError, match=r"source pq: 3 of 3 rows rejected.*unexpected_schema.parquet:1.*"
                                         r"instruction: missing"):
        run(to_chat)


def test_a_missing_file_names_the_source(workspace: Path) -> None:
    configure(workspace, [{"name": "gone", "path": "nothing_*.jsonl", "format": "alpaca"}])
    with pytest.raises(SourceError, match=r"source 'gone': no file matches .*nothing_\*\.jsonl"):
        run(ingest)


def test_every_format_flows_through_and_preference_data_is_kept_apart(workspace: Path) -> None:
    raw = workspace / "data" / "raw"
    rows = {
        "prefs.jsonl": [{"prompt": f"Pick {i}", "chosen": f"Good {i}", "rejected": f"Bad {i}"} for i in range(6)],
        "orca.jsonl": [{"system_prompt": "Be exact.", "question": f"Orca {i}?", "response": f"O{i}"} for i in range(6)],
        "pc.jsonl": [{"prompt": f"Complete {i}", "completion": f"done {i}"} for i in range(6)],
        "samsum.jsonl": [{"dialogue": f"A: hi {i}\nB: bye", "summary": f"Greetings {i}."} for i in range(6)],
        "counsel.jsonl": [{"Context": f"I feel {i}", "Response": f"I hear {i}"} for i in range(6)],
    }
    for name, data in rows.items():
        (raw / name).write_text("\n".join(json.dumps(r) for r in data) + "\n")
    configure(workspace, [
        {"name": "prefs", "path": "prefs.jsonl", "format": "auto"},
        {"name": "orca", "path": "orca.jsonl", "format": "auto"},
        {"name": "pc", "path": "pc.jsonl", "format": "auto"},
        {"name": "samsum", "path": "samsum.jsonl", "format": "summarization", "instruction": "Summarize."},
        {"name": "counsel", "path": "counsel.jsonl", "format": "columns",
         "columns": {"user": "Context", "assistant": "Response"}},
    ])
    run(ingest, self_replay, to_chat, split, merge_data)
    sft = [r for f in ("data/train.jsonl", "data/val.jsonl") for r in read_jsonl(workspace / f)]
    assert sorted({r["source"] for r in sft}) == ["counsel", "orca", "pc", "samsum"] and len(sft) == 24
    prefs = [r for f in ("train.jsonl", "val.jsonl") for r in read_jsonl(workspace / "data/preference" / f)]
    assert len(prefs) == 6 and all(r["chosen"][0]["role"] == "assistant" and "messages" not in r for r in prefs)
    samsum = next(r for r in sft if r["source"] == "samsum")
    assert samsum["messages"][0]["content"].startswith("Summarize.\n\nA: hi")


def test_unreadable_rows_count_toward_the_reject_threshold(workspace: Path) -> None:
    raw = workspace / "data" / "raw"
    (raw / "mostly_bad.jsonl").write_text('{"instruction": "Say 1.", "output": "1."}\n' + "{not json\n" * 9)
    configure(workspace, [{"name": "bad", "path": "mostly_bad.jsonl", "format": "alpaca"}], max_reject_fraction=0.5)
    run(ingest)
    with pytest.raises(SkytuneError, match=r"source bad: 9 of 10 rows rejected \(9 before conversion"):
        run(to_chat)


def test_lone_surrogates_and_a_csv_bom(workspace: Path) -> None:
    raw = workspace / "data" / "raw"
    (raw / "rows.json").write_text('[{"instruction": "ok", "output": "fine"}, {"instruction": "\\ud800", '
                                   '"output": "x"}]')
    (raw / "excel.csv").write_bytes("\ufeffinstruction,output\nSay 7.,7.\n".encode())
    configure(workspace, [{"name": "js", "path": "rows.json", "format": "alpaca"},
                          {"name": "xl", "path": "excel.csv", "format": "auto"}])
    run(ingest, self_replay, to_chat)
    rejects = read_jsonl(workspace / "data/chat/rejects.jsonl")
    assert [(r["source"], r["line"], r["reason"]) for r in rejects] == [("js", 2, "not valid UTF-8")]
    assert len(read_jsonl(workspace / "data/chat/xl.jsonl")) == 1  # the BOM did not hide the header
