"""Real third-party data: LLaMA-Factory's demo files (../shared/data/llama-factory, Apache-2.0) through the data
stages, as a user would point skytune at them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, copy_inputs, run_stages, write_params

from skytune.core.atomic import read_jsonl
from skytune.stages import ingest, to_chat

LLAMA_FACTORY = REPO.parent / "shared" / "data" / "llama-factory"
needs_shared = pytest.mark.skipif(not LLAMA_FACTORY.is_dir(),
                                  reason="../shared/data/llama-factory is absent (a clone outside CI)")


@needs_shared
def test_identity_placeholders_become_this_projects_identity(tmp_path: Path) -> None:
    """identity.json is alpaca with {{name}} and {{author}} in the answers; dataset_info.json maps it as alpaca."""
    root = copy_inputs(tmp_path)
    shutil.copy2(LLAMA_FACTORY / "identity.json", root / "data/raw/lf_identity.json")
    assert json.loads((LLAMA_FACTORY / "dataset_info.json").read_text())["identity"]["file_name"] == "identity.json"
    rows = json.loads((LLAMA_FACTORY / "identity.json").read_text())
    assert sum("{{name}}" in r["output"] for r in rows) > 70  # what the test is about is really in the file

    def edit(params: dict) -> None:
        params["identity"].update(name="Orbit", creator="the Orbit Lab")
        params["data"]["sources"] = [{"name": "lf_identity", "path": "lf_identity.json", "format": "alpaca",
                                      "replace": {"{{name}}": "${identity.name}",
                                                  "{{author}}": "${identity.creator}"}}]
        params["merge_data"]["mixture"] = {}

    write_params(root, edit)
    run_stages(root, ingest, to_chat)
    records = read_jsonl(root / "data/chat/lf_identity.jsonl")
    assert len(records) == len(rows)  # 0 rejects
    texts = [m["content"] for r in records for m in r["messages"]]
    assert not [t for t in texts if "{{" in t]
    expected = [r["output"].replace("{{name}}", "Orbit").replace("{{author}}", "the Orbit Lab") for r in rows]
    assert sorted(r["messages"][-1]["content"] for r in records) == sorted(expected)


def test_a_replacement_naming_an_unknown_param_is_refused(tmp_path: Path) -> None:
    from skytune.core.errors import SkytuneError

    root = copy_inputs(tmp_path)

    def edit(params: dict) -> None:
        params["data"]["sources"][0]["replace"] = {"{{name}}": "${identity.nmae}"}

    write_params(root, edit)
    run_stages(root, ingest)
    with pytest.raises(SkytuneError, match=r"replace\['\{\{name\}\}'\]: \$\{identity.nmae\} is not known"):
        run_stages(root, to_chat)


@needs_shared
def test_sharegpt_ranking_preferences_are_detected_and_kept_whole(tmp_path: Path) -> None:
    """dpo_en_demo.json: sharegpt `conversations` with `chosen`/`rejected` message objects (dataset_info.json:
    ranking, sharegpt); `format: auto` must see preference data, not malformed conversations."""
    root = copy_inputs(tmp_path)
    shutil.copy2(LLAMA_FACTORY / "dpo_en_demo.json", root / "data/raw/dpo.json")
    info = json.loads((LLAMA_FACTORY / "dataset_info.json").read_text())["dpo_en_demo"]
    assert info["ranking"] and info["formatting"] == "sharegpt"
    rows = json.loads((LLAMA_FACTORY / "dpo_en_demo.json").read_text())

    def edit(params: dict) -> None:
        params["data"]["sources"].append({"name": "dpo", "path": "dpo.json", "format": "auto"})

    write_params(root, edit)
    run_stages(root, ingest, to_chat)
    assert json.loads((root / "metrics/to_chat.json").read_text())["rejected"].get("dpo", 0) == 0
    records = read_jsonl(root / "data/chat/dpo.jsonl")
    assert len(records) == len(rows)
    by_answer = {r["chosen"][0]["content"]: r for r in records}
    for row in rows:  # every turn kept, system turns included, in order
        record = by_answer[row["chosen"]["value"]]
        assert [m["content"] for m in record["prompt"]] == [t["value"] for t in row["conversations"]]
        assert record["rejected"] == [{"role": "assistant", "content": row["rejected"]["value"]}]
    assert sum(r["prompt"][0]["role"] == "system" for r in records) == sum(
        r["conversations"][0]["from"] == "system" for r in rows) > 0


@needs_shared
def test_dataset_info_tags_and_columns_load_as_params_with_the_same_meaning(tmp_path: Path) -> None:
    """Every sharegpt entry of LLaMA-Factory's dataset_info.json whose columns we map (messages, system) loads as a
    source as written there, and converts a row of that shape."""
    from skytune.core.data.chat_format import record_converter
    from skytune.core.params import load_params

    info = json.loads((LLAMA_FACTORY / "dataset_info.json").read_text())
    entries = {k: v for k, v in info.items() if v.get("formatting") == "sharegpt" and "tags" in v
               and set(v.get("columns", {})) <= {"messages", "system"}}
    assert len(entries) >= 3  # ultrachat_200k, lmsys_chat, open_thoughts, ...

    def edit(params: dict) -> None:
        params["data"]["sources"] = [{"name": name, "path": f"{name}.jsonl", "format": "sharegpt",
                                      "columns": entry["columns"], "tags": entry["tags"]}
                                     for name, entry in entries.items()]

    write_params(tmp_path, edit)
    sources = load_params(tmp_path / "params.yaml").data.sources
    for source in sources:
        entry = entries[source.name]
        tags = entry["tags"]
        turns = [{tags["role_tag"]: tags["user_tag"], tags["content_tag"]: "Hi"},
                 {tags["role_tag"]: tags["assistant_tag"], tags["content_tag"]: "Hello"}]
        convert = record_converter("sharegpt", columns=source.columns, tags=source.tags)
        assert convert({entry["columns"]["messages"]: turns})["messages"] == [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], source.name
