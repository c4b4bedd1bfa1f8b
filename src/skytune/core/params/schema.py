"""The schema of params.yaml: the one place that knows its keys, their types and their bounds.

`loading.load_params()` checks params.yaml against these frozen dataclasses. Defaults are not written here:
params.yaml is the single source of truth, so every key must be present there. The one exception is the optional
keys of a list item (a data source), which default to None.
A dataclass may define `_problems()` for checks across its keys (say, exactly one of `path` and `hub`): each a
message, or a (key below it, message) pair said at that key's line.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    replay_dir: str
    replay_metrics: str
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
    preference_adapter_dir: str
    preference_dvclive_dir: str
    preference_metrics: str
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
    accelerate_dir: str
    train_samples: str
    checkpoint_dir: str
    vllm_env: str
    lm_eval_pin: str
    eval_tasks_dir: str
    general_prompts: str
    base_scores_dir: str
    eval_metrics: str
    eval_plot: str


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


# The names the code dispatches on are written here once; the modules that implement them read these lists.
Loss = Literal["assistant_only", "completion_only", "full"]
Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "orca", "summarization", "columns",
                 "preference", "self_replay"]


@dataclass(frozen=True)
class SharegptTags:
    """What a ShareGPT variant calls its keys and speakers (LLaMA-Factory's dataset_info.json `tags`); unset ones
    keep ShareGPT's own: from, value, human, gpt, system, function_call, observation."""

    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    system_tag: str | None = None
    function_tag: str | None = None  # the assistant calling a tool: the turn's value is the JSON of the call(s)
    observation_tag: str | None = None  # a tool's result


# LLaMA-Factory's column names a sharegpt source may map: `chosen` and `rejected` make it ShareGPT ranking
# (preference data), `kto_tag` names a row's true/false label, `tools` its function schemas.
SHAREGPT_COLUMNS = ("messages", "system", "tools", "chosen", "rejected", "kto_tag")
COLUMNS_ROLES = ("system", "user", "assistant", "tools", "kto_tag")  # what format `columns` maps to column names


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
    # Text replaced in every message at to_chat: {"{{name}}": "${identity.name}"}; a value may name
    # ${identity.name} and ${identity.creator}.
    replace: dict[str, str] | None = None
    tags: SharegptTags | None = None  # format sharegpt: the keys and speakers of a ShareGPT variant

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
        known = {"sharegpt": SHAREGPT_COLUMNS, "columns": COLUMNS_ROLES}.get(self.format, ())
        for column in sorted(set(self.columns or ()) - set(known)) if known else ():
            close = difflib.get_close_matches(column, known, n=1)
            problems.append(f"columns.{column}: format {self.format} maps only {', '.join(known)}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        if self.format == "sharegpt" and self.columns and ("chosen" in self.columns) != ("rejected" in self.columns):
            problems.append("columns: ShareGPT ranking maps both `chosen` and `rejected`")
        if self.tags is not None and self.format != "sharegpt":
            problems.append("`tags` are for format sharegpt")
        if self.format == "self_replay":
            given = [k for k in ("instruction", "columns", "replace") if getattr(self, k) is not None]
            if given:
                problems.append(f"format self_replay takes no {', '.join(f'`{k}`' for k in given)}: the base answers "
                                "the prompts as the rows write them")
        return problems


@dataclass(frozen=True)
class DataParams:
    sources: tuple[SourceParams, ...]
    on_invalid: Literal["error", "skip"]
    max_reject_fraction: float = _range(ge=0.0, le=1.0)
    length_policy: Literal["drop", "truncate"]
    reasoning: Literal["keep", "drop"]


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

    fraction: float | None = field(default=None, metadata={"ge": 0.0})  # 0: none of the source
    rows: int | None = field(default=None, metadata={"ge": 0})

    def _problems(self) -> list[str]:
        return [] if (self.fraction is None) != (self.rows is None) else ["give exactly one of `fraction` and `rows`"]


@dataclass(frozen=True)
class MergeDataParams:
    mixture: dict[str, MixParams]


Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


def _batch_problems(total_batch_size: Any, batch_size: Any) -> list[str]:
    """A total batch that the per-step batch does not divide (gradient accumulation would not hold it exactly)."""
    if all(isinstance(v, int) and v > 0 for v in (total_batch_size, batch_size)) and total_batch_size % batch_size:
        return [f"total_batch_size ({total_batch_size}) must be a multiple of batch_size ({batch_size}): gradient "
                "accumulation = total / (batch_size x processes)"]
    return []


@dataclass(frozen=True)
class TrainParams:
    method: Literal["qlora", "lora", "full", "none"]
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]
    lora_r: int = _range(ge=1)
    lora_alpha: int = _range(ge=1)
    lora_dropout: float = _range(ge=0.0, lt=1.0)
    target_modules: str | tuple[str, ...]
    use_rslora: bool
    use_dora: bool
    loss: Loss
    batching: Literal["padding_free", "packing", "padded"]
    learning_rate: float = _range(gt=0.0)
    lr_scheduler: Scheduler
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
        problems = _batch_problems(self.total_batch_size, self.batch_size)
        if self.use_dora and self.method == "full":
            problems.append("use_dora is a LoRA option; method full trains every weight")
        return problems


PreferenceMethod = Literal["none", "dpo", "kto", "orpo", "simpo"]


@dataclass(frozen=True)
class PreferenceParams:
    """Preference training after SFT, continuing from its adapter, through TRL's trainers; or, with
    `train.method: none`, from the base, on a new `adapter` shaped by train's lora_* keys."""

    method: PreferenceMethod
    adapter: Literal["qlora", "lora"]
    beta: float = _range(gt=0.0)
    simpo_gamma: float = _range(ge=0.0)
    desirable_weight: float = _range(gt=0.0)
    undesirable_weight: float = _range(gt=0.0)
    learning_rate: float = _range(gt=0.0)
    lr_scheduler: Scheduler
    warmup_ratio: float = _range(ge=0.0, lt=1.0)
    epochs: float = _range(gt=0.0)
    batch_size: int = _range(ge=1)
    total_batch_size: int = _range(ge=1)
    max_length: int = _range(ge=16)
    logging_steps: int = _range(ge=1)
    eval_steps: int = _range(ge=1)
    save_steps: int = _range(ge=1)

    def _problems(self) -> list[str]:
        return _batch_problems(self.total_batch_size, self.batch_size)


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
class SelfReplayParams:
    """The base's own greedy answers to the prompts of the `self_replay` sources (self-distillation)."""

    engine: Engine
    max_new_tokens: int = _range(ge=1)
    batch_size: int = _range(ge=1)


@dataclass(frozen=True)
class SanityCheckParams:
    engine: Engine
    val_records: int = _range(ge=0)
    perplexity_records: int = _range(ge=0)
    max_new_tokens: int = _range(ge=1)
    batch_size: int = _range(ge=1)


@dataclass(frozen=True)
class GeneralTextParams:
    """Forgetting without a benchmark: text the base writes once for generic prompts, scored base vs tuned."""

    prompts: int = _range(ge=0)
    max_new_tokens: int = _range(ge=1)


@dataclass(frozen=True)
class EvaluateParams:
    tasks: tuple[str, ...]
    limit: int | None = _range(ge=1)
    num_fewshot: int | None = _range(ge=0)
    apply_chat_template: bool | Literal["auto"]
    batch_size: int = _range(ge=1)
    max_gen_toks: int | None = _range(ge=1)
    engine: Engine
    max_regression: float = _range(ge=0.0)
    max_perplexity_increase: float = _range(ge=0.0)
    alpha: float = _range(gt=0.0, lt=1.0)
    fail_on_regression: bool
    general_text: GeneralTextParams

    def _problems(self) -> list[str]:
        if isinstance(self.tasks, tuple) and len(set(self.tasks)) != len(self.tasks):
            return [f"tasks: {list(self.tasks)} names a task twice"]
        return []


# The ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ExportParams:
    formats: tuple[Literal["merged", "adapter", "gguf"], ...]
    max_lora_rank: int
    adapter_name: str
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0"]
    parity: bool | Literal["auto"]

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
class VllmParams:
    """vLLM, wherever it runs: the sanity check's and evaluate's `vllm` engine, export's parity, make serve."""

    max_model_len: int = _range(ge=64)
    gpu_memory_utilization: float = _range(gt=0.0, le=1.0)
    cpu_kv_cache_gb: int = _range(ge=1)


@dataclass(frozen=True)
class Params:
    base: BaseParams
    paths: PathsParams
    model: ModelParams
    data: DataParams
    identity: IdentityParams
    self_replay: SelfReplayParams
    split: SplitParams
    merge_data: MergeDataParams
    train: TrainParams
    preference: PreferenceParams
    merge_adapters: MergeAdaptersParams
    sanity_check: SanityCheckParams
    evaluate: EvaluateParams
    export: ExportParams
    vllm: VllmParams

    def _problems(self) -> list[tuple[str, str]]:
        # (A section with a key missing is None here.)
        if getattr(self.train, "method", None) == "none" and getattr(self.preference, "method", None) == "none":
            return [("train.method", "none, and preference.method is none too: nothing would be trained. Set "
                     "preference.method (dpo, kto, orpo or simpo: preference training from the base), or a "
                     "train.method")]
        return []


def adapter_method(train: TrainParams, preference: PreferenceParams) -> str:
    """How the tuned model's weights were adapted: `train.method`, or with `train.method: none` (no SFT), the adapter
    the preference stage trains from the base (`preference.adapter`). Both keys are read, whichever applies."""
    method, fresh = train.method, preference.adapter
    return fresh if method == "none" else method
