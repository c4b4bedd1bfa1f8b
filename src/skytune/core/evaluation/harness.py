"""Benchmarks with EleutherAI's lm-evaluation-harness (lm-eval): the tasks of `evaluate.tasks` scored on one model,
through the model's own chat template, on lm-eval's transformers (hf) backend or against vLLM's server (lm-eval's
local-completions).

Tasks come from the repository's task directories (`paths.eval_tasks_dir`, loaded through lm-eval's `include_path`,
so they run offline) or from lm-eval's registry (their data comes from the Hugging Face hub, at the revision each
task pins). The scores are lm-eval's own: its requests, filters, metrics and aggregations. lm-eval is pinned in
`paths.lm_eval_pin`; a different installed version is refused, since its scores would not compare with the cached
base's.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skytune.core import vllm_server
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import generation
from skytune.core.params.schema import EvaluateParams
from skytune.core.vllm_server import Vllm

log = logging.getLogger(__name__)

PACKAGE = "lm_eval"
BOOTSTRAP_ITERS = 1000  # lm-eval's standard errors: closed form for means, this many resamples for the rest
SCORES_FILE = "scores.json"  # a model's Scores, in paths.base_scores_dir for the base
CONTROL_FILE = "control.json"  # ... and for the control (the base as the tuned model is merged onto it)
BASE_IS_CONTROL = "base"  # control.json's `model` where the control is the base itself


@dataclass(frozen=True)
class Scores:
    """What lm-eval measured on one model: {task: {metric: value}} (a metric with a filter other than lm-eval's
    `none` is named `<metric>_<filter>`), the standard errors lm-eval gives, each metric's direction, the examples
    scored per task, and how; and `items`, the per-item scores behind each metric that is a mean of them, for paired
    tests: {task: {"ids": [item id], "metrics": {metric: [[numerator, count] per item]}}}."""

    tasks: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool]]
    examples: dict[str, int]
    engine: str
    lm_eval: str
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scores:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pinned_version(pin_file: Path) -> str:
    """The lm-eval version `pin_file` pins (`lm-eval[extras]==X`)."""
    match = re.search(r"^lm[-_]eval(\[[^\]]*\])?==([^\s#;]+)", pin_file.read_text(encoding="utf-8"), re.MULTILINE)
    if match is None:
        raise SkytuneError(f"{pin_file}: no `lm-eval==<version>` pin")
    return match.group(2)


def check_version(pin_file: Path) -> str:
    """The installed lm-eval version, which must be the pinned one."""
    pinned = pinned_version(pin_file)
    try:
        installed = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SkytuneError(f"lm-eval is not installed; {pin_file} pins {pinned}: run `make install`") from None
    if installed != pinned:
        raise SkytuneError(f"lm-eval {installed} is installed but {pin_file} pins {pinned}: scores of different "
                           "versions do not compare (the base's are cached). Run `make install`.")
    return installed


def task_manager(names: tuple[str, ...], tasks_dir: Path) -> Any:
    """lm-eval's TaskManager over the repository's task directories, and over lm-eval's registry when a name is not
    one of them (indexing the registry takes seconds). An unknown name is refused with the closest known ones."""
    from lm_eval.tasks import TaskManager

    include = str(tasks_dir) if tasks_dir.is_dir() else None
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise SkytuneError(f"evaluate.tasks: {name!r} is neither a task directory under {tasks_dir} nor an "
                               f"lm-eval task" + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                                                   " (python -m lm_eval ls tasks lists them)"))
    return manager


def load_tasks(manager: Any, names: tuple[str, ...], tasks_dir: Path,
               max_gen_toks: int | None) -> tuple[list[Any], list[str]]:
    """The lm-eval Task (or Group) objects of `names`, their data loaded, each generated answer capped at
    `max_gen_toks` tokens (None: each task's own; a task's own smaller cap stands); and the names whose scores to
    record (a name, or the tasks a tag stands for)."""
    built: list[Any] = []
    recorded: list[str] = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as exc:  # datasets raises many types for data it cannot reach
            raise SkytuneError(_load_failure(manager, name, tasks_dir, exc)) from exc
        tasks, groups = loaded["tasks"], loaded["groups"]
        for task in tasks.values():
            if max_gen_toks is not None and task.get_config("output_type") == "generate_until":
                own = (task.get_config("generation_kwargs") or {}).get("max_gen_toks", max_gen_toks)
                task.set_config("generation_kwargs", {"max_gen_toks": min(own, max_gen_toks)}, update=True)
        top = groups.get(name) or tasks.get(name)
        built += [top] if top is not None else list(tasks.values())
        recorded += [name] if top is not None else list(tasks)
    return built, recorded


def _load_failure(manager: Any, name: str, tasks_dir: Path, exc: Exception) -> str:
    entry = manager.task_index.get(name)
    local = entry is not None and entry.yaml_path is not None and \
        tasks_dir.resolve() in Path(entry.yaml_path).resolve().parents
    what = f"evaluate.tasks: {name}: lm-eval could not load its data ({type(exc).__name__}: {exc})."
    if local:
        return f"{what} Check the data_files of its YAML under {tasks_dir} (paths relative to the repository root)."
    return (f"{what} lm-eval's registry tasks download their data from the Hugging Face hub, which this machine "
            f"cannot reach (offline, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set). Run it where the hub is reachable "
            f"(a cloud node: make launch), or evaluate offline with a task directory under {tasks_dir} "
            f"(a YAML and its JSONL: see {tasks_dir}/README.md).")


def chat_template_on(setting: bool | str, tokenizer: Any) -> bool:
    """`evaluate.apply_chat_template`: `auto` is on for a tokenizer that has a chat template (a chat model)."""
    return bool(tokenizer.chat_template) if setting == "auto" else bool(setting)


@contextlib.contextmanager
def language_model(engine: str, *, model: Any, tokenizer: Any, source: str, revision: str | None,
                   ev: EvaluateParams, vllm: Vllm, dtype: str, seed: int) -> Iterator[Any]:
    """lm-eval's model wrapper: HFLM around the already loaded `model` and `tokenizer`, or lm-eval's
    local-completions against vLLM's server on the weights at `source`, started for the scoring and stopped after."""
    if engine == "transformers":
        from lm_eval.models.huggingface import HFLM

        yield HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.batch_size)
        return
    max_len = vllm.context(source, revision)
    flags = vllm_server.model_flags(name=vllm_server.SERVED_NAME, dtype=dtype, max_model_len=max_len,
                                    gpu_memory_utilization=vllm.gpu_memory_utilization, revision=revision, seed=seed)
    with vllm_server.running(vllm, source, flags, what=f"lm-eval on {source}") as server, \
            served_language_model(server, tokenizer, ev=ev, max_length=max_len, seed=seed) as lm:
        yield lm


@contextlib.contextmanager
def served_language_model(server: vllm_server.Server, tokenizer: Any, *, ev: EvaluateParams, max_length: int,
                          seed: int, model: str | None = None) -> Iterator[Any]:
    """lm-eval's local-completions model on a running vLLM server (`model`: a name it serves, by default its
    model). `tokenizer` (saved to a temporary directory, its chat template included) renders and tokenizes every
    request here, as HFLM does, and the server gets token ids: the same inputs as the transformers engine's.
    Requests go `ev.batch_size` at a time, so vLLM batches them."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with tempfile.TemporaryDirectory(prefix="skytune-eval-tokenizer-") as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        yield LocalCompletionsAPI(base_url=f"{server.url}{vllm_server.COMPLETIONS_ROUTE}",
                                  model=model or server.model, tokenizer=tokenizer_dir,
                                  tokenizer_backend="huggingface", tokenized_requests=True, max_length=max_length,
                                  num_concurrent=ev.batch_size, seed=seed, timeout=vllm_server.REQUEST_TIMEOUT_S)


def score(load: Callable[[], Any], tokenizer: Any, *, source: str, revision: str | None, ev: EvaluateParams,
          vllm: Vllm, tasks_dir: Path, pin_file: Path, dtype: str, seed: int) -> tuple[Scores, Any]:
    """Score the model at `source` on `ev.tasks` with lm-eval on `ev.engine`, seeded with `seed`; return the scores
    and the model as transformers loads it (`load()`), for what follows. On the transformers engine that model is
    the one scored; on vLLM's it is loaded after vLLM's server lets go of the GPU (both at once may not fit)."""
    check_version(pin_file)  # before lm-eval is imported: a missing or other version is one clear error
    engine = generation.resolve_engine(ev.engine, vllm, "evaluate.engine")
    model = load() if engine == "transformers" else None
    with language_model(engine, model=model, tokenizer=tokenizer, source=source, revision=revision, ev=ev,
                        vllm=vllm, dtype=dtype, seed=seed) as lm:
        scores = evaluate(lm, ev=ev, tasks_dir=tasks_dir, pin_file=pin_file, seed=seed, engine=engine,
                          chat=chat_template_on(ev.apply_chat_template, tokenizer))
    return scores, (model if model is not None else load())


def evaluate(lm: Any, *, ev: EvaluateParams, tasks_dir: Path, pin_file: Path, seed: int, engine: str,
             chat: bool) -> Scores:
    """Score lm-eval's model `lm` on `ev.tasks` through lm-eval's own `simple_evaluate` (`chat`: through the
    model's chat template, few-shot examples as turns)."""
    from lm_eval import simple_evaluate

    version = check_version(pin_file)
    manager = task_manager(ev.tasks, tasks_dir)
    tasks, recorded = load_tasks(manager, ev.tasks, tasks_dir, ev.max_gen_toks)
    log.info("lm-eval %s, %s engine, chat template %s: %s", version, engine, "on" if chat else "off",
             ", ".join(recorded))
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=ev.num_fewshot, limit=ev.limit,
                          apply_chat_template=chat, fewshot_as_multiturn=chat, log_samples=True,
                          bootstrap_iters=BOOTSTRAP_ITERS,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    return _scores(out, recorded, engine, version)


def _scores(out: dict[str, Any], recorded: list[str], engine: str, version: str) -> Scores:
    """The numbers of simple_evaluate's output for the `recorded` tasks (lm-eval's "N/A" left out)."""
    values: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    directions: dict[str, dict[str, bool]] = {}
    examples: dict[str, int] = {}
    for name in recorded:
        entry = out["results"].get(name, {})
        higher = out.get("higher_is_better", {}).get(name, {})
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            base_metric = metric.removesuffix("_stderr")
            label = base_metric if filt == "none" else f"{base_metric}_{filt}"
            if metric.endswith("_stderr"):
                stderr.setdefault(name, {})[label] = float(value)
                continue
            values.setdefault(name, {})[label] = float(value)
            directions.setdefault(name, {})[label] = bool(higher.get(metric, True))
        counts = out.get("n-samples", {}).get(name)
        examples[name] = int(counts["effective"]) if counts else int(entry.get("sample_len", 0))
        if name not in values:
            raise SkytuneError(f"evaluate.tasks: {name}: lm-eval gave no score (results: {entry})")
    items = {name: _items(out, name, values[name]) for name in recorded}
    return Scores(values, stderr, directions, examples, engine, version, items)


def _leaves(out: dict[str, Any], name: str) -> list[str]:
    """The tasks whose samples make up `name`'s score: itself, or a group's subtasks, recursively."""
    if name in out.get("samples", {}):
        return [name]
    return [leaf for sub in out.get("group_subtasks", {}).get(name, []) for leaf in _leaves(out, sub)]


def _item_value(value: Any) -> list[float] | None:
    """A sample's metric value as (numerator, count): a score, or a list of scores (one per instruction); None for
    what is not a mean of per-item numbers (a corpus-level metric's tuple, say)."""
    if isinstance(value, bool | int | float):
        return [float(value), 1.0]
    if isinstance(value, list) and value and all(isinstance(v, bool | int | float) for v in value):
        return [float(sum(value)), float(len(value))]
    return None


def _items(out: dict[str, Any], name: str, scores: dict[str, float]) -> dict[str, Any]:
    """`name`'s per-item scores from lm-eval's logged samples, in item order, for each metric whose lm-eval score
    they reproduce (sum of numerators / sum of counts within 1e-6): a metric lm-eval aggregates otherwise has none,
    and is compared without a paired test."""
    ids: list[str] = []
    per_metric: dict[str, list[list[float] | None]] = {}
    for leaf in _leaves(out, name):
        samples = sorted(out["samples"][leaf], key=lambda s: (s["filter"], s["doc_id"]))
        for sample in samples:
            if sample["filter"] == samples[0]["filter"]:
                ids.append(f"{leaf}/{sample['doc_id']}")
            for metric in sample["metrics"]:
                label = metric if sample["filter"] == "none" else f"{metric}_{sample['filter']}"
                per_metric.setdefault(label, []).append(_item_value(sample[metric]))
    kept = {}
    for label, pairs in per_metric.items():
        if label not in scores or len(pairs) != len(ids) or any(p is None for p in pairs):
            continue
        numerator, count = (sum(p[i] for p in pairs if p is not None) for i in (0, 1))
        if count and abs(numerator / count - scores[label]) <= 1e-6:
            kept[label] = pairs
    return {"ids": ids, "metrics": kept}
