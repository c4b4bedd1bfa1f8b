"""dvc.yaml cannot lie: each stage declares exactly the params it reads, its code, and the paths it touches."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from conftest import PATHS, REPO, STAGES, PipelineRun, direct_imports

from skytune.core.params import Params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def schema_leaves(key: str) -> set[str]:
    """A declared key expands to every leaf of the schema under it (a list or mapping value is one leaf, as
    DVC tracks it and as TrackedParams records it)."""
    tp: object = Params
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    if dataclasses.is_dataclass(tp):
        return {leaf for f in dataclasses.fields(tp) for leaf in schema_leaves(f"{key}.{f.name}")}
    return {key}


def declared(stage: str) -> set[str]:
    return {leaf for key in DVC["stages"][stage].get("params", []) for leaf in schema_leaves(key)}


def test_stage_order_is_the_dag() -> None:
    assert list(DVC["stages"]) == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_equal_params_read(pipeline: PipelineRun, stage: str) -> None:
    read = {k for k in pipeline.reads[stage] if not k.startswith("paths.")}
    assert read == declared(stage), (
        f"stage {stage}: reads but does not declare {sorted(read - declared(stage))}; "
        f"declares but does not read {sorted(declared(stage) - read)}")


@pytest.mark.parametrize("stage", STAGES)
def test_paths_read_are_deps_or_outs(pipeline: PipelineRun, stage: str) -> None:
    spec = DVC["stages"][stage]
    entries = [next(iter(e)) if isinstance(e, dict) else e
               for section in ("deps", "outs", "metrics", "plots") for e in spec.get(section, [])]
    referenced = {m for e in entries for m in re.findall(r"\$\{(paths\.\w+)\}", e)}
    # The checkpoint directory is scratch that training resumes from, never an artifact: declaring it would have DVC
    # hash (and with cache, store) optimizer states. vLLM's environment is a tool, like the pipeline's own.
    used = {k for k in pipeline.reads[stage] if k.startswith("paths.")} - {"paths.checkpoint_dir", "paths.vllm_env"}
    assert used <= referenced, f"stage {stage} reads {sorted(used - referenced)} without declaring them"


def imported_modules(path: Path) -> set[Path]:
    """Project modules `path` imports, transitively (the packages on the way, whose __init__ runs, included)."""
    src = REPO / "src"
    found: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        todo.extend(direct_imports(current, packages=True))
    return {p for p in found if p != src / "skytune" / "__init__.py"}


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_modules_imported(stage: str) -> None:
    """The stage module and the command's own module (a launcher) with everything they import."""
    modules = {REPO / "src" / "skytune" / "stages" / f"{stage}.py"}
    command = re.fullmatch(r"python -m ([\w.]+)(?: ([\w.]+))?", DVC["stages"][stage]["cmd"])
    assert command, DVC["stages"][stage]["cmd"]
    modules |= {REPO / "src" / (m.replace(".", "/") + ".py") for m in command.groups() if m}
    if "${paths.eval_tasks_dir}" in DVC["stages"][stage]["deps"]:  # lm-eval imports the task directories' code
        modules |= set((REPO / PATHS.eval_tasks_dir).glob("*/*.py"))
    expected = {str(p.relative_to(REPO)) for m in modules for p in imported_modules(m)
                if p.is_relative_to(REPO / "src")}
    deps = {d for d in DVC["stages"][stage]["deps"] if d.startswith("src/")}
    assert deps == expected


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_each_other(stage: str) -> None:
    module = REPO / "src" / "skytune" / "stages" / f"{stage}.py"
    others = {str(REPO / "src/skytune/stages" / f"{s}.py") for s in STAGES if s != stage}
    assert not {str(p) for p in imported_modules(module)} & others


PATH_LIKE = re.compile(r"(?<![\w${}/.:])(?:\.{0,2}/?(?:[\w.-]+/)+[\w.-]*|/[A-Za-z_][\w.-]*)"
                       r"|\b[\w-]+\.(?:json|jsonl|yaml|yml|csv|md|txt|sh|safetensors|jinja|gguf)\b"
                       r"|(?<![\w/.])\.[A-Za-z][\w-]*(?![\w.])")  # a hidden directory: .venv-sky
# Fixed by the tools, not chosen here: DVC's own file names (the code names them through PARAMS_FILE and DVC_FILE).
NOT_OURS = {"/dev/null", "params.yaml", "dvc.yaml",
            "/v1/models", "/v1/completions"}  # vLLM's routes (the server's and SkyServe's readiness probe)
EXTENSIONS = {".gguf", ".yaml", ".yml", ".json", ".jsonl", ".tmp", ".py", ".csv", ".md", ".txt", ".sh", ".jinja",
              ".safetensors", ".parquet", ".bin", ".pt"}


def written_paths(path: Path) -> set[str]:
    """The paths a file writes as code: whole string constants of Python (docstrings aside), path-like words on the
    non-comment lines of the Makefile, shell scripts and YAMLs."""
    if path.suffix == ".py":
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        return {n.value.strip().rstrip("/") for n in ast.walk(tree) if isinstance(n, ast.Constant)
                and isinstance(n.value, str) and id(n) not in docs and PATH_LIKE.fullmatch(n.value.strip())}
    lines = [re.sub(r"\s#\s.*$", "", line) for line in path.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    return {m.rstrip("/") for line in lines for m in PATH_LIKE.findall(line)}


def test_every_path_is_written_once() -> None:
    """A path lives in one place: params.yaml `paths:` (dvc.yaml says ${paths.x}, the code and the Makefile read
    it), or the one module, Makefile line or sky/ file that owns it. The sky/ YAMLs count as one place: SkyPilot
    reads each of them alone, so they share their mount point and entry script."""
    for name, spec in DVC["stages"].items():
        for section in ("deps", "outs", "metrics", "plots"):
            for entry in spec.get(section, []):
                entry = next(iter(entry)) if isinstance(entry, dict) else entry
                assert entry.startswith("${paths.") or entry.startswith("src/skytune/"), (name, entry)
    configured = [str(v).rstrip("/") for v in yaml.safe_load((REPO / "params.yaml").read_text())["paths"].values()]
    assert len(configured) == len(set(configured))
    places: dict[str, set[str]] = {p: {"params.yaml"} for p in configured}
    files = [REPO / "Makefile", REPO / ".ci" / "run", *sorted((REPO / "sky").glob("*.*")),
             *sorted((REPO / "src").rglob("*.py"))]
    for path in files:
        if path.suffix == ".md":
            continue
        place = "sky/*.yaml" if path.parent.name == "sky" and path.suffix == ".yaml" else str(path.relative_to(REPO))
        for written in written_paths(path) - NOT_OURS - EXTENSIONS - {"src/skytune"}:
            places.setdefault(written, set()).add(place)
            top = written.split("/")[0]
            if top.startswith(".") and top.strip(".") and top not in EXTENSIONS:  # a hidden directory (.venv-sky)
                places.setdefault(top, set()).add(place)
    twice = {path: sorted(where) for path, where in places.items() if len(where) > 1}
    assert not twice, f"paths written in more than one place: {twice}"
