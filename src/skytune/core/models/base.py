"""The base model: what `model.base` names (a built-in model, a GGUF file, a local directory or a hub id), resolved
once by the ingest stage into a `BaseModel` manifest that every later stage reads.

- a hub id is resolved to the commit it points at, so a moving branch never changes a finished experiment, and no
  multi-GB weights are tracked by DVC (they come from the hub cache at the recorded commit);
- a GGUF file (`gguf`) is recorded by its sha256 and converted once per machine into a cache outside DVC;
- the built-in model is built deterministically from the seed into the manifest's own directory.

`location(base)` is where `from_pretrained` finds a base on this machine; `load_tokenizer(base)` its tokenizer as
every stage must see it; `adapter_base(base)` how an exported adapter names it anywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skytune.core.atomic import write_json
from skytune.core.chat import chat_template
from skytune.core.errors import SkytuneError
from skytune.core.hub import resolve_model
from skytune.core.models import gguf
from skytune.core.models.builtin import BUILTIN_MODELS, BUILTIN_PREFIX

log = logging.getLogger(__name__)

MANIFEST = "base_model.json"


@dataclass(frozen=True)
class BaseModel:
    """Where the base model lives and how its tokenizer is set up for training and serving.

    `ref` is what `from_pretrained` takes (for a GGUF base, the file as params.yaml names it: `location()` gives the
    converted checkpoint); `revision` a commit hash or None; `chat_template` the exact template text every later
    stage uses (resolved once, at ingest, from `model.chat_template`); `pad_token` the pad strategy; `gguf` what
    `gguf.describe` recorded of a GGUF base (sha256, quantization, converter versions); `added_tokens` the special
    tokens that template writes and the base's vocabulary lacks, added to the tokenizer by every stage and trained
    as new rows (`training.new_tokens`).
    """

    kind: str  # "builtin" | "hub" | "local" | "gguf"
    name: str
    ref: str
    revision: str | None
    chat_template: str
    pad_token: str
    gguf: dict[str, Any] | None = None
    added_tokens: list[str] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        write_json(directory / MANIFEST, asdict(self))

    @classmethod
    def load(cls, directory: Path | str) -> BaseModel:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise SkytuneError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def resolve_base(base: str, revision: str | None, builtin_dir: Path) -> tuple[str, str, str, str | None]:
    """Where `base` (a built-in name, a GGUF file, a local directory, or a hub id) lives: (kind, name, ref, commit)."""
    if base.startswith(BUILTIN_PREFIX):
        if base not in BUILTIN_MODELS:
            raise SkytuneError(f"model.base: unknown built-in model {base!r}; known: {', '.join(BUILTIN_MODELS)}")
        return "builtin", base, str(builtin_dir), None
    if gguf.is_gguf(base):
        return "gguf", base, base, None
    if Path(base).is_dir():
        return "local", base, str(Path(base).resolve()), None
    return "hub", base, base, resolve_model(base, revision)


def describe_base(kind: str, name: str, ref: str, revision: str | None, *, template: str, pad_token: str) -> BaseModel:
    """The manifest of a resolved base: its tokenizer's chat template resolved by the `template` strategy
    (`chat_template.resolve_template`) and checked to work with the `pad_token` strategy. A GGUF base is described
    by its file (sha256, quantization) and converted here if this machine has not converted it yet."""
    from transformers import AutoTokenizer

    source = gguf.describe(ref) if kind == "gguf" else None
    base = BaseModel(kind, name, ref, revision, "", pad_token, source)
    tokenizer = AutoTokenizer.from_pretrained(location(base), revision=revision)
    text, notes = chat_template.resolve_template(tokenizer, template)
    added = chat_template.missing_tokens(tokenizer, text)
    if added:
        notes.append(f"the base's vocabulary lacks {added}: they are added, and their embedding and output rows "
                     "trained beside the adapter")
    for note in notes:
        log.info("chat template (%s): %s", template, note)
    base = BaseModel(kind, name, ref, revision, text, pad_token, source, added)
    load_tokenizer(base)  # fails now, at ingest, on a template that cannot end a turn or a pad strategy with no token
    return base


def location(base: BaseModel) -> str:
    """Where `from_pretrained` finds the base on this machine: the converted checkpoint of a GGUF base (converted on
    first use), else `base.ref`."""
    if base.kind == "gguf":
        assert base.gguf is not None, "a GGUF manifest records its source"
        return str(gguf.materialize(base.gguf))
    return base.ref


def adapter_base(base: BaseModel) -> str:
    """How an exported adapter names its base so that a user elsewhere can get it: the hub id (its revision beside it
    in adapter_config.json), a GGUF base as params.yaml names it (a `pip:` spec or a path; the model card gives its
    sha256), a local base as given. Never this machine's cache."""
    return base.name if base.kind == "hub" else base.ref


def adapter_base_location(named: str, manifest: BaseModel | None) -> str:
    """Where `from_pretrained` finds the base an exported adapter names (`adapter_base`), here: a GGUF base through
    this project's base manifest (its converted checkpoint, converted on first use), anything else as named."""
    if manifest is not None and manifest.kind == "gguf" and named == manifest.ref:
        return location(manifest)
    if gguf.is_gguf(named):
        raise SkytuneError(f"the adapter's base is the GGUF {named}, which this project's base manifest does not "
                           "describe: set model.base to it and run `dvc repro ingest` (it is converted once), or "
                           "serve the merged model")
    return named


def load_tokenizer(base: BaseModel) -> Any:
    """The base model's tokenizer as every stage must see it: the template's tokens it lacked added, the manifest's
    chat template, and a pad token distinct from EOS/end-of-turn."""
    tokenizer = load_base_tokenizer(base)
    chat_template.add_tokens(tokenizer, base.added_tokens)
    tokenizer.chat_template = base.chat_template
    chat_template.ensure_pad_token(tokenizer, base.pad_token)
    return tokenizer


def load_base_tokenizer(base: BaseModel) -> Any:
    """The base's tokenizer as it ships, nothing added (`load_tokenizer` is what stages use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location(base), revision=base.revision)
