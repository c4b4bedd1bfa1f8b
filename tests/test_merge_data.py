"""merge_data: weighted mixtures, token-aware length policies, stats and the length plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import copy_inputs, run_stages, write_params

from skytune.core.atomic import read_jsonl
from skytune.core.errors import SkytuneError
from skytune.core.models.loading import load_saved_tokenizer
from skytune.stages import ingest, merge_data, self_replay, split, to_chat

TINY = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def split_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_inputs(tmp_path_factory.mktemp("merge"))
    write_params(root, lambda params: params["model"].update(builtin=TINY))
    run_stages(root, ingest, self_replay, to_chat, split)
    return root


def run_merge(root: Path, **overrides: object) -> tuple[list[dict], dict]:
    def edit(params: dict) -> None:
        params["model"]["builtin"] = TINY
        for key, value in overrides.items():
            section, name = key.split(".")
            params[section][name] = value

    write_params(root, edit)
    run_stages(root, merge_data)
    return read_jsonl(root / "data/train.jsonl"), json.loads((root / "metrics/merge_data.json").read_text())


def split_rows(root: Path, source: str) -> int:
    return len(read_jsonl(root / "data/split/train" / f"{source}.jsonl"))


def test_mixture_fraction_rows_and_upsampling(split_workspace: Path) -> None:
    root = split_workspace
    n_alpaca, n_identity, n_math = (split_rows(root, s) for s in ("alpaca_tasks", "identity", "sharegpt_math"))
    mixture = {"alpaca_tasks": {"fraction": 0.5}, "identity": {"fraction": 2.0}, "sharegpt_math": {"rows": 10}}
    train, metrics = run_merge(root, **{"merge_data.mixture": mixture})
    counts = Counter(r["source"] for r in train)
    assert counts == {"alpaca_tasks": round(0.5 * n_alpaca), "identity": 2 * n_identity, "sharegpt_math": 10}
    ids = Counter(r["id"] for r in train if r["source"] == "identity")
    assert set(ids.values()) == {2}  # every identity record exactly twice
    assert metrics["train"]["sources"]["sharegpt_math"]["rows"] == 10
    assert len(read_jsonl(root / "data/val.jsonl")) == sum(  # val untouched (preference pairs go apart)
        "messages" in r for p in sorted((root / "data/split/val").glob("*.jsonl")) for r in read_jsonl(p))
    again, _ = run_merge(root, **{"merge_data.mixture": mixture})
    assert again == train  # seeded: the same selection and order
    other, _ = run_merge(root, **{"merge_data.mixture": mixture, "base.seed": 7})
    assert [r["id"] for r in other] != [r["id"] for r in train]
    with pytest.raises(SkytuneError, match="unknown sources \\['nope'\\]"):
        run_merge(root, **{"merge_data.mixture": {"nope": {"rows": 1}}})


def test_lengths_are_counted_with_the_model_tokenizer_and_policies_apply(split_workspace: Path) -> None:
    root = split_workspace
    tokenizer = load_saved_tokenizer(root / "models/base")

    def length(messages: list[dict]) -> int:  # transformers' own rendering and tokenization, not merge_data's
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        return len(ids)

    full, metrics = run_merge(root, **{"merge_data.mixture": {}})
    tokens = sum(length(r["messages"]) for r in full)
    assert tokens == sum(s["tokens"] for s in metrics["train"]["sources"].values())
    limit = sorted(length(r["messages"]) for r in full)[len(full) // 2]  # the median length

    dropped, m_drop = run_merge(root, **{"merge_data.mixture": {}, "train.max_length": limit,
                                         "data.length_policy": "drop"})
    assert all(length(r["messages"]) <= limit for r in dropped)
    n_dropped = sum(s.get("dropped_too_long", 0) for s in m_drop["train"]["sources"].values())
    assert n_dropped > 0 and len(dropped) + n_dropped == len(full)

    cut, m_cut = run_merge(root, **{"merge_data.mixture": {}, "train.max_length": limit,
                                    "data.length_policy": "truncate"})
    n_cut = sum(s.get("truncated", 0) for s in m_cut["train"]["sources"].values())
    assert n_cut > 0 and len(cut) > len(dropped)
    for record in cut:
        assert length(record["messages"]) <= limit
        assert record["messages"][-1]["role"] == "assistant"
    histogram = (root / "metrics/train_lengths.csv").read_text().splitlines()
    assert histogram[0] == "tokens,records" and sum(int(r.split(",")[1]) for r in histogram[1:]) == len(cut)
