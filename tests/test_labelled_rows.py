"""Rows labelled undesirable (KTO-style `label: false`) through the data stages: never in the SFT data, kept with
the preference outputs, counted in the metrics."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import copy_inputs, run_stages, write_params

from skytune.core.atomic import read_jsonl
from skytune.stages import ingest, merge_data, self_replay, split, to_chat


def test_undesirable_rows_are_never_trained_and_are_kept_apart(tmp_path: Path) -> None:
    root = copy_inputs(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}." if i % 3 else f"Maybe {i + 7}."}],
             "label": bool(i % 3)} for i in range(60)]
    (root / "data/raw/kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad_answers = {r["messages"][1]["content"] for r in rows if not r["label"]}

    def edit(params: dict) -> None:
        params["data"]["sources"].append({"name": "kto", "path": "kto.jsonl", "format": "messages"})

    write_params(root, edit)
    run_stages(root, ingest, self_replay, to_chat, split, merge_data)
    assert json.loads((root / "metrics/to_chat.json").read_text())["undesirable"] == {"kto": len(bad_answers)}
    trained = {m["content"] for part in ("train", "val") for r in read_jsonl(root / f"data/{part}.jsonl")
               for m in r["messages"]}
    assert not trained & bad_answers  # never an SFT target, nor in the val loss
    kept = [r for part in ("train", "val") for r in read_jsonl(root / f"data/preference/{part}.jsonl")
            if r.get("label") is False]
    assert {r["completion"][0]["content"] for r in kept} == bad_answers and all(r["source"] == "kto" for r in kept)
    assert len({r["messages"][1]["content"] for part in ("train", "val") for r in
                read_jsonl(root / f"data/{part}.jsonl") if r["source"] == "kto"}) == 60 - len(bad_answers)


def test_a_kto_tag_column_map_names_the_label(tmp_path: Path) -> None:
    """LLaMA-Factory's kto_mix_en entry: sharegpt rows in a `completion` column, the label in `label`, written as
    params; and a source whose label column is named otherwise (`verdict`), where a `label` key means nothing."""
    kto_mix_en = {"formatting": "sharegpt", "columns": {"messages": "completion", "kto_tag": "label"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}}  # as dataset_info.json writes it
    root = copy_inputs(tmp_path)
    turns = [[{"role": "user", "content": f"Add {i} and {i}."}, {"role": "assistant", "content": f"{2 * i + i % 2}."}]
             for i in range(20)]
    (root / "data/raw/mix.jsonl").write_text("".join(
        json.dumps({"completion": t, "label": i % 2 == 0}) + "\n" for i, t in enumerate(turns)))
    (root / "data/raw/verdicts.jsonl").write_text("".join(
        json.dumps({"completion": t, "verdict": i % 4 != 1, "label": "unrelated"}) + "\n" for i, t in enumerate(turns)))

    def edit(params: dict) -> None:
        params["data"]["sources"] += [
            {"name": "mix", "path": "mix.jsonl", "format": "sharegpt", "columns": kto_mix_en["columns"],
             "tags": kto_mix_en["tags"]},
            {"name": "verdicts", "path": "verdicts.jsonl", "format": "sharegpt", "tags": kto_mix_en["tags"],
             "columns": {"messages": "completion", "kto_tag": "verdict"}}]

    write_params(root, edit)
    run_stages(root, ingest, self_replay, to_chat)
    metrics = json.loads((root / "metrics/to_chat.json").read_text())
    assert metrics["undesirable"] == {"mix": 10, "verdicts": 5}
    assert metrics["records"]["mix"] == metrics["records"]["verdicts"] == 20
    undesirable = [r for r in read_jsonl(root / "data/chat/mix.jsonl") if r.get("label") is False]
    assert sorted(r["completion"][0]["content"] for r in undesirable) == sorted(
        t[1]["content"] for i, t in enumerate(turns) if i % 2)
