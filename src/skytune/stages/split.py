"""split: deterministic train/val split of every source, with dedup and a leakage check.

    python -m skytune.stages.split      (normally: dvc repro split)

A record goes to val when the seeded hash of its normalized prompt falls under the source's val fraction
(`split.val_fraction`, or `split.val_fraction_by_source`; 0 keeps a source such as identity all in train). So the
split depends on content alone: adding rows never moves existing rows, and records that ask the same thing land
on the same side. Exact duplicates (same id) and normalized-text duplicates (same text up to case, punctuation,
whitespace and Unicode form) are dropped and counted. The stage fails if a val prompt also appears in train
(possible only across sources with different val fractions). Writes `train/<source>.jsonl` and
`val/<source>.jsonl` under `paths.split_dir`, and counts in `summary.json` there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skytune.atomic import atomic_dir, iter_jsonl, write_json, write_jsonl
from skytune.params import Params
from skytune.records import REJECTS_FILE, dedup_keys, is_val
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    seed = params.base.seed
    default_fraction, by_source = params.split.val_fraction, params.split.val_fraction_by_source
    seen_ids: set[str] = set()
    seen_text: set[int] = set()
    prompts: dict[str, dict[int, str]] = {"train": {}, "val": {}}  # prompt key -> the source it came from
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(params.paths.split_dir) as out:
        for path in sorted(Path(params.paths.chat_dir).glob("*.jsonl")):
            if path.name == REJECTS_FILE:
                continue
            source = path.stem
            fraction = by_source.get(source, default_fraction)
            tally = {"train": 0, "val": 0, "exact_duplicates": 0, "normalized_duplicates": 0}
            val: list[dict[str, Any]] = []

            def train_records(path=path, source=source, fraction=fraction, tally=tally,
                              val=val) -> Iterator[dict[str, Any]]:
                for record in iter_jsonl(path):
                    if record["id"] in seen_ids:
                        tally["exact_duplicates"] += 1
                        continue
                    seen_ids.add(record["id"])
                    key, text = dedup_keys(record)
                    if text in seen_text:
                        tally["normalized_duplicates"] += 1
                        continue
                    seen_text.add(text)
                    side = "val" if is_val(key, fraction, seed) else "train"
                    prompts[side].setdefault(key, source)
                    tally[side] += 1
                    if side == "val":
                        val.append(record)  # val is the small side; train streams straight to disk
                    else:
                        yield record

            write_jsonl(out / "train" / path.name, train_records())
            write_jsonl(out / "val" / path.name, val)
            counts[source] = tally
            log.info("source %s: %s", source, tally)
        leaked = prompts["train"].keys() & prompts["val"].keys()
        if leaked:
            pairs = sorted({(prompts["val"][k], prompts["train"][k]) for k in leaked})
            raise ValueError(f"{len(leaked)} val prompts also appear in train (val source, train source: {pairs}); "
                             "give these sources the same split.val_fraction_by_source, or dedup them")
        write_json(out / "summary.json", counts)


if __name__ == "__main__":
    run_stage(main)
