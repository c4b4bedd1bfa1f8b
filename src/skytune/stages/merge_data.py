"""merge_data: merge the per-source splits into one train file and one val file, in a seeded order.

    python -m skytune.stages.merge_data      (normally: dvc repro merge_data)

Sources are read in sorted order and records shuffled with `base.seed` after sorting by id, so the bytes of
`paths.train_file` and `paths.val_file` depend on content and seed alone, never on the file system's listing
order (the ancestor's defect 3). Per-source row and turn counts go to `paths.data_metrics`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from skytune.atomic import read_jsonl, write_json, write_jsonl
from skytune.params import Params
from skytune.records import shuffled
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    split_dir = Path(params.paths.split_dir)
    metrics: dict[str, dict] = {}
    for part, target in (("train", params.paths.train_file), ("val", params.paths.val_file)):
        records = [r for path in sorted((split_dir / part).glob("*.jsonl")) for r in read_jsonl(path)]
        n = write_jsonl(target, shuffled(records, params.base.seed))
        metrics[part] = {
            "rows": n,
            "rows_per_source": dict(sorted(Counter(r["source"] for r in records).items())),
            "turns": sum(len(r["messages"]) for r in records),
        }
        log.info("%s: %d records -> %s", part, n, target)
    write_json(params.paths.data_metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
