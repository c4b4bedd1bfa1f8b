"""The schema of params.yaml and its loader: the one place that knows the keys and their types.

`load_params()` reads params.yaml, checks every key against the frozen dataclasses below and raises one
`ParamsError` listing every problem (unknown key with the closest valid one, wrong type, value out of range,
missing key), each with the file and line, before any stage does heavy work.

Defaults are not written here: params.yaml is the single source of truth, so every key must be present there.
The one exception is the optional keys of a list item (a data source), which default to None.
A dataclass may define `_problems()` for checks across its keys (say, exactly one of `path` and `hub`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")


def _range(**bounds: float) -> Any:
    """A dataclass field carrying range bounds (ge, gt, le, lt) checked by the loader."""
    return field(metadata=bounds)


@dataclass(frozen=True)
class BaseParams:
    seed: int = _range(ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True)
class PathsParams:
    raw_dir: str
    ingested_dir: str
    base_model_dir: str
    chat_dir: str
    split_dir: str
    train_file: str
    val_file: str
    to_chat_metrics: str
    data_metrics: str
    length_plot: str
    preference_dir: str
    adapter_dir: str
    dvclive_dir: str
    train_metrics: str
    merged_dir: str
    merge_metrics: str
    sanity_prompts: str
    retained_prompts: str
    sanity_results: str
    sanity_metrics: str
    sanity_report: str
    sanity_plot: str
    export_dir: str
    export_metrics: str
    report_dir: str
    templates_dir: str
    train_samples: str
    checkpoint_dir: str


@dataclass(frozen=True)
class BuiltinModelParams:
    vocab_size: int = _range(ge=300)
    hidden_size: int = _range(ge=64)
    intermediate_size: int = _range(ge=64)
    num_layers: int = _range(ge=1)
    num_heads: int = _range(ge=1)
    num_kv_heads: int = _range(ge=1)
    max_position_embeddings: int = _range(ge=64)


@dataclass(frozen=True)
class ModelParams:
    base: str
    revision: str | None
    chat_template: str
    pad_token: Literal["auto", "unused", "unk", "bos", "add"]
    builtin: BuiltinModelParams

    def _problems(self) -> list[str]:
        if not isinstance(self.chat_template, str) or self.chat_template in ("keep", "chatml") or \
                self.chat_template.endswith((".jinja", ".j2")):
            return []
        return [f"chat_template: {self.chat_template!r} is neither keep, chatml nor a .jinja file"]


Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "orca", "summarization", "columns",
                 "preference"]


@dataclass(frozen=True)
class SourceParams:
    """One raw source: a local file or glob under `paths.raw_dir` (`path`), or a hub dataset (`hub`)."""

    name: str
    format: Format
    path: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    max_samples: int | None = field(default=None, metadata={"ge": 1})
    instruction: str | None = None
    columns: dict[str, str] | None = None

    def _problems(self) -> list[str]:
        problems = []
        if (self.path is None) == (self.hub is None):
            problems.append("give exactly one of `path` (a file or glob under paths.raw_dir) and `hub`")
        if self.hub is None and (self.config or self.split or self.revision):
            problems.append("`config`, `split` and `revision` are for hub sources only")
        if self.format == "summarization" and not self.instruction:
            problems.append("format summarization needs `instruction`")
        if self.format == "columns" and not (self.columns and {"user", "assistant"} <= self.columns.keys()):
            problems.append("format columns needs `columns` with at least `user` and `assistant`")
        return problems


@dataclass(frozen=True)
class DataParams:
    sources: tuple[SourceParams, ...]
    on_invalid: Literal["error", "skip"]
    max_reject_fraction: float = _range(ge=0.0, le=1.0)
    length_policy: Literal["drop", "truncate"]


@dataclass(frozen=True)
class IdentityParams:
    enabled: bool
    name: str
    creator: str
    num_samples: int = _range(ge=0)


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = _range(gt=0.0, lt=1.0)
    val_fraction_by_source: dict[str, float]

    def _problems(self) -> list[str]:
        return [f"val_fraction_by_source.{name}: {value} is out of range, must be in [0, 1)"
                for name, value in self.val_fraction_by_source.items()
                if isinstance(value, float) and not 0.0 <= value < 1.0]


@dataclass(frozen=True)
class MixParams:
    """How much of a source's train rows the mixture takes: a `fraction` (above 1 repeats rows) or `rows`."""

    fraction: float | None = field(default=None, metadata={"gt": 0.0})
    rows: int | None = field(default=None, metadata={"ge": 0})

    def _problems(self) -> list[str]:
        return [] if (self.fraction is None) != (self.rows is None) else ["give exactly one of `fraction` and `rows`"]


@dataclass(frozen=True)
class MergeDataParams:
    mixture: dict[str, MixParams]


@dataclass(frozen=True)
class TrainParams:
    method: Literal["qlora", "lora", "full"]
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]
    lora_r: int = _range(ge=1)
    lora_alpha: int = _range(ge=1)
    lora_dropout: float = _range(ge=0.0, lt=1.0)
    target_modules: str | tuple[str, ...]
    use_rslora: bool
    use_dora: bool
    loss: Literal["assistant_only", "completion_only", "full"]
    batching: Literal["padding_free", "packing", "padded"]
    learning_rate: float = _range(gt=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_ratio: float = _range(ge=0.0, lt=1.0)
    weight_decay: float = _range(ge=0.0)
    epochs: float = _range(gt=0.0)
    batch_size: int = _range(ge=1)
    total_batch_size: int = _range(ge=1)
    max_length: int = _range(ge=16)
    gradient_checkpointing: bool
    logging_steps: int = _range(ge=1)
    eval_steps: int = _range(ge=1)
    save_steps: int = _range(ge=1)
    save_total_limit: int = _range(ge=1)
    gate_samples: int = _range(ge=0)
    distributed: Literal["ddp", "fsdp_qlora"]

    def _problems(self) -> list[str]:
        problems = []
        sizes = (self.total_batch_size, self.batch_size)
        if all(isinstance(v, int) and v > 0 for v in sizes) and self.total_batch_size % self.batch_size:
            problems.append(f"total_batch_size ({self.total_batch_size}) must be a multiple of batch_size "
                            f"({self.batch_size}): gradient accumulation = total / (batch_size x processes)")
        if self.use_dora and self.method == "full":
            problems.append("use_dora is a LoRA option; method full trains every weight")
        return problems


@dataclass(frozen=True)
class MergeAdaptersParams:
    logit_check_records: int = _range(ge=1)
    onto: Literal["dequantized", "original"]
    max_shard_size: str

    def _problems(self) -> list[str]:
        if isinstance(self.max_shard_size, str) and not re.fullmatch(r"\d+(\.\d+)?(KB|MB|GB|KiB|MiB|GiB)",
                                                                     self.max_shard_size):
            return [f"max_shard_size: {self.max_shard_size!r} is not a size like 2GB or 500MB"]
        return []


Engine = Literal["auto", "vllm", "transformers"]


@dataclass(frozen=True)
class SanityCheckParams:
    engine: Engine
    val_records: int = _range(ge=0)
    perplexity_records: int = _range(ge=0)
    max_new_tokens: int = _range(ge=1)
    batch_size: int = _range(ge=1)


# The ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ExportParams:
    formats: tuple[Literal["merged", "adapter", "gguf"], ...]
    max_lora_rank: int
    adapter_name: str
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0"]
    parity: Literal["auto", "off"]

    def _problems(self) -> list[str]:
        problems = []
        if isinstance(self.formats, tuple) and not self.formats:
            problems.append("formats: name at least one of merged, adapter, gguf")
        if isinstance(self.formats, tuple) and len(set(self.formats)) != len(self.formats):
            problems.append(f"formats: {list(self.formats)} names a format twice")
        if isinstance(self.max_lora_rank, int) and self.max_lora_rank not in VLLM_LORA_RANKS:
            problems.append(f"max_lora_rank: {self.max_lora_rank} is not a rank vLLM serves; one of "
                            f"{list(VLLM_LORA_RANKS)}")
        if isinstance(self.adapter_name, str) and not self.adapter_name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"adapter_name: {self.adapter_name!r} must be letters, digits, - and _ "
                            "(it is the model name clients send to vLLM)")
        return problems


@dataclass(frozen=True)
class Params:
    base: BaseParams
    paths: PathsParams
    model: ModelParams
    data: DataParams
    identity: IdentityParams
    split: SplitParams
    merge_data: MergeDataParams
    train: TrainParams
    merge_adapters: MergeAdaptersParams
    sanity_check: SanityCheckParams
    export: ExportParams


class ParamsError(ValueError):
    """Every problem found in a params file, one per line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in the parameters:\n{lines}")


# --------------------------------------------------------------------------------------------- loading


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate a params file; raise ParamsError naming every problem at once."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(path, [f"file not found (cwd: {Path.cwd()}); run from the repository root"])
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ParamsError(path, [f"not valid YAML: {exc}"]) from exc
    problems: list[str] = []
    params = _build(Params, node, "", path, problems)
    if problems:
        raise ParamsError(path, problems)
    return params


def _where(path: Path, node: yaml.Node | None, key: str) -> str:
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    return f"{path}{line} {key or '<root>'}"


def _build(tp: Any, node: yaml.Node, key: str, path: Path, problems: list[str]) -> Any:
    """Convert a YAML node into `tp`, appending every problem found to `problems`."""
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, node, key, path, problems)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # Try each member quietly; report against the first if none fits.
        for member in args:
            trial: list[str] = []
            value = _build(member, node, key, path, trial)
            if not trial:
                return value
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        problems.append(f"{_where(path, node, key)}: expected {names}, got {_describe(node)}")
        return None
    if tp is type(None):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        problems.append(f"{_where(path, node, key)}: expected null, got {_describe(node)}")
        return None
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            problems.append(f"{_where(path, node, key)}: expected a mapping, got {_describe(node)}")
            return {}
        return {str(k.value): _build(args[1], v, f"{key}.{k.value}", path, problems) for k, v in node.value}
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            problems.append(f"{_where(path, node, key)}: expected a list, got {_describe(node)}")
            return ()
        return tuple(_build(args[0], item, f"{key}[{i}]", path, problems) for i, item in enumerate(node.value))
    if origin is Literal:
        value = _scalar(node)
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{_where(path, node, key)}: {value!r} is not one of {list(args)}{hint}")
        return value
    if tp in (int, float, str, bool):
        return _build_scalar(tp, node, key, path, problems)
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # a bug in this module, not in the file


def _build_dataclass(tp: Any, node: yaml.Node, key: str, path: Path, problems: list[str]) -> Any:
    if not isinstance(node, yaml.MappingNode):
        problems.append(f"{_where(path, node, key)}: expected a mapping, got {_describe(node)}")
        return None
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    values: dict[str, Any] = {}
    seen: set[str] = set()
    for key_node, value_node in node.value:
        name = str(key_node.value)
        full = f"{key}.{name}" if key else name
        if name in seen:
            problems.append(f"{_where(path, key_node, full)}: key given twice")
            continue
        seen.add(name)
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{(key + '.') if key else ''}{close[0]}'?" if close else ""
            problems.append(f"{_where(path, key_node, full)}: unknown key{hint} (valid here: {', '.join(fields)})")
            continue
        value = _build(hints[name], value_node, full, path, problems)
        _check_range(fields[name], value, value_node, full, path, problems)
        values[name] = value
    for name, f in fields.items():
        if name not in seen and f.default is dataclasses.MISSING:
            full = f"{key}.{name}" if key else name
            problems.append(f"{_where(path, node, full)}: missing key '{full}'")
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    if not required <= values.keys():
        return None
    obj = tp(**values)
    check = getattr(obj, "_problems", None)
    if check is not None:
        problems.extend(f"{_where(path, node, key)}: {p}" for p in check())
    return obj



_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _build_scalar(tp: type, node: yaml.Node, key: str, path: Path, problems: list[str]) -> Any:
    value = _scalar(node)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if tp is float and isinstance(value, str) and node.style is None and _FLOAT.fullmatch(value):
        value, ok = float(value), True  # YAML 1.1 reads a plain 1e-4 (as `dvc exp run -S` writes it) as a string
    if tp is str and isinstance(value, str):
        ok = True
    if not ok:
        problems.append(f"{_where(path, node, key)}: expected {_type_name(tp)}, got {_describe(node)}")
        return None
    return value


def _check_range(f: dataclasses.Field, value: Any, node: yaml.Node, key: str, path: Path, problems: list[str]) -> None:
    if not f.metadata or not isinstance(value, int | float) or isinstance(value, bool):
        return
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in f.metadata.items():
        test, sign = checks[name]
        if not test(value, bound):
            problems.append(f"{_where(path, node, key)}: {value} is out of range, must be {sign} {bound}")


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node  # compared against scalars it fails, and _describe names it
    return yaml.SafeLoader("").construct_object(node)


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = _scalar(node)
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------- access tracking


class TrackedParams:
    """A read-only view of a params dataclass that records every leaf key read through it.

    Used by the tests to check that dvc.yaml declares exactly the params each stage reads. A tuple of
    dataclasses (a list in YAML, such as `data.sources`) counts as one leaf: DVC tracks it as one key.
    """

    def __init__(self, obj: Any, prefix: str = "", reads: set[str] | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "reads", reads if reads is not None else set())

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        key = f"{self._prefix}{name}"
        if dataclasses.is_dataclass(value):
            return TrackedParams(value, f"{key}.", self.reads)
        self.reads.add(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(name)


def to_dict(section: Any) -> dict[str, Any]:
    """A params section as plain data (for JSON); read through a TrackedParams view, every key counts as read."""
    if isinstance(section, TrackedParams):
        return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section._obj)}
    return dataclasses.asdict(section)


def _plain(value: Any) -> Any:
    if isinstance(value, TrackedParams):
        return to_dict(value)
    if isinstance(value, tuple):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value
