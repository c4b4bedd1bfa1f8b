"""ingest: resolve the base model and read every raw source, streaming, with the provenance of each row.

    python -m skytune.stages.ingest      (normally: dvc repro ingest)

Sources (`data.sources` in params.yaml) are local files or globs under `paths.raw_dir` (jsonl, json, parquet,
csv; globs always sorted) or hub datasets (`hub`, `config`, `split`, `revision`: the commit it resolves to is
recorded). `max_samples` keeps a seeded subsample. Writes one JSONL per source under `paths.ingested_dir`, each
line `{"file", "line", "row"}`; rows that cannot be read (bad JSON, bad UTF-8, ragged CSV) go to `rejects.jsonl`
there and are counted in `summary.json` (`data.on_invalid: error` stops at the first one instead). Identity
conversations generated from the `identity` params are one more source.

Also writes `paths.base_model_dir`: the base-model manifest (a hub id resolved to its commit) or, for the built-in
model, the model itself, its tokenizer trained on the sources' text.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

from skytune.core.atomic import (
    atomic_dir,
    dumps_line,
    iter_jsonl,
    write_json,
    write_jsonl,
)
from skytune.core.data import identity, sources
from skytune.core.data.parallel import map_in_processes
from skytune.core.data.records import REJECTS_FILE, SUMMARY_FILE
from skytune.core.errors import SkytuneError
from skytune.core.models.base import describe_base, resolve_base
from skytune.core.models.builtin import build_builtin
from skytune.core.params import Params, SourceParams, to_dict
from skytune.stages import run_stage

log = logging.getLogger(__name__)

CORPUS_ROWS = 5_000  # rows per source the built-in tokenizer is trained on: plenty for a 1k vocabulary


def _texts(value: object) -> Iterator[str]:
    """Every string in a row, in a fixed order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k in sorted(value):
            yield from _texts(value[k])
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


def _rows(source: SourceParams, raw_dir: Path) -> tuple[Iterator[sources.RawRow | sources.Reject], str | None]:
    if source.hub is not None:
        commit, rows = sources.read_hub(source.hub, config=source.config, split=source.split or "train",
                                        revision=source.revision)
        return rows, commit
    files = sources.expand(raw_dir, source.path, source.name)
    return itertools.chain.from_iterable(sources.read_file(f) for f in files), None


def _ingest_source(job: tuple[SourceParams, Path, Path, str, int]) -> tuple[str, dict, list[dict]]:
    """Stream one source into `out/<name>.jsonl`; return its counts and rejects. Runs in a worker process."""
    source, raw_dir, out, on_invalid, seed = job
    rows, commit = _rows(source, raw_dir)
    counts: dict[str, object] = {"rows": 0, "rejected": 0}
    rejects: list[dict] = []

    def accepted() -> Iterator[bytes]:
        for item in sources.subsample(rows, source.max_samples, seed):
            if isinstance(item, sources.RawRow):
                try:
                    line = dumps_line({"file": item.file, "line": item.line, "row": item.row})
                except TypeError as exc:  # a lone surrogate from a .json file: not valid UTF-8 text
                    item = sources.Reject(item.file, item.line, "<row>", "not valid UTF-8", str(exc))
            if isinstance(item, sources.Reject):
                if on_invalid == "error":
                    raise SkytuneError(f"{item.file}:{item.line}: {item.reason} "
                                     "(fix the row, or set data.on_invalid: skip to reject it)")
                rejects.append(item.as_dict(source.name))
                counts["rejected"] += 1
                continue
            counts["rows"] += 1
            yield line

    write_jsonl(out / f"{source.name}.jsonl", accepted())
    if counts["rows"] == 0 and counts["rejected"] == 0:
        raise sources.SourceError(f"source {source.name!r}: {source.path or source.hub} has no rows; "
                                  "fix the file or remove the source from params.yaml")
    if commit:
        counts |= {"hub": source.hub, "revision": commit}
    log.info("source %s: %d rows, %d rejected%s", source.name, counts["rows"], counts["rejected"],
             f" (hub commit {commit})" if commit else "")
    return source.name, counts, rejects


def _template(params: Params) -> str:
    """`model.chat_template`, with a jinja file required under `paths.templates_dir` (a dependency of this stage,
    so editing the template re-runs the pipeline)."""
    strategy = params.model.chat_template
    if strategy in ("keep", "chatml"):
        return strategy
    templates = Path(params.paths.templates_dir).resolve()
    path = Path(strategy).resolve()
    if not path.is_relative_to(templates):
        raise SkytuneError(f"params.yaml model.chat_template: {strategy} must be under {params.paths.templates_dir}/, "
                         "which DVC tracks, so that an edit to the template re-runs the pipeline")
    if not path.is_file():
        raise SkytuneError(f"params.yaml model.chat_template: {strategy} does not exist")
    return str(path)


def main(params: Params) -> None:
    names = [s.name for s in params.data.sources] + ([identity.SOURCE] if params.identity.enabled else [])
    if len(set(names)) != len(names):
        raise SkytuneError(f"params.yaml data.sources: source names must be unique and not {identity.SOURCE!r} "
                           f"while identity is enabled; got {names}")
    summary = _ingest_data(params)
    with atomic_dir(params.paths.base_model_dir) as out:
        kind, name, ref, commit = resolve_base(params.model.base, params.model.revision,
                                               Path(params.paths.base_model_dir))
        if kind == "builtin":
            corpus = [text for name in sorted(summary)
                      for item in itertools.islice(iter_jsonl(Path(params.paths.ingested_dir) / f"{name}.jsonl"),
                                                   CORPUS_ROWS)
                      for text in _texts(item["row"])]
            build_builtin(out, corpus, seed=params.base.seed, **to_dict(params.model.builtin))
            ref = str(out)  # built in the staging directory; the manifest records the final one below
        base = describe_base(kind, name, ref, commit, template=_template(params), pad_token=params.model.pad_token)
        if kind == "builtin":
            base = dataclasses.replace(base, ref=str(Path(params.paths.base_model_dir)))
        base.save(out)
        log.info("base model: %s %s (revision %s), pad strategy %s", base.kind, base.name, base.revision,
                 base.pad_token)


def _ingest_data(params: Params) -> dict[str, dict]:
    """Every source's rows (and the identity rows) into `paths.ingested_dir`, rejects counted: the summary."""
    raw_dir, seed = Path(params.paths.raw_dir), params.base.seed
    summary: dict[str, dict] = {}
    rejects: list[dict] = []
    with atomic_dir(params.paths.ingested_dir) as out:
        jobs = [(source, raw_dir, out, params.data.on_invalid, seed) for source in params.data.sources]
        sizes = [sum(f.stat().st_size for f in sources.expand(raw_dir, s.path, s.name)) if s.path else 0
                 for s in params.data.sources]
        for name, counts, source_rejects in map_in_processes(_ingest_source, jobs, sizes):
            summary[name] = counts
            rejects += source_rejects
        if params.identity.enabled:
            who = identity.Identity(params.identity.name, params.identity.creator)
            generated = identity.generate(who, params.identity.num_samples, seed)
            write_jsonl(out / f"{identity.SOURCE}.jsonl",
                        ({"file": "<identity>", "line": i, "row": row} for i, row in enumerate(generated, 1)))
            summary[identity.SOURCE] = {"rows": len(generated), "rejected": 0}
        write_jsonl(out / REJECTS_FILE, rejects)
        write_json(out / SUMMARY_FILE, summary)
    return summary

if __name__ == "__main__":
    run_stage(main)
