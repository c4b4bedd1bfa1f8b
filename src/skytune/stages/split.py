"""split: deterministic train/val split of every source, with dedup and a leakage check.

    python -m skytune.stages.split      (normally: dvc repro split)

A record goes to val when the seeded hash of its normalized prompt falls under the source's val fraction
(`split.val_fraction`, or `split.val_fraction_by_source`; 0 keeps a source such as identity all in train). So the
split depends on content alone: adding rows never moves existing rows, and records that ask the same thing land
on the same side. Exact duplicates (same id) and normalized-text duplicates (same text up to case, punctuation,
whitespace and Unicode form) are dropped and counted, the first occurrence in sorted source order kept. The stage
fails if a val prompt also appears in train (possible only across sources with different val fractions). Writes
`train/<source>.jsonl` and `val/<source>.jsonl` under `paths.split_dir`, and counts in `summary.json` there.

The keys are computed per source in worker processes; dedup and the leakage check are array operations over all
sources in order, and the lines are copied unparsed, so the result does not depend on scheduling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import orjson

from skytune.core.atomic import atomic_dir, atomic_file, write_json
from skytune.core.data.parallel import map_in_processes
from skytune.core.data.records import REJECTS_FILE, SUMMARY_FILE, dedup_keys, is_val
from skytune.core.errors import SkytuneError
from skytune.core.params import Params
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def _keys(job: tuple[Path, float, int]) -> np.ndarray:
    """Per record of one chat file, columns: id, normalized key, prompt key, goes-to-val (as uint64)."""
    path, fraction, seed = job
    rows = []
    with open(path, "rb") as fh:
        for line in fh:
            record = orjson.loads(line)
            prompt, text = dedup_keys(record)
            rows.append((int(record["id"], 16), text, prompt, is_val(prompt, fraction, seed)))
    return np.array(rows, dtype=np.uint64).reshape(-1, 4)


def _first(values: np.ndarray) -> np.ndarray:
    """A mask of the first occurrence of each value."""
    mask = np.zeros(len(values), dtype=bool)
    mask[np.unique(values, return_index=True)[1]] = True
    return mask


def main(params: Params) -> None:
    seed = params.base.seed
    default_fraction, by_source = params.split.val_fraction, params.split.val_fraction_by_source
    files = [p for p in sorted(Path(params.paths.chat_dir).glob("*.jsonl")) if p.name != REJECTS_FILE]
    unknown = set(by_source) - {p.stem for p in files}
    if unknown:  # a warning, not an error: `identity` is named there by default and may be disabled
        log.warning("split.val_fraction_by_source names sources that do not exist: %s (sources: %s)",
                    sorted(unknown), sorted(p.stem for p in files))
    jobs = [(p, by_source.get(p.stem, default_fraction), seed) for p in files]
    per_file = map_in_processes(_keys, jobs, [p.stat().st_size for p in files])
    table = np.concatenate(per_file) if per_file else np.zeros((0, 4), dtype=np.uint64)
    first_id = _first(table[:, 0])
    first_text = _first(table[:, 1])  # the same id has the same text, so this is exactly "seen before"
    keep = first_id & first_text
    to_val = table[:, 3].astype(bool)
    _refuse_leaks(table, keep, to_val, np.repeat(np.arange(len(files)), [len(t) for t in per_file]), files)
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(params.paths.split_dir) as out:
        start = 0
        for path, rows in zip(files, per_file, strict=True):
            span = slice(start, start + len(rows))
            start += len(rows)
            _write_source(path, out, keep[span].tolist(), to_val[span].tolist())
            counts[path.stem] = {
                "train": int((keep[span] & ~to_val[span]).sum()),
                "val": int((keep[span] & to_val[span]).sum()),
                "exact_duplicates": int((~first_id[span]).sum()),
                "normalized_duplicates": int((first_id[span] & ~first_text[span]).sum()),
            }
            log.info("source %s: %s", path.stem, counts[path.stem])
        write_json(out / SUMMARY_FILE, counts)


def _refuse_leaks(table: np.ndarray, keep: np.ndarray, to_val: np.ndarray, source_of: np.ndarray,
                  files: list[Path]) -> None:
    """A prompt kept on both sides (two sources with different val fractions asking the same thing) is an error."""
    leaked = np.intersect1d(table[keep & ~to_val, 2], table[keep & to_val, 2])
    if not len(leaked):
        return
    hit = np.isin(table[:, 2], leaked) & keep
    pairs = sorted({(files[source_of[i]].stem, files[source_of[j]].stem)
                    for i in np.flatnonzero(hit & to_val)[:50] for j in np.flatnonzero(hit & ~to_val)[:50]
                    if table[i, 2] == table[j, 2]})
    raise SkytuneError(f"{len(leaked)} val prompts also appear in train (val source, train source: {pairs}); "
                       "give these sources the same split.val_fraction_by_source, or dedup them")


def _write_source(path: Path, out: Path, kept: list[bool], val: list[bool]) -> None:
    with open(path, "rb") as src, atomic_file(out / "train" / path.name, "wb") as train_out, \
            atomic_file(out / "val" / path.name, "wb") as val_out:
        for line, k, v in zip(src, kept, val, strict=True):
            if k:
                (val_out if v else train_out).write(line)


if __name__ == "__main__":
    run_stage(main)
