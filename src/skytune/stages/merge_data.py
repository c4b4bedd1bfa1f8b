"""merge_data: the weighted training mixture, in a seeded order, with token-aware lengths.

    python -m skytune.stages.merge_data      (normally: dvc repro merge_data)

For each source's train split, `merge_data.mixture` takes a `fraction` of its rows (above 1 repeats rows) or an
exact number of `rows`, chosen by a seeded hash; sources not named are taken whole. Val is never resampled.
Records are then ordered by a seeded hash of their content, so the bytes of `paths.train_file` and
`paths.val_file` depend on content and seed alone, never on the file system's listing order.

Lengths are measured with the base model's own tokenizer and chat template: a conversation longer than
`train.max_length` tokens is dropped or, with `data.length_policy: truncate`, cut after the last assistant turn
that fits (dropped if none does); both are counted. A token never covers less than one byte of the rendered
text, so a conversation of at most `max_length` bytes fits without tokenizing it; only longer ones are counted
exactly. Token statistics (per-source `tokens`, the histogram in `paths.length_plot`) are exact up to
TOKEN_SAMPLE conversations and estimated beyond from an exact count of a seeded sample that size (tokens per byte
times bytes), which `tokens_exact` says. Preference records go to `paths.preference_dir`.
Per-source rows, turns, bytes and tokens go to `paths.data_metrics`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from skytune import chat_template, models
from skytune.atomic import atomic_dir, atomic_file, write_json, write_jsonl
from skytune.params import MixParams, Params
from skytune.records import order_key
from skytune.stages import run_stage

log = logging.getLogger(__name__)

BATCH = 1024  # records tokenized together: the fast tokenizer works on whole batches
HISTOGRAM_BINS = 16
TOKEN_SAMPLE = 50_000  # conversations counted exactly for the statistics (all of them below this)


def _index(files: list[Path]) -> tuple[list[dict[str, Any]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Byte offsets and ids of every conversation per source (small: two integers a record), and the
    preference records, which are few and kept whole. Lines are written with sorted keys, so a conversation
    starts with its id (`{"id":"<16 hex>",...`) and needs no parsing here."""
    preference: list[dict[str, Any]] = []
    index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in files:
        offsets, ids = [], []
        with open(path, "rb") as fh:
            offset = 0
            for line in fh:
                if line.startswith(b'{"id":"'):
                    offsets.append(offset)
                    ids.append(int(line[7:23], 16))
                else:
                    preference.append(orjson.loads(line))
                offset += len(line)
        index[path.stem] = (np.array(offsets, dtype=np.int64), np.array(ids, dtype=np.uint64))
    return preference, index


def _mix(n: int, spec: MixParams | None) -> int:
    if spec is None:
        return n
    return spec.rows if spec.rows is not None else round(spec.fraction * n)


def _selection(ids: np.ndarray, take: int, seed: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """`take` positions out of len(ids), by a seeded ranking of ids, repeating the ranking when take > len;
    returns the positions and the copy number of each."""
    n = len(ids)
    if n == 0 or take == 0:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    rank = np.argsort(np.array([order_key(seed, "mix", source, int(i)) for i in ids], dtype=np.uint64),
                      kind="stable")
    picks = np.arange(take)
    return rank[picks % n], picks // n


class Lengths:
    """Exact token counts of conversations rendered with the model's chat template, in batches."""

    def __init__(self, tokenizer: Any) -> None:
        self.render = chat_template.Renderer(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.count = lambda texts: [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:  # a slow (Python) tokenizer
            self.count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def __call__(self, conversations: list[list[dict[str, str]]]) -> list[int]:
        return self.count([self.render(c) for c in conversations]) if conversations else []


def _truncate(messages: list[dict[str, str]], lengths: Lengths, max_length: int) -> list[dict[str, str]] | None:
    """The longest prefix ending with an assistant turn that fits, or None."""
    ends = [i + 1 for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
    for end in reversed(ends):
        if lengths([messages[:end]])[0] <= max_length:
            return messages[:end]
    return None


def _token_stats(counts: Counter[str]) -> dict[str, Any]:
    """Per-source counts, with `tokens` exact when every row was counted, else bytes x sampled tokens per byte."""
    exact = counts["sampled_rows"] == counts["rows"]
    per_byte = counts["sampled_tokens"] / counts["sampled_bytes"] if counts["sampled_bytes"] else 0.0
    out = {k: v for k, v in counts.items() if not k.startswith("sampled_")}
    return dict(sorted((out | {"tokens": counts["sampled_tokens"] if exact else round(counts["bytes"] * per_byte),
                               "tokens_exact": exact, "tokens_sample_rows": counts["sampled_rows"]}).items()))


def main(params: Params) -> None:
    seed, max_length, policy = params.base.seed, params.train.max_length, params.data.length_policy
    mixture = params.merge_data.mixture
    base = models.BaseModel.load(params.paths.base_model_dir)
    tokenizer = models.load_tokenizer(base.ref, base.revision)
    chat_template.end_of_turn_token(tokenizer)  # fails early on a template that cannot end a turn
    lengths = Lengths(tokenizer)
    split_dir = Path(params.paths.split_dir)
    metrics: dict[str, Any] = {}
    histogram: Counter[int] = Counter()
    preference_out: dict[str, list[dict[str, Any]]] = {}

    for part, target in (("train", params.paths.train_file), ("val", params.paths.val_file)):
        files = sorted((split_dir / part).glob("*.jsonl"))
        preference, index = _index(files)
        preference_out[part] = sorted(preference, key=lambda r: order_key(seed, part, r["id"]))
        chosen: list[tuple[int, int, int, int]] = []  # (order key, file number, offset, copy)
        for number, path in enumerate(files):
            offsets, ids = index[path.stem]
            unknown = set(mixture) - {p.stem for p in files} if part == "train" and number == 0 else set()
            if unknown:
                raise ValueError(f"params.yaml merge_data.mixture names unknown sources {sorted(unknown)}; "
                                 f"sources are {sorted(p.stem for p in files)}")
            take = _mix(len(ids), mixture.get(path.stem)) if part == "train" else len(ids)
            positions, copies = _selection(ids, take, seed, path.stem)
            chosen += [(order_key(seed, part, int(ids[p]), int(c)), number, int(offsets[p]), int(c))
                       for p, c in zip(positions, copies, strict=True)]
        chosen.sort()
        stats: dict[str, Counter[str]] = defaultdict(Counter)
        handles = [open(p, "rb") for p in files]  # noqa: SIM115 - closed below, many at once

        sample_every = max(1, math.ceil(len(chosen) / TOKEN_SAMPLE))

        def records(chosen=chosen, handles=handles, stats=stats, part=part,
                    sample_every=sample_every) -> Iterator[dict[str, Any]]:
            for start in range(0, len(chosen), BATCH):
                batch = []
                for key, number, offset, _copy in chosen[start:start + BATCH]:
                    handles[number].seek(offset)
                    batch.append((key, orjson.loads(handles[number].readline())))
                texts = [lengths.render(r["messages"]) for _, r in batch]
                sizes = [len(t.encode("utf-8")) for t in texts]
                # Tokens never outnumber bytes: count only what may be too long, and the statistics' sample.
                todo = [i for i, (key, _) in enumerate(batch) if sizes[i] > max_length or key % sample_every == 0]
                counted = dict(zip(todo, lengths.count([texts[i] for i in todo]), strict=True))
                for i, (key, record) in enumerate(batch):
                    source = stats[record["source"]]
                    n_tokens = counted.get(i)
                    size = sizes[i]
                    if n_tokens is not None and n_tokens > max_length:
                        cut = _truncate(record["messages"], lengths, max_length) if policy == "truncate" else None
                        if cut is None:
                            source["dropped_too_long"] += 1
                            continue
                        source["truncated"] += 1
                        record = record | {"messages": cut}
                        size = len(lengths.render(cut).encode("utf-8"))
                        n_tokens = lengths([cut])[0] if key % sample_every == 0 else None
                    source["rows"] += 1
                    source["turns"] += len(record["messages"])
                    source["bytes"] += size
                    if key % sample_every == 0 and n_tokens is not None:
                        source["sampled_rows"] += 1
                        source["sampled_bytes"] += size
                        source["sampled_tokens"] += n_tokens
                        if part == "train":
                            histogram[min(n_tokens * HISTOGRAM_BINS // max_length, HISTOGRAM_BINS - 1)] += 1
                    yield record

        try:
            written = write_jsonl(target, records())
        finally:
            for handle in handles:
                handle.close()
        metrics[part] = {"rows": written, "sources": {k: _token_stats(v) for k, v in sorted(stats.items())},
                         "preference_rows": len(preference)}
        log.info("%s: %d records -> %s", part, written, target)

    with atomic_dir(params.paths.preference_dir) as out:
        for part, recs in preference_out.items():
            write_jsonl(out / f"{part}.jsonl", recs)
    width = math.ceil(max_length / HISTOGRAM_BINS)
    with atomic_file(params.paths.length_plot) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["tokens", "records"])
        writer.writerows([(b * width, histogram[b]) for b in range(HISTOGRAM_BINS)])
    write_json(params.paths.data_metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
