"""split: deterministic train/val split of every source by content hash.

    python -m skytune.stages.split      (normally: dvc repro split)

A record goes to val when the seeded hash of its id falls under `split.val_fraction`, so the split depends on
content alone: adding rows to a source never moves existing rows between train and val.
`split.val_fraction_by_source` overrides the fraction per source (0 keeps a source, such as identity, all in
train). Exact duplicates
(same id) are dropped and counted. Writes `train/<source>.jsonl` and `val/<source>.jsonl` under `paths.split_dir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from skytune.atomic import atomic_dir, read_jsonl, write_json, write_jsonl
from skytune.params import Params
from skytune.records import REJECTS_FILE, is_val
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    seed = params.base.seed
    by_source = params.split.val_fraction_by_source
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(params.paths.split_dir) as out:
        for path in sorted(Path(params.paths.chat_dir).glob("*.jsonl")):
            if path.name == REJECTS_FILE:
                continue
            val_fraction = by_source.get(path.stem, params.split.val_fraction)
            seen: set[str] = set()
            parts: dict[str, list[dict]] = {"train": [], "val": []}
            for record in read_jsonl(path):
                if record["id"] in seen:
                    continue
                seen.add(record["id"])
                parts["val" if is_val(record["id"], val_fraction, seed) else "train"].append(record)
            for part, records in parts.items():
                write_jsonl(out / part / path.name, records)
            total = sum(1 for _ in open(path, encoding="utf-8"))
            counts[path.stem] = {"train": len(parts["train"]), "val": len(parts["val"]),
                                 "duplicates": total - len(seen)}
            log.info("source %s: %s", path.stem, counts[path.stem])
        write_json(out / "summary.json", counts)


if __name__ == "__main__":
    run_stage(main)
