"""The vLLM engine's wiring, on the CPU: with vLLM runnable (on a GPU node, from requirements-node.txt),
`sanity_check.engine: auto` picks it and export measures train/serve parity with it. A stand-in with vLLM's offline
interface (tests/vllm_standin, transformers' greedy decoding underneath) takes its place here; the real engine is
tests/test_gpu.py's, run by bench/gpu_check.sh."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
from conftest import PipelineRun, copy_inputs

STANDIN = Path(__file__).parent / "vllm_standin"


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> object:
    from skytune.core.evaluation import generation

    monkeypatch.syspath_prepend(str(STANDIN))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    # vLLM runs where it is installed and CUDA is there: the stand-in runs on the CPU (models stay there).
    real = generation.vllm_available
    monkeypatch.setattr(generation, "vllm_available", lambda: (True, "") if real()[1] == "no CUDA device" else real())

    vllm.CALLS.clear()
    yield vllm
    monkeypatch.undo()


def test_auto_resolves_to_vllm_where_it_runs(standin: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from skytune.core.evaluation import generation

    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: True)  # a GPU node (nothing loads here)
    assert generation.vllm_available() == (True, "")
    assert generation.resolve_engine("auto") == "vllm"
    assert generation.resolve_engine("auto", "evaluate.engine") == "vllm"


def test_parity_on_the_merged_model_goes_through_the_engine(standin: object, pipeline: PipelineRun) -> None:
    from skytune.core.params import load_params
    from skytune.stages import export

    with contextlib.chdir(pipeline.root):
        params = load_params()
        metrics = export._parity(params)
    prompts = sum(1 for _ in (pipeline.root / params.paths.sanity_prompts).open())
    assert metrics["serve_parity"] == "vllm vs transformers" and metrics["serve_parity_prompts"] == prompts
    # The same token ids in, the same greedy decoding: what parity measures is the engines, so here they agree.
    assert metrics["serve_parity_exact_match"] == 1.0 and metrics["serve_parity_stop_agreement"] == 1.0
    calls = [name for name, _ in standin.CALLS]
    assert calls == ["LLM", "generate", "shutdown", "cleanup"]  # one engine, shut down before the next model
    created, generated = standin.CALLS[0][1], standin.CALLS[1][1]
    assert created["model"] == params.paths.merged_dir and created["dtype"] == "float32"
    assert generated["prompts"] == prompts and generated["stop_token_ids"]


def test_the_sanity_check_stage_runs_on_the_engine(standin: object, pipeline: PipelineRun, tmp_path: Path) -> None:
    import shutil

    from skytune.core.params import load_params
    from skytune.stages import sanity_check

    root = copy_inputs(tmp_path / "ws")
    for item in ("models/base", "models/merged", "data/val.jsonl", "data/train.jsonl"):
        source = pipeline.root / item
        (root / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / item)
    with contextlib.chdir(root):
        params = load_params()
        sanity_check.main(params)
        metrics = json.loads(Path(params.paths.sanity_metrics).read_text())
    assert metrics["engine"] == "vllm"
    assert [name for name, _ in standin.CALLS].count("LLM") >= 1 and ("shutdown", {}) in standin.CALLS
