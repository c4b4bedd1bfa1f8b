"""Real third-party data: LLaMA-Factory's demo files (../shared/data/llama-factory, Apache-2.0) through the data
stages, as a user would point skytune at them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, copy_inputs, run_stages, write_params
from real_vocabs import build_family, missing

from skytune.core.atomic import read_jsonl
from skytune.stages import ingest, self_replay, to_chat

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
    run_stages(root, ingest, self_replay, to_chat)
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
    run_stages(root, ingest, self_replay, to_chat)
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


def _source(name: str, entry: dict) -> dict:
    """A params.yaml source from a dataset_info.json entry, with the same meaning: `formatting` (alpaca when
    absent) as the format, `columns` and `tags` as they are (`ranking` is what mapping chosen/rejected says)."""
    source = {"name": name, "path": entry["file_name"], "format": entry.get("formatting", "alpaca")}
    source.update({k: entry[k] for k in ("columns", "tags") if k in entry})
    return source


def _key(row_or_record: dict) -> str:
    """A glaive conversation's texts (calls left out) and tool names, raw row or canonical record alike: the key
    that matches them."""
    if "conversations" in row_or_record:
        turns, tools = row_or_record["conversations"], [t["name"] for t in json.loads(row_or_record["tools"])]
    else:
        turns, tools = row_or_record["messages"], [t["function"]["name"] for t in row_or_record.get("tools", [])]
    return "\x1e".join([t["value"] if "value" in t else t["content"] for t in turns
                         if t.get("from") != "function_call" and not t.get("tool_calls")] + tools)


def _assistant_texts(row: dict) -> list[str]:
    """What Qwen2.5's template writes for each assistant turn of a glaive row, up to its <|im_end|>: a gpt turn's
    text, or a function_call as <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call> (from the template's
    source, written here by hand)."""
    out = []
    for turn in row["conversations"]:
        if turn["from"] == "gpt":
            out.append(turn["value"] + "<|im_end|>")
        elif turn["from"] == "function_call":
            call = json.loads(turn["value"])
            out.append('<tool_call>\n{"name": "' + call["name"] + '", "arguments": '
                       + json.dumps(call["arguments"], ensure_ascii=False) + "}\n</tool_call><|im_end|>")
    return out


@needs_shared
@pytest.mark.skipif(bool(missing("qwen2")), reason=str(missing("qwen2")))
def test_the_four_demo_files_through_the_data_stages_and_tool_calls_trained_on_a_real_qwen_template(
        tmp_path: Path) -> None:
    """alpaca_en_demo, identity, glaive_toolcall_en_demo and dpo_en_demo, mapped as dataset_info.json maps them,
    through ingest -> merge_data on the real Qwen2 vocabulary with Qwen2.5's official template (tools inside),
    then a few training steps: the tool calls are trained, the tool results are not."""
    from importlib.resources import files

    from skytune.core.params import load_params
    from skytune.stages import merge_data, split, train

    info = json.loads((LLAMA_FACTORY / "dataset_info.json").read_text())
    names = {"alpaca_en_demo": "alpaca", "identity": "lf_identity", "glaive_toolcall_en_demo": "glaive",
             "dpo_en_demo": "dpo"}
    raw = {name: json.loads((LLAMA_FACTORY / info[key]["file_name"]).read_text()) for key, name in names.items()}
    names_of = {name: name for name in raw}
    root = copy_inputs(tmp_path)
    for key in names:
        shutil.copy2(LLAMA_FACTORY / info[key]["file_name"], root / "data/raw")
    (root / "templates").mkdir(exist_ok=True)
    (root / "templates/qwen2_5.jinja").write_text(
        files("trl").joinpath("chat_templates", "qwen2_5.jinja").read_text(encoding="utf-8"))
    base = build_family("qwen2", tmp_path / "qwen2")

    def edit(params: dict) -> None:
        params["model"].update(base=str(base), chat_template="templates/qwen2_5.jinja")
        params["data"]["sources"] = [_source(name, info[key]) for key, name in names.items()]
        params["data"]["sources"][1]["replace"] = {"{{name}}": "${identity.name}", "{{author}}": "${identity.creator}"}
        params["identity"].update(enabled=False, name="Orbit", creator="the Orbit Lab")
        params["split"].update(val_fraction=0.02, val_fraction_by_source={"alpaca": 0.0, "lf_identity": 0.0})
        params["merge_data"]["mixture"] = {"alpaca": {"rows": 8}, "lf_identity": {"rows": 4}, "glaive": {"rows": 20}}
        params["train"].update(max_length=1024, batch_size=2, total_batch_size=4, epochs=1, save_steps=1000,
                               eval_steps=1000, logging_steps=2, gate_samples=32)

    write_params(root, edit)
    paths = load_params(root / "params.yaml").paths
    run_stages(root, ingest, self_replay, to_chat, split, merge_data)

    to_chat_metrics = json.loads((root / paths.to_chat_metrics).read_text())
    assert to_chat_metrics["rejected_total"] == 0, to_chat_metrics["reject_reasons"]
    assert to_chat_metrics["records"] == {"alpaca": 999, "dpo": 300, "glaive": 300, "lf_identity": 91}
    assert to_chat_metrics["tool_calls"] == {"glaive": sum(
        any(t["from"] == "function_call" for t in r["conversations"]) for r in raw["glaive"])}
    chats = {name: read_jsonl(root / paths.chat_dir / f"{name}.jsonl") for name in names.values()}
    # glaive: every turn kept in order, calls as calls, observations as tool results, the tools with each record
    speaker = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    by_key = {_key(r): r for r in chats["glaive"]}
    for row in raw["glaive"]:
        record = by_key[_key(row)]
        assert [m["role"] for m in record["messages"]] == [speaker[t["from"]] for t in row["conversations"]]
        assert [t["function"]["name"] for t in record.get("tools", [])] == [t["name"] for t in json.loads(row["tools"])]
        for message, turn in zip(record["messages"], row["conversations"], strict=True):
            if turn["from"] == "function_call":
                assert message["tool_calls"][0]["function"] == json.loads(turn["value"])
            else:
                assert message["content"] == turn["value"]
    # identity: the placeholders replaced; dpo: system turns kept, all in the preference outputs (less duplicates)
    assert not [m for r in chats["lf_identity"] for m in r["messages"] if "{{" in m["content"]]
    assert sum("Orbit" in r["messages"][-1]["content"] for r in chats["lf_identity"]) > 70
    assert sum(r["prompt"][0]["role"] == "system" for r in chats["dpo"]) > 0
    preference = [r for part in ("train", "val") for r in read_jsonl(root / paths.preference_dir / f"{part}.jsonl")]
    split_counts = json.loads((root / paths.split_dir / "summary.json").read_text())
    for name, rows in raw.items():  # split drops exact repeats only: counted independently here
        repeats = len(rows) - len({json.dumps(r, sort_keys=True) for r in rows})
        assert split_counts[names_of[name]]["exact_duplicates"] == repeats
    assert len(preference) == 300 - split_counts["dpo"]["exact_duplicates"] == 295

    run_stages(root, train)
    runs = [re.findall(r"⟦(.*?)⟧", text, flags=re.DOTALL) for text in
            re.findall(r"~~~~text\n(.*?)\n~~~~$", (root / paths.train_samples).read_text(), flags=re.MULTILINE | re.DOTALL)]
    train_records = read_jsonl(root / paths.train_file)
    glaive = [r for r in train_records if r["source"] == "glaive"]
    raw_by_key = {_key(r): r for r in raw["glaive"]}
    shown = 0
    for record, trained in zip(train_records, runs, strict=False):
        if record["source"] != "glaive":
            continue
        row = raw_by_key[_key(record)]
        assert trained == _assistant_texts(row)  # calls and answers trained, each with its <|im_end|>
        assert not [t for t in trained if "<tool_response>" in t]  # results never
        shown += 1
    assert shown >= 10 and any(r["messages"][1:] and "tool_calls" in str(r) for r in glaive)
    metrics = json.loads((root / paths.train_metrics).read_text())
    assert metrics["gate"]["train"]["problems"] == {}


# LLaMA-Factory v1's data format, written here from the v0 demo files the way its own converters map them
# (src/llamafactory/v1/plugins/data_plugins/converter.py: text parts with `value`, `loss_weight` 0 on every turn but
# the assistant's, a function_call as a `tool_call` part holding the call's JSON, an observation as a `tool` message,
# a pair as two whole conversations `chosen_messages` / `rejected_messages`).
V1_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant",
            "observation": "tool"}


def _v1_message(turn: dict) -> dict:
    kind = "tool_call" if turn["from"] == "function_call" else "text"
    role = V1_ROLES[turn["from"]]
    return {"role": role, "content": [{"type": kind, "value": turn["value"]}],
            "loss_weight": 1.0 if role == "assistant" else 0.0}


def _v1_alpaca(row: dict) -> dict:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input", "").strip() else "")
    return {"messages": [{"role": "user", "content": [{"type": "text", "value": user}], "loss_weight": 0.0},
                         {"role": "assistant", "content": [{"type": "text", "value": row["output"]}],
                          "loss_weight": 1.0}]}


def _v1_sharegpt(row: dict) -> dict:
    return {"messages": [_v1_message(t) for t in row["conversations"]], "tools": row["tools"]}


def _v1_pair(row: dict) -> dict:
    prompt = [_v1_message(t) for t in row["conversations"]]
    return {f"{key}_messages": [*prompt, _v1_message(row[key])] for key in ("chosen", "rejected")}


def _v1_first_answer_untrained(row: dict) -> dict:
    """A glaive row in v1 whose first assistant turn (answer or call) is context only (loss_weight 0)."""
    v1 = _v1_sharegpt(row)
    first = next(m for m in v1["messages"] if m["role"] == "assistant")
    first["loss_weight"] = 0.0
    return v1


def _drop_ids(records: list[dict]) -> list[str]:
    return sorted(json.dumps({k: v for k, v in r.items() if k not in ("id", "source")}, sort_keys=True)
                  for r in records)


@needs_shared
@pytest.mark.skipif(bool(missing("qwen2")), reason=str(missing("qwen2")))
def test_llama_factory_v1_files_of_each_shape_lose_no_row_and_train_what_their_weights_say(tmp_path: Path) -> None:
    """The demo files rewritten in v1's format (alpaca and glaive as `messages` with typed parts and tool calls, the
    DPO pairs as `chosen_messages`/`rejected_messages`), detected by `format: auto`: every row kept, each record the
    one its v0 file gives; on the real Qwen2 vocabulary with Qwen2.5's template, the tool calls are trained and an
    answer marked loss_weight 0 is not."""
    from importlib.resources import files

    from real_vocabs import real_tokenizer

    from skytune.core.chat import chat_template
    from skytune.core.chat.tokenization import Encoder, gate
    from skytune.core.params import load_params

    raw = {name: json.loads((LLAMA_FACTORY / f"{name}.json").read_text())
           for name in ("alpaca_en_demo", "glaive_toolcall_en_demo", "dpo_en_demo")}
    multi = [r for r in raw["glaive_toolcall_en_demo"] if sum(t["from"] in ("gpt", "function_call")
                                                               for t in r["conversations"]) > 1]
    v1 = {"v1_alpaca": [_v1_alpaca(r) for r in raw["alpaca_en_demo"]],
          "v1_glaive": [_v1_sharegpt(r) for r in raw["glaive_toolcall_en_demo"]],
          "v1_dpo": [_v1_pair(r) for r in raw["dpo_en_demo"]],
          "v1_weighted": [_v1_first_answer_untrained(r) for r in multi]}
    calls = sum(any(p["type"] == "tool_call" for m in r["messages"] for p in m["content"]) for r in v1["v1_weighted"])
    assert len(multi) > 100 and calls > 100  # what the test is about is in the files
    root = copy_inputs(tmp_path)
    for name, rows in v1.items():
        (root / f"data/raw/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("glaive_toolcall_en_demo", "dpo_en_demo"):
        shutil.copy2(LLAMA_FACTORY / f"{name}.json", root / "data/raw")
    info = json.loads((LLAMA_FACTORY / "dataset_info.json").read_text())

    def edit(params: dict) -> None:
        params["data"]["sources"] = [{"name": name, "path": f"{name}.jsonl", "format": "auto"} for name in v1] + [
            _source("glaive", info["glaive_toolcall_en_demo"]), _source("dpo", info["dpo_en_demo"])]
        params["merge_data"]["mixture"] = {}

    write_params(root, edit)
    paths = load_params(root / "params.yaml").paths
    run_stages(root, ingest, self_replay, to_chat)
    metrics = json.loads((root / paths.to_chat_metrics).read_text())
    assert metrics["rejected_total"] == 0, metrics["reject_reasons"]
    assert {name: metrics["records"][name] for name in v1} == {name: len(rows) for name, rows in v1.items()}
    chats = {name: read_jsonl(root / paths.chat_dir / f"{name}.jsonl") for name in [*v1, "glaive", "dpo"]}
    assert _drop_ids(chats["v1_glaive"]) == _drop_ids(chats["glaive"])  # the v0 file's records, call for call
    assert _drop_ids(chats["v1_dpo"]) == _drop_ids(chats["dpo"])
    assert sorted(r["messages"][-1]["content"] for r in chats["v1_alpaca"]) == sorted(
        r["output"] for r in raw["alpaca_en_demo"])
    assert not [m for r in chats["v1_glaive"] for m in r["messages"] if "loss_weight" in m]

    tokenizer = real_tokenizer("qwen2")
    tokenizer.chat_template = files("trl").joinpath("chat_templates", "qwen2_5.jinja").read_text(encoding="utf-8")
    chat_template.ensure_pad_token(tokenizer, "auto")
    encoded = Encoder(tokenizer, "assistant_only").encode(chats["v1_weighted"])
    gate(tokenizer, encoded, max_length=4096, loss="assistant_only", where="v1_weighted")
    by_key = {_key(r): r for r in multi}
    for record, sequence in zip(chats["v1_weighted"], encoded, strict=True):
        trained, end = "", 0  # the trained characters (a multi-byte character's tokens share its offsets)
        for (a, b), label in zip(sequence.offsets, sequence.labels, strict=True):
            if label != -100 and b > end:
                trained, end = trained + sequence.text[max(a, end):b], b
        assert trained == "".join(_assistant_texts(by_key[_key(record)])[1:])  # all but the first answer
