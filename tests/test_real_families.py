"""The gate and the loss masks on REAL tokenizers and chat templates of five families (tests/real_vocabs.py), each
through every stage of the pipeline with a tiny random model of its vocabulary.

For each family, from what the stages wrote:
- the trained text (the ⟦...⟧ spans of `paths.train_samples`) is exactly each assistant turn's content followed by
  the family's end-of-turn token, and nothing else;
- a family with a document BOS starts every sequence with exactly one, and no BOS comes from anywhere but the
  template (SmolLM2's BOS `<|im_start|>` is a turn header: one per turn, no document BOS);
- the pad token is neither EOS nor the end-of-turn token;
- after merge_adapters and export, the prompt the served model renders (the merged model's and the exported
  adapter's tokenizer, as vLLM loads them) is the text training saw before the answer, token for token.
The expectations (end-of-turn text, BOS) are written in real_vocabs.FAMILIES, not read from the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import copy_inputs, run_stages, write_params
from real_vocabs import FAMILIES, build_family, missing

from skytune.core.params import load_params
from skytune.stages import (
    export,
    ingest,
    merge_adapters,
    merge_data,
    sanity_check,
    split,
    to_chat,
    train,
)

QUESTIONS = ["Hello! How are you?", "What is 2 + 2?", "Name a colour.", "Say something kind.", "Where is Paris?",
             "Count to three.", "What is your favourite word?", "Tell me a fact."]
ANSWERS = ["I am fine, thank you.", "It is 4.", "Blue.", "You are doing great!", "Paris is in France.",
           "One, two, three.", "Serendipity.", "Water boils at 100 degrees Celsius at sea level."]


def conversations(system: bool) -> list[dict]:
    """Single- and multi-turn chats (with a system prompt where the template writes one), contents chosen so that
    every template keeps them verbatim (no leading or trailing spaces)."""
    rows = []
    for i in range(40):
        q, a = i % len(QUESTIONS), (i * 3) % len(ANSWERS)
        messages = [{"role": "user", "content": f"{QUESTIONS[q]} ({i})"},
                    {"role": "assistant", "content": ANSWERS[a]}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": QUESTIONS[(q + 1) % len(QUESTIONS)]},
                         {"role": "assistant", "content": ANSWERS[(a + 1) % len(ANSWERS)]}]
        if system and i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    reason = missing(name)
    if reason:
        pytest.skip(reason)
    family = FAMILIES[name]
    root = copy_inputs(tmp_path_factory.mktemp(name))
    base = build_family(name, root / "base-model")
    raw = root / load_params(root / "params.yaml").paths.raw_dir
    (raw / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations(family.system)))

    def edit(p: dict) -> None:
        p["model"]["base"] = str(base)
        p["data"]["sources"] = [{"name": "chats", "path": "chats.jsonl", "format": "messages"}]
        p["identity"]["num_samples"] = 8
        p["split"]["val_fraction_by_source"] = {"identity": 0.0}
        p["merge_data"]["mixture"] = {}
        p["train"].update(epochs=1, batch_size=4, total_batch_size=4, max_length=256, save_steps=1000,
                          eval_steps=1000, logging_steps=5, gate_samples=12, learning_rate=0.001)
        p["sanity_check"].update(val_records=2, perplexity_records=4, max_new_tokens=4)

    write_params(root, edit)
    run_stages(root, ingest, to_chat, split, merge_data, train, merge_adapters, sanity_check, export)
    return name, root


def samples(root: Path) -> list[tuple[str, str]]:
    """(record id, rendered text) of every sequence in `paths.train_samples`, in file order."""
    text = (root / load_params(root / "params.yaml").paths.train_samples).read_text(encoding="utf-8")
    return re.findall(r"^## \w+/(\S+): .*?\n\n~~~~text\n(.*?)\n~~~~$", text, flags=re.M | re.S)


def records(root: Path) -> dict[str, dict]:
    paths = load_params(root / "params.yaml").paths
    return {r["id"]: r for r in map(json.loads, (root / paths.train_file).read_text().splitlines())}


def test_the_trained_text_is_the_assistant_turns_and_their_end_of_turn(family_run: tuple[str, Path]) -> None:
    name, root = family_run
    family, by_id = FAMILIES[name], records(root)
    shown = samples(root)
    assert len(shown) == 12
    for record_id, text in shown:
        expected = [m["content"] + family.end_of_turn for m in by_id[record_id]["messages"] if m["role"] == "assistant"]
        trained = re.findall(r"⟦(.*?)⟧", text, flags=re.S)
        # A SentencePiece piece carries the space before a word ("▁It"): the run may start with that one space.
        assert [t.removeprefix(" ") if name == "llama2" else t for t in trained] == expected, (name, text)


def test_bos_only_where_the_family_writes_it(family_run: tuple[str, Path]) -> None:
    name, root = family_run
    family = FAMILIES[name]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / load_params(root / "params.yaml").paths.merged_dir)
    for record_id, text in samples(root):
        clean = text.replace("⟦", "").replace("⟧", "")
        if family.document_bos:
            assert clean.startswith(family.document_bos) and not clean.startswith(family.document_bos * 2)
            turns = clean.count("[INST]") if name == "llama2" else 1  # Llama 2 opens every user turn with <s>
            assert clean.count(family.document_bos) == turns, (name, record_id)
        elif name == "smollm2":  # its BOS is the turn header: one per message, the default system prompt's too
            assert tokenizer.bos_token == "<|im_start|>"
            assert clean.count("<|im_start|>") == clean.count("<|im_end|>")
        else:
            assert tokenizer.bos_token is None or not clean.startswith(tokenizer.bos_token)


def test_pad_is_never_a_stop_token(family_run: tuple[str, Path]) -> None:
    name, root = family_run
    from transformers import AutoTokenizer

    paths = load_params(root / "params.yaml").paths
    for directory in (paths.adapter_dir, paths.merged_dir, f"{paths.export_dir}/adapter"):
        tokenizer = AutoTokenizer.from_pretrained(root / directory)
        end = FAMILIES[name].end_of_turn.strip()
        assert tokenizer.pad_token is not None
        assert tokenizer.pad_token not in {tokenizer.eos_token, end}, (name, directory, tokenizer.pad_token)
    config = json.loads((root / paths.merged_dir / "generation_config.json").read_text())
    stops = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids(end) in stops and config["pad_token_id"] not in stops


def test_the_served_prompt_is_the_trained_one(family_run: tuple[str, Path]) -> None:
    """What vLLM renders from the exported model for the conversation so far is what training saw before the answer,
    as text and as token ids (vLLM tokenizes a rendered chat with no special tokens added)."""
    name, root = family_run
    from transformers import AutoTokenizer

    paths = load_params(root / "params.yaml").paths
    by_id = records(root)
    for directory in (paths.merged_dir, f"{paths.export_dir}/adapter"):
        served = AutoTokenizer.from_pretrained(root / directory)
        for record_id, text in samples(root):
            trained = text.replace("⟦", "").replace("⟧", "")
            messages = by_id[record_id]["messages"]
            prompt = served.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            assert trained.startswith(prompt), (name, directory, prompt, trained)
            answer = messages[-1]["content"]
            assert trained[len(prompt):].lstrip(" ").startswith(answer)
            ids = served(prompt, add_special_tokens=False)["input_ids"]
            assert served(trained, add_special_tokens=False)["input_ids"][:len(ids)] == ids
