"""ingest: resolve the base model and read every raw source, with the provenance of each row.

    python -m skytune.stages.ingest      (normally: dvc repro ingest)

Writes `paths.base_model_dir` (the base-model manifest; for the built-in model also its weights and tokenizer,
a few MB) and one JSONL per source under `paths.ingested_dir`, each line `{"file", "line", "row"}`. Lines that
are not JSON objects go to `rejects.jsonl` there and are counted; `data.on_invalid: error` stops instead.
Identity conversations generated from the `identity` params are one more source.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from skytune import identity, models
from skytune.atomic import atomic_dir, write_jsonl
from skytune.params import Params, to_dict
from skytune.records import REJECTS_FILE, RawRow, Reject, read_jsonl_source
from skytune.stages import run_stage

log = logging.getLogger(__name__)



def _texts(rows: list[dict]) -> Iterator[str]:
    """Every string in the rows, in order: the corpus the built-in tokenizer is trained on."""
    for row in rows:
        stack = [row]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                yield value
            elif isinstance(value, dict):
                stack.extend(reversed([value[k] for k in sorted(value)]))
            elif isinstance(value, list):
                stack.extend(reversed(value))


def main(params: Params) -> None:
    raw_dir = Path(params.paths.raw_dir)
    on_invalid = params.data.on_invalid
    sources: dict[str, list[dict]] = {}
    rejects: list[dict] = []
    for source in params.data.sources:
        path = raw_dir / source.file
        if not path.is_file():
            raise FileNotFoundError(f"params.yaml data.sources[{source.name}].file: {path} does not exist")
        rows = []
        for item in read_jsonl_source(path):
            if isinstance(item, Reject):
                if on_invalid == "error":
                    raise ValueError(f"{item.file}:{item.line}: {item.reason} (set data.on_invalid: skip to reject)")
                rejects.append(item.as_dict(source.name))
            else:
                rows.append(asdict(item))
        if source.name in sources or source.name == identity.SOURCE:
            raise ValueError(f"params.yaml data.sources: the name {source.name!r} is used twice or reserved")
        sources[source.name] = rows
        log.info("source %s: %d rows from %s", source.name, len(rows), path)

    if params.identity.enabled:
        who = identity.Identity(params.identity.name, params.identity.creator)
        generated = identity.generate(who, params.identity.num_samples, params.base.seed)
        sources[identity.SOURCE] = [asdict(RawRow("<identity>", i + 1, row)) for i, row in enumerate(generated)]

    with atomic_dir(params.paths.ingested_dir) as out:
        for name in sorted(sources):
            write_jsonl(out / f"{name}.jsonl", sources[name])
        write_jsonl(out / REJECTS_FILE, rejects)
        (out / "summary.json").write_text(json.dumps({
            "rows": {name: len(rows) for name, rows in sorted(sources.items())},
            "rejects": dict(sorted(Counter(r["source"] for r in rejects).items())),
        }, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    with atomic_dir(params.paths.base_model_dir) as out:
        base = models.resolve_base(params.model.base, params.model.revision, Path(params.paths.base_model_dir))
        if base.kind == "builtin":
            corpus = list(_texts([row["row"] for name in sorted(sources) for row in sources[name]]))
            models.build_builtin(out, corpus, seed=params.base.seed, **to_dict(params.model.builtin))
        base.save(out)
        log.info("base model: %s", base)


if __name__ == "__main__":
    run_stage(main)
