"""split: deterministic train/val split of every source, with dedup and a leakage check.

    python -m skytune.stages.split      (normally: dvc repro split)

A record goes to val when the seeded hash of its normalized prompt falls under the source's val fraction
(`split.val_fraction`, or `split.val_fraction_by_source`; 0 keeps a source such as identity all in train). So the
split depends on content alone: adding rows never moves existing rows, and records that ask the same thing land
on the same side. Exact duplicates (same id) and normalized-text duplicates (same text up to case, punctuation,
whitespace and Unicode form) are dropped and counted, in sorted source order. The stage fails if a val prompt
also appears in train (possible only across sources with different val fractions). Writes
`train/<source>.jsonl` and `val/<source>.jsonl` under `paths.split_dir`, and counts in `summary.json` there.

The keys are computed per source in worker processes; the dedup and the writing (raw lines, unparsed) follow in
source order, so the result does not depend on scheduling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import orjson

from skytune.atomic import atomic_dir, atomic_file, write_json
from skytune.parallel import map_in_processes
from skytune.params import Params
from skytune.records import REJECTS_FILE, dedup_keys, is_val
from skytune.stages import run_stage

log = logging.getLogger(__name__)


def _keys(job: tuple[Path, float, int]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per record of one chat file: its id, normalized key, prompt key, and whether its prompt goes to val."""
    path, fraction, seed = job
    ids, texts, prompts, val = [], [], [], []
    with open(path, "rb") as fh:
        for line in fh:
            record = orjson.loads(line)
            prompt, text = dedup_keys(record)
            ids.append(record["id"])
            texts.append(text)
            prompts.append(prompt)
            val.append(is_val(prompt, fraction, seed))
    return ids, np.array(texts, dtype=np.uint64), np.array(prompts, dtype=np.uint64), np.array(val, dtype=bool)


def main(params: Params) -> None:
    seed = params.base.seed
    default_fraction, by_source = params.split.val_fraction, params.split.val_fraction_by_source
    files = [p for p in sorted(Path(params.paths.chat_dir).glob("*.jsonl")) if p.name != REJECTS_FILE]
    keys = map_in_processes(_keys, [(p, by_source.get(p.stem, default_fraction), seed) for p in files])
    seen_ids: set[str] = set()
    seen_text: set[int] = set()
    prompts: dict[str, dict[int, str]] = {"train": {}, "val": {}}  # prompt key -> the source it came from
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(params.paths.split_dir) as out:
        for path, (ids, texts, prompt_keys, val) in zip(files, keys, strict=True):
            source = path.stem
            tally = {"train": 0, "val": 0, "exact_duplicates": 0, "normalized_duplicates": 0}
            with open(path, "rb") as src, atomic_file(out / "train" / path.name, "wb") as train_out, \
                    atomic_file(out / "val" / path.name, "wb") as val_out:
                for line, record_id, text, prompt, to_val in zip(src, ids, texts.tolist(), prompt_keys.tolist(),
                                                                val.tolist(), strict=True):
                    if record_id in seen_ids:
                        tally["exact_duplicates"] += 1
                        continue
                    seen_ids.add(record_id)
                    if text in seen_text:
                        tally["normalized_duplicates"] += 1
                        continue
                    seen_text.add(text)
                    side = "val" if to_val else "train"
                    prompts[side].setdefault(prompt, source)
                    tally[side] += 1
                    (val_out if to_val else train_out).write(line)
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
