"""Every common preference shape, each in a small file written here, through ingest and to_chat with `format: auto`:
all become the canonical preference record, none is rejected as a malformed conversation."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import copy_inputs, run_stages, write_params

from skytune.core.atomic import read_jsonl
from skytune.stages import ingest, self_replay, to_chat

USER, GOOD, BAD = "Name a primary colour.", "Red.", "Purple, obviously."
SHAPES = {
    "strings": {"prompt": USER, "chosen": GOOD, "rejected": BAD},
    "messages": {"prompt": [{"role": "user", "content": USER}], "chosen": [{"role": "assistant", "content": GOOD}],
                 "rejected": [{"role": "assistant", "content": BAD}]},
    "implicit": {"chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": GOOD}],  # TRL
                 "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": BAD}]},
    "h4": {"prompt": USER, "chosen": [{"role": "user", "content": USER}, {"role": "assistant", "content": GOOD}],
           "rejected": [{"role": "user", "content": USER}, {"role": "assistant", "content": BAD}]},
    "ranking": {"conversations": [{"from": "human", "value": USER}], "chosen": {"from": "gpt", "value": GOOD},
                "rejected": {"from": "gpt", "value": BAD}},  # ShareGPT ranking (LLaMA-Factory)
    "hh": {"chosen": f"\n\nHuman: {USER}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {USER}\n\nAssistant: {BAD}"},
}


def test_each_preference_shape_from_its_own_file_becomes_the_canonical_record(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    for name, row in SHAPES.items():
        # three rows a file, so that each file is a shape of its own, not one row that happens to fit
        rows = [json.loads(json.dumps(row).replace(USER.rstrip("."), f"{USER.rstrip('.')} {i}")) for i in range(3)]
        (root / f"data/raw/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def edit(params: dict) -> None:
        params["data"]["sources"] += [{"name": name, "path": f"{name}.jsonl", "format": "auto"} for name in SHAPES]

    write_params(root, edit)
    run_stages(root, ingest, self_replay, to_chat)
    metrics = json.loads((root / "metrics/to_chat.json").read_text())
    assert {name: metrics["rejected"].get(name, 0) for name in SHAPES} == dict.fromkeys(SHAPES, 0)
    for name in SHAPES:
        records = read_jsonl(root / f"data/chat/{name}.jsonl")
        assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records] == [
            {"prompt": [{"role": "user", "content": f"Name a primary colour {i}."}],
             "chosen": [{"role": "assistant", "content": GOOD}], "rejected": [{"role": "assistant", "content": BAD}]}
            for i in range(3)], name
