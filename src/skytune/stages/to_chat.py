"""to_chat: convert every ingested row to a canonical, validated record, streaming.

    python -m skytune.stages.to_chat      (normally: dvc repro to_chat)

Each source's `format` (see `skytune.core.data.chat_format`; `auto` only when the first rows fit exactly one format)
turns its rows into `{"id", "source", "messages"}` conversations, or `{"id", "source", "prompt", "chosen",
"rejected"}` for preference data; a `self_replay` source's rows are the base's answers (`paths.replay_dir`), read
as `messages`. Writes one JSONL per source under `paths.chat_dir` and `rejects.jsonl` there (source, file, line,
field, reason; ingest's unreadable rows and self_replay's rows with no prompt included), with counts per source and
per reason in `paths.to_chat_metrics`. `data.on_invalid: error` stops at the first invalid row; with `skip`, a
source fails when more than `data.max_reject_fraction` of its rows is rejected.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skytune.core.atomic import (
    atomic_dir,
    iter_jsonl,
    read_jsonl,
    write_json,
    write_jsonl,
)
from skytune.core.data import chat_format, identity
from skytune.core.data.parallel import map_in_processes
from skytune.core.data.records import REJECTS_FILE, SUMMARY_FILE, content_hash
from skytune.core.errors import SkytuneError
from skytune.core.params import Params, SourceParams
from skytune.stages import run_stage

log = logging.getLogger(__name__)

DETECT_ROWS = 100  # rows auto-detection looks at; every one of them must fit the same single format


def _resolve_format(source: SourceParams, path: Path) -> str:
    if source.format != "auto":
        return source.format
    sample = [item["row"] for item in itertools.islice(iter_jsonl(path), DETECT_ROWS)]
    detected = chat_format.detect_format(sample)
    if detected is None:
        raise SkytuneError(f"params.yaml data.sources[{source.name}]: format auto cannot tell the format of "
                         f"{path} (keys of its first row: {sorted(sample[0]) if sample else 'no rows'}); set "
                         f"format: to one of {', '.join(chat_format.FORMATS)}")
    log.info("source %s: detected format %s", source.name, detected)
    return detected


def replacements(source: SourceParams, references: dict[str, str]) -> dict[str, str]:
    """A source's `replace` table with the `references` (${identity.name}, ...) its values name filled in."""
    table = {}
    for key, value in (source.replace or {}).items():
        for name in re.findall(r"\$\{([^}]*)\}", value):
            if f"${{{name}}}" not in references:
                raise SkytuneError(f"params.yaml data.sources[{source.name}].replace[{key!r}]: ${{{name}}} is not "
                                   f"known; a value may name {', '.join(sorted(references))}")
        for reference, text in references.items():
            value = value.replace(reference, text)
        table[key] = value
    return table


def _convert_source(job: tuple) -> tuple[str, dict, list[dict]]:
    """Convert one source into `out/<name>.jsonl`; return its counts and rejects. Runs in a worker process."""
    name, spec, path, out, on_invalid, max_reject_fraction, unreadable, dropped, table, reasoning = job
    if unreadable and not path.stat().st_size and not dropped:  # nothing ingest could read: no format to detect
        raise SkytuneError(f"source {name}: all {unreadable} rows were rejected before conversion (unreadable at "
                         "ingest, or no prompt for self_replay); see rejects.jsonl in paths.ingested_dir and "
                         "paths.replay_dir")
    fmt = "messages" if spec is None or spec.format == "self_replay" else _resolve_format(spec, path)
    convert = chat_format.record_converter(fmt, instruction=spec.instruction if spec else None,
                                           columns=spec.columns if spec else None, tags=spec.tags if spec else None,
                                           reasoning=reasoning)
    tally = {"rows": 0, "records": 0, "rejected": 0, "undesirable": 0, "tool_calls": 0, "reasoning": 0}
    rejects: list[dict] = []

    def records() -> Iterator[dict[str, Any]]:
        for item in iter_jsonl(path):
            tally["rows"] += 1
            try:
                record = convert(item["row"])
            except chat_format.InvalidRecord as exc:
                if on_invalid == "error":
                    raise SkytuneError(f"{item['file']}:{item['line']}: field {exc}: "
                                     "(fix the row, or set data.on_invalid: skip to reject it)") from exc
                rejects.append({"source": name, "file": item["file"], "line": item["line"],
                                "field": exc.field, "reason": exc.reason, "detail": exc.detail})
                tally["rejected"] += 1
                continue
            tally["records"] += 1
            tally["undesirable"] += record.get("label") is False
            messages = [m for part in ("messages", "prompt", "completion", "chosen") for m in record.get(part, ())]
            tally["tool_calls"] += any("tool_calls" in m for m in messages)
            tally["reasoning"] += any("reasoning_content" in m for m in messages)
            record = chat_format.replace_text(record, table)
            yield {"id": content_hash(record), "source": name, **record}

    write_jsonl(out / f"{name}.jsonl", records())
    # ingest's count too, and the self_replay prompts whose answers were dropped (cut or empty: not rows to convert)
    rejected, total = tally["rejected"] + unreadable, tally["rows"] + unreadable + dropped
    if total and rejected / total > max_reject_fraction:
        top = Counter(f"{r['field']}: {r['reason']}" for r in rejects).most_common(5)
        first = f" First: {rejects[0]['file']}:{rejects[0]['line']}; most common reasons: {top}." if rejects else ""
        raise SkytuneError(
            f"source {name}: {rejected} of {total} rows rejected ({unreadable} before conversion: see rejects.jsonl "
            f"in paths.ingested_dir and paths.replay_dir), above data.max_reject_fraction={max_reject_fraction}."
            f"{first} Fix the rows, set the source's format: in params.yaml data.sources ({name}), or raise "
            "data.max_reject_fraction.")
    log.info("source %s (%s): %d records, %d rejected", name, fmt, tally["records"], tally["rejected"])
    return name, tally, rejects


def _rows_file(spec: SourceParams | None, name: str, ingested: Path, replayed: Path) -> Path:
    """Where a source's rows are: ingest's, or for a self_replay source the base's answers (stage self_replay)."""
    if spec is None or spec.format != "self_replay":
        return ingested / f"{name}.jsonl"
    if not (replayed / f"{name}.jsonl").is_file():
        raise SkytuneError(f"source {name} (format self_replay): the base's answers are not in {replayed}; run the "
                           "self_replay stage first (dvc repro self_replay)")
    return replayed / f"{name}.jsonl"


def _dropped_answers(replayed: Path) -> dict[str, int]:
    """Per self_replay source, the prompts whose answers the stage dropped (cut, or empty)."""
    summary = replayed / SUMMARY_FILE
    counts = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
    return {name: c["cut"] + c["empty"] for name, c in counts.items()}


def main(params: Params) -> None:
    ingested, replayed = Path(params.paths.ingested_dir), Path(params.paths.replay_dir)
    on_invalid, max_reject_fraction = params.data.on_invalid, params.data.max_reject_fraction
    specs: dict[str, SourceParams | None] = {s.name: s for s in params.data.sources}
    if (ingested / f"{identity.SOURCE}.jsonl").is_file():
        specs[identity.SOURCE] = None  # generated by ingest in `messages` form
    # rows ingest could not even read, and self_replay rows with no prompt, stay counted here
    rejects = read_jsonl(ingested / REJECTS_FILE)
    if (replayed / REJECTS_FILE).is_file():  # absent: self_replay has not run (only a self_replay source needs it)
        rejects += read_jsonl(replayed / REJECTS_FILE)
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(params.paths.chat_dir) as out:
        unreadable = Counter(r["source"] for r in rejects)
        dropped = _dropped_answers(replayed)
        references = {"${identity.name}": params.identity.name, "${identity.creator}": params.identity.creator}
        jobs = [(name, specs[name], _rows_file(specs[name], name, ingested, replayed), out, on_invalid,
                 max_reject_fraction, unreadable[name], dropped.get(name, 0),
                 replacements(specs[name], references) if specs[name] else {}, params.data.reasoning)
                for name in sorted(specs)]
        sizes = [job[2].stat().st_size for job in jobs]
        for name, tally, source_rejects in map_in_processes(_convert_source, jobs, sizes):
            counts[name] = tally
            rejects += source_rejects
        write_jsonl(out / REJECTS_FILE, rejects)
    reasons = Counter(f"{r['source']}: {r['reason']}" for r in rejects)
    write_json(params.paths.to_chat_metrics, {
        "records": {name: c["records"] for name, c in counts.items()},
        # rows labelled undesirable (label: false): kept with the preference data, never trained on
        "undesirable": {name: c["undesirable"] for name, c in counts.items() if c["undesirable"]},
        # records whose assistant calls tools, and records that keep a reasoning trace (data.reasoning: keep)
        "tool_calls": {name: c["tool_calls"] for name, c in counts.items() if c["tool_calls"]},
        "reasoning": {name: c["reasoning"] for name, c in counts.items() if c["reasoning"]},
        "rejected": dict(sorted(Counter(r["source"] for r in rejects).items())),
        "rejected_total": len(rejects),
        "reject_reasons": dict(sorted(reasons.items())),
    })


if __name__ == "__main__":
    run_stage(main)
