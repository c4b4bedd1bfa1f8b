"""Models: resolving the base model, building the built-in small model, loading with or without 4-bit.

A base model is described by a `BaseModel` manifest (written by the ingest stage, read by every later stage):
- a hub id resolved to the commit it points at, so a moving branch never changes a finished experiment, and
  no multi-GB weights are tracked by DVC (they come from the hub cache at the recorded commit);
- a GGUF file (`gguf_models`), recorded by its sha256 and converted once per machine into a cache outside DVC;
- or the built-in model, built deterministically from the seed into the manifest's own directory.

`location(base)` is where `from_pretrained` finds a base on this machine.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from skytune import chat_template, gguf_models

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-llama",)
MANIFEST = "base_model.json"


@dataclass(frozen=True)
class BaseModel:
    """Where the base model lives and how its tokenizer is set up for training and serving.

    `ref` is what `from_pretrained` takes (for a GGUF base, the file as params.yaml names it: `location()` gives the
    converted checkpoint); `revision` a commit hash or None; `chat_template` the exact template text every later
    stage uses (resolved once, at ingest, from `model.chat_template`); `pad_token` the pad strategy; `gguf` what
    `gguf_models.describe` recorded of a GGUF base (sha256, quantization, converter versions).
    """

    kind: str  # "builtin" | "hub" | "local" | "gguf"
    name: str
    ref: str
    revision: str | None
    chat_template: str
    pad_token: str
    gguf: dict[str, Any] | None = None

    def save(self, directory: Path) -> None:
        from skytune.atomic import write_json

        write_json(directory / MANIFEST, asdict(self))

    @classmethod
    def load(cls, directory: Path | str) -> BaseModel:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def resolve_hub(repo_id: str, revision: str | None) -> str:
    """The commit hash `revision` (a branch, tag or commit; None = main) of a hub model points at.

    Online it asks the hub; with HF_HUB_OFFLINE=1 it reads the local cache. Gated models need HF_TOKEN.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        if offline:
            folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
            return Path(folder).name
        return HfApi().model_info(repo_id, revision=revision).sha
    except LocalEntryNotFoundError as exc:
        raise RuntimeError(
            f"model.base {repo_id!r} (revision {revision!r}) is not in the local Hugging Face cache and "
            "HF_HUB_OFFLINE=1 is set: download it once online, or unset HF_HUB_OFFLINE"
        ) from exc
    except HfHubHTTPError as exc:
        raise RuntimeError(
            f"model.base {repo_id!r} (revision {revision!r}) could not be resolved on the hub: {exc}. "
            "Check the id and revision; for a gated model set HF_TOKEN to a token with access."
        ) from exc


def resolve_base(base: str, revision: str | None, builtin_dir: Path) -> tuple[str, str, str, str | None]:
    """Where `base` (a built-in name, a GGUF file, a local directory, or a hub id) lives: (kind, name, ref, commit)."""
    if base.startswith(BUILTIN_PREFIX):
        if base not in BUILTIN_MODELS:
            raise ValueError(f"model.base: unknown built-in model {base!r}; known: {', '.join(BUILTIN_MODELS)}")
        return "builtin", base, str(builtin_dir), None
    if gguf_models.is_gguf(base):
        return "gguf", base, base, None
    if Path(base).is_dir():
        return "local", base, str(Path(base).resolve()), None
    return "hub", base, base, resolve_hub(base, revision)


def describe_base(kind: str, name: str, ref: str, revision: str | None, *, template: str, pad_token: str) -> BaseModel:
    """The manifest of a resolved base: its tokenizer's chat template resolved by the `template` strategy
    (`chat_template.resolve_template`) and checked to work with the `pad_token` strategy. A GGUF base is described
    by its file (sha256, quantization) and converted here if this machine has not converted it yet."""
    from transformers import AutoTokenizer

    source = gguf_models.describe(ref) if kind == "gguf" else None
    base = BaseModel(kind, name, ref, revision, "", pad_token, source)
    tokenizer = AutoTokenizer.from_pretrained(location(base), revision=revision)
    text, notes = chat_template.resolve_template(tokenizer, template)
    for note in notes:
        log.info("chat template (%s): %s", template, note)
    base = BaseModel(kind, name, ref, revision, text, pad_token, source)
    load_tokenizer(base)  # fails now, at ingest, on a template that cannot end a turn or a pad strategy with no token
    return base


def location(base: BaseModel) -> str:
    """Where `from_pretrained` finds the base on this machine: the converted checkpoint of a GGUF base (converted on
    first use), else `base.ref`."""
    if base.kind == "gguf":
        assert base.gguf is not None, "a GGUF manifest records its source"
        return str(gguf_models.materialize(base.gguf))
    return base.ref


def build_builtin(
    out_dir: Path,
    corpus: Iterable[str],
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    seed: int,
) -> None:
    """Build the built-in model into `out_dir`: a random Llama with a byte-level BPE tokenizer trained on
    `corpus` and a ChatML template with generation markers. Same inputs and seed, same files. No network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = [*chat_template.CHATML_SPECIAL_TOKENS.values(), *chat_template.CHATML_EXTRA_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    special = chat_template.CHATML_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special["pad"],
        additional_special_tokens=chat_template.CHATML_EXTRA_TOKENS,
        model_max_length=max_position_embeddings,
    )
    tokenizer.chat_template = chat_template.CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(base: BaseModel) -> Any:
    """The base model's tokenizer as every stage must see it: the manifest's chat template and a pad token
    distinct from EOS/end-of-turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location(base), revision=base.revision)
    tokenizer.chat_template = base.chat_template
    chat_template.ensure_pad_token(tokenizer, base.pad_token)
    return tokenizer


def load_saved_tokenizer(directory: str | Path) -> Any:
    """A tokenizer saved by a training stage (adapter, merged model): template and pad token travel with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.chat_template is None:
        raise ValueError(f"{directory}: the saved tokenizer has no chat template; re-run the train stage")
    chat_template.ensure_pad_token(tokenizer, "auto")
    return tokenizer


def fit_embeddings(model: Any, tokenizer: Any) -> bool:
    """Grow the model's embeddings when the tokenizer has more tokens than rows (`model.pad_token: add` on a model
    without spare rows); new rows are the mean of the old ones. Returns whether they grew."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    log.info("embeddings grown from %d to %d rows for the tokens added to the tokenizer", rows, len(tokenizer))
    return True


def fsdp_enabled() -> bool:
    """Whether this process was started by `accelerate launch` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def device_map() -> dict[str, Any] | None:
    """Where a process puts the whole model: its own GPU (LOCAL_RANK under torchrun/accelerate), or the CPU.
    None under FSDP, which shards the model itself."""
    if fsdp_enabled():
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def compute_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def four_bit_supported() -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit runs on this machine, and why not if it does not."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:  # pragma: no cover - bitsandbytes is pinned in requirements.txt
        return False, f"bitsandbytes is not importable: {exc}"
    if torch.cuda.is_available() or not torch.backends.mps.is_available():
        return True, ""
    return False, "bitsandbytes has no 4-bit kernels for Apple MPS"


def disable_cpu_inference_repack(model: torch.nn.Module) -> int:
    """Work around bitsandbytes 0.50's silent wrong gradients on CPUs with AVX512-BF16.

    `Linear4bit.forward` repacks its weight, for good, into a CPU inference layout the first time it runs in eval
    mode on an input that needs no grad (any `evaluate()` or `generate()`); from then on the backward pass through
    the frozen base weight is dropped with only a warning, so LoRA gets wrong gradients. Turning the repack off
    keeps the trainable layout. Returns how many layers were changed.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_for_training(
    base: BaseModel,
    *,
    four_bit: bool,
    quant_type: str,
    double_quant: bool,
    dtype: torch.dtype,
) -> tuple[Any, str]:
    """Load the base model for (Q)LoRA; return it and what actually ran ("nf4", "fp4" or the dtype name)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"revision": base.revision, "dtype": dtype, "device_map": device_map()}
    ran = str(dtype).removeprefix("torch.")
    if four_bit:
        ok, why = four_bit_supported()
        if ok:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant_type,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=dtype,
            )
            ran = quant_type
        else:
            log.warning("4-bit QLoRA is not available here (%s): training plain LoRA in %s instead", why, ran)
    try:
        model = AutoModelForCausalLM.from_pretrained(location(base), **kwargs)
    except (RuntimeError, ImportError) as exc:  # bitsandbytes present but without kernels for this device
        if "quantization_config" not in kwargs:
            raise
        del kwargs["quantization_config"]
        ran = str(dtype).removeprefix("torch.")
        log.warning("4-bit QLoRA failed to load here (%s): training plain LoRA in %s instead", exc, ran)
        model = AutoModelForCausalLM.from_pretrained(location(base), **kwargs)
    if ran in ("nf4", "fp4") and not torch.cuda.is_available():
        n = disable_cpu_inference_repack(model)
        log.info("4-bit on CPU: disabled the AVX512-BF16 inference repack on %d layers (bitsandbytes bug)", n)
    return model, ran


def load_full_precision(source: str | Path, revision: str | None, dtype: torch.dtype) -> Any:
    """Load a model unquantized in `dtype`, on the GPU if there is one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), revision=revision, dtype=dtype, device_map=device_map())
    model.eval()
    return model
