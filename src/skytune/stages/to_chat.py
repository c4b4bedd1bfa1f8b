"""to_chat: convert every ingested row to a canonical, validated conversation.

    python -m skytune.stages.to_chat      (normally: dvc repro to_chat)

Writes one JSONL per source under `paths.chat_dir`, each line `{"id", "source", "messages"}` (id = content hash),
and `rejects.jsonl` there with source, file, line, field and reason for each row that could not be converted.
Counts per source and per reject reason go to `paths.to_chat_metrics`. With `data.on_invalid: error` the first
invalid row stops the stage; with `skip` the stage fails only if more than `data.max_reject_fraction` of a
source is rejected.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from skytune.atomic import atomic_dir, read_jsonl, write_json, write_jsonl
from skytune.chat_format import InvalidRecord, to_messages
from skytune.params import Params
from skytune import identity
from skytune.records import REJECTS_FILE, content_hash
from skytune.stages import run_stage

log = logging.getLogger(__name__)



def main(params: Params) -> None:
    ingested = Path(params.paths.ingested_dir)
    on_invalid, max_reject_fraction = params.data.on_invalid, params.data.max_reject_fraction
    formats = {s.name: s.format for s in params.data.sources} | {identity.SOURCE: "messages"}
    rejects = read_jsonl(ingested / REJECTS_FILE)  # rows ingest could not even parse stay counted here
    converted: dict[str, list[dict]] = {}
    for path in sorted(ingested.glob("*.jsonl")):
        name = path.stem
        if name not in formats:
            continue  # rejects.jsonl
        records = []
        rows = read_jsonl(path)
        for item in rows:
            try:
                messages = to_messages(item["row"], formats[name])
            except InvalidRecord as exc:
                where = f"{item['file']}:{item['line']}"
                if on_invalid == "error":
                    raise ValueError(f"{where}: field {exc.field}: {exc.reason} "
                                     "(fix the row, or set data.on_invalid: skip to reject it)") from exc
                rejects.append({"source": name, "file": item["file"], "line": item["line"],
                                "field": exc.field, "reason": exc.reason})
                continue
            records.append({"id": content_hash(messages), "source": name, "messages": messages})
        converted[name] = records
        rejected = len(rows) - len(records)
        if rows and rejected / len(rows) > max_reject_fraction:
            raise ValueError(f"source {name}: {rejected} of {len(rows)} rows rejected, above "
                             f"data.max_reject_fraction={max_reject_fraction}; see {REJECTS_FILE}")
        log.info("source %s: %d conversations, %d rejected", name, len(records), rejected)

    with atomic_dir(params.paths.chat_dir) as out:
        for name, records in sorted(converted.items()):
            write_jsonl(out / f"{name}.jsonl", records)
        write_jsonl(out / REJECTS_FILE, rejects)
    reasons = Counter(f"{r['source']}: {r['field']}: {r['reason']}" for r in rejects)
    write_json(params.paths.to_chat_metrics, {
        "conversations": {name: len(records) for name, records in sorted(converted.items())},
        "rejected": dict(sorted(Counter(r["source"] for r in rejects).items())),
        "rejected_total": len(rejects),
        "reject_reasons": dict(sorted(reasons.items())),
    })


if __name__ == "__main__":
    run_stage(main)
