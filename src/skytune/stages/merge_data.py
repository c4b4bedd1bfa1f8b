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
import json
import logging
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from skytune.core.atomic import (
    atomic_dir,
    atomic_file,
    dumps_line,
    write_json,
    write_jsonl,
)
from skytune.core.chat import chat_template
from skytune.core.data import identity
from skytune.core.data.parallel import map_in_processes
from skytune.core.data.records import SUMMARY_FILE, mix64, order_key
from skytune.core.errors import SkytuneError
from skytune.core.models.base import BaseModel, load_tokenizer
from skytune.core.params import MixParams, Params
from skytune.stages import run_stage

log = logging.getLogger(__name__)

BATCH = 1024  # records tokenized together: the fast tokenizer works on whole batches
CHUNK = 100_000  # records per worker process at the least: below that, one process does it all
HISTOGRAM_BINS = 16
TOKEN_SAMPLE = 20_000  # conversations counted exactly for the statistics (all of them below this)


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


def _selection(ids: np.ndarray, take: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """`take` positions out of len(ids), by a seeded ranking of ids, repeating the ranking when take > len;
    returns the positions and the copy number of each."""
    n = len(ids)
    if n == 0 or take == 0:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    if take == n:
        return np.arange(n), np.zeros(n, dtype=np.int64)
    rank = np.argsort(mix64(ids, salt), kind="stable")
    picks = np.arange(take)
    return rank[picks % n], picks // n


class Lengths:
    """Exact token counts of conversations rendered with the model's chat template, in batches."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.render = chat_template.Renderer(tokenizer)
        self.checked: set[tuple[bool, bool]] = set()  # kinds of structured conversations the template writes
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.count = lambda texts: [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        else:  # a slow (Python) tokenizer
            self.count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def __call__(self, conversations: list[list[dict[str, Any]]], tools: list[dict[str, Any]] | None = None,
                 ) -> list[int]:
        return self.count([self.render(c, tools) for c in conversations]) if conversations else []


def _truncate(record: dict[str, Any], lengths: Lengths, max_length: int) -> list[dict[str, Any]] | None:
    """The longest prefix ending with an assistant turn that fits, or None."""
    messages = record["messages"]
    ends = [i + 1 for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
    for end in reversed(ends):
        if lengths([messages[:end]], record.get("tools"))[0] <= max_length:
            return messages[:end]
    return None


def _render(lengths: Lengths, record: dict[str, Any], template: str) -> str:
    messages, tools = record["messages"], record.get("tools")
    kind = (bool(tools) or any("tool_calls" in m for m in messages), any("reasoning_content" in m for m in messages))
    if any(kind) and kind not in lengths.checked:  # before training: a template with no place for them is an error
        chat_template.check_writes(lengths.tokenizer, messages, tools, template)
        lengths.checked.add(kind)
    try:
        return lengths.render(messages, tools)
    except Exception as exc:  # jinja raises its own types, and templates raise on purpose (roles they refuse)
        raise SkytuneError(f"the chat template failed on record {record['id']} of source {record['source']}: {exc}. "
                         "Filter such records out or choose another template") from exc


def _write_chunk(job: tuple) -> tuple[dict[str, Counter[str]], Counter[int], int]:
    """Write a contiguous run of the final order to its own file, measuring and length-checking each record;
    return per-source counts, the length histogram and how many were written. Runs in a worker process."""
    files, keys, numbers, offsets, out_path, base, max_length, policy, sample_every, histogram_on, template = job
    lengths = Lengths(load_tokenizer(base))
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    histogram: Counter[int] = Counter()

    def records() -> Iterator[dict[str, Any]]:
        handles = [open(p, "rb") for p in files]  # noqa: SIM115 - closed below, many at once
        try:
            rows = list(zip(keys.tolist(), numbers.tolist(), offsets.tolist(), strict=True))
            for start in range(0, len(rows), BATCH):
                batch = []
                for key, number, offset in rows[start:start + BATCH]:
                    handles[number].seek(offset)
                    batch.append((key, orjson.loads(handles[number].readline())))
                texts = [_render(lengths, r, template) for _, r in batch]
                sizes = [len(t.encode("utf-8")) for t in texts]
                # Tokens never outnumber bytes: count only what may be too long, and the statistics' sample.
                todo = [i for i, (key, _) in enumerate(batch) if sizes[i] > max_length or key % sample_every == 0]
                counted = dict(zip(todo, lengths.count([texts[i] for i in todo]), strict=True))
                for i, (key, record) in enumerate(batch):
                    source = stats[record["source"]]
                    n_tokens = counted.get(i)
                    size = sizes[i]
                    if n_tokens is not None and n_tokens > max_length:
                        cut = _truncate(record, lengths, max_length) if policy == "truncate" else None
                        if cut is None:
                            source["dropped_too_long"] += 1
                            continue
                        source["truncated"] += 1
                        record = record | {"messages": cut}
                        size = len(lengths.render(cut, record.get("tools")).encode("utf-8"))
                        n_tokens = lengths([cut], record.get("tools"))[0] if key % sample_every == 0 else None
                    source["rows"] += 1
                    source["turns"] += len(record["messages"])
                    source["bytes"] += size
                    if key % sample_every == 0 and n_tokens is not None:
                        source["sampled_rows"] += 1
                        source["sampled_bytes"] += size
                        source["sampled_tokens"] += n_tokens
                        if histogram_on:
                            histogram[min(n_tokens * HISTOGRAM_BINS // max_length, HISTOGRAM_BINS - 1)] += 1
                    yield record
        finally:
            for handle in handles:
                handle.close()

    with open(out_path, "wb") as out:
        n = 0
        for record in records():
            out.write(dumps_line(record))
            n += 1
    return dict(stats), histogram, n


def _token_stats(counts: Counter[str], overall_per_byte: float) -> dict[str, Any]:
    """Per-source counts, with `tokens` exact when every row was counted, else bytes x sampled tokens per byte
    (the source's own sample, or all sources' when the sample missed it)."""
    exact = counts["sampled_rows"] == counts["rows"]
    per_byte = counts["sampled_tokens"] / counts["sampled_bytes"] if counts["sampled_bytes"] else overall_per_byte
    out = {k: v for k, v in counts.items() if not k.startswith("sampled_")}
    return dict(sorted((out | {"tokens": counts["sampled_tokens"] if exact else round(counts["bytes"] * per_byte),
                               "tokens_exact": exact, "tokens_sample_rows": counts["sampled_rows"]}).items()))


def _check_mixture(mixture: dict[str, MixParams], sources: list[str]) -> None:
    # The generated identity source exists only while identity.enabled: the default mixture names it.
    unknown = set(mixture) - set(sources) - {identity.SOURCE}
    if unknown:
        raise SkytuneError(f"params.yaml merge_data.mixture names unknown sources {sorted(unknown)}; "
                           f"sources are {sorted(sources)}")


def final_order(index: dict[str, tuple[np.ndarray, np.ndarray]], files: list[Path], part: str,
                mixture: dict[str, MixParams], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The records of `part` in their final order, as (order keys, file numbers, byte offsets): the mixture's
    selection of each train source (val whole), ordered by a seeded hash of (id, copy) so that repeated records
    spread over the file. Pure: same index, mixture and seed, same order."""
    keys, numbers, offsets_all = [], [], []
    for number, path in enumerate(files):
        offsets, ids = index[path.stem]
        take = _mix(len(ids), mixture.get(path.stem)) if part == "train" else len(ids)
        positions, copies = _selection(ids, take, order_key(seed, "mix", path.stem))
        keys.append(mix64(ids[positions] ^ mix64(copies.astype(np.uint64), 1), order_key(seed, part)))
        numbers.append(np.full(len(positions), number, dtype=np.int64))
        offsets_all.append(offsets[positions])
    order_keys, file_numbers, file_offsets = (np.concatenate(a) if a else np.array([], dtype=np.int64)
                                              for a in (keys, numbers, offsets_all))
    order = np.lexsort((file_offsets, file_numbers, order_keys))
    return order_keys[order], file_numbers[order], file_offsets[order]


def _write_part(files: list[Path], order: tuple[np.ndarray, np.ndarray, np.ndarray], target: str, base: BaseModel,
                params: Params, histogram_on: bool) -> tuple[dict[str, Counter[str]], Counter[int], int]:
    """Write the records of `order` to `target`: contiguous chunks of the order in worker processes, joined in
    order. Returns per-source counts, the length histogram and how many records were written."""
    order_keys, file_numbers, file_offsets = order
    sample_every = max(1, math.ceil(len(order_keys) / TOKEN_SAMPLE))
    bounds = np.linspace(0, len(order_keys), min(os.cpu_count() or 1, max(1, len(order_keys) // CHUNK)) + 1)
    chunks = [(files, order_keys[a:b], file_numbers[a:b], file_offsets[a:b],
               Path(target).with_name(f".{Path(target).name}.chunk{i}"), base,
               params.train.max_length, params.data.length_policy, sample_every, histogram_on,
               f"model.chat_template: {params.model.chat_template}, for {base.name}")
              for i, (a, b) in enumerate(zip(bounds[:-1].astype(int), bounds[1:].astype(int), strict=True))]
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    histogram: Counter[int] = Counter()
    written = 0
    try:
        for chunk_stats, chunk_histogram, n in map_in_processes(_write_chunk, chunks):
            for source, counts in chunk_stats.items():
                stats[source].update(counts)
            histogram.update(chunk_histogram)
            written += n
        with atomic_file(target, "wb") as out:
            for chunk in chunks:
                with open(chunk[4], "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
    finally:
        for chunk in chunks:
            chunk[4].unlink(missing_ok=True)
    return stats, histogram, written


def _part_metrics(stats: dict[str, Counter[str]], written: int, preference_rows: int) -> dict[str, Any]:
    sampled: Counter[str] = Counter()
    for counts in stats.values():
        sampled.update(counts)
    per_byte = sampled["sampled_tokens"] / sampled["sampled_bytes"] if sampled["sampled_bytes"] else 0.0
    return {"rows": written, "preference_rows": preference_rows,
            "sources": {k: _token_stats(v, per_byte) for k, v in sorted(stats.items())}}


def _write_length_plot(path: str, histogram: Counter[int], max_length: int) -> None:
    width = math.ceil(max_length / HISTOGRAM_BINS)
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["tokens", "records"])
        writer.writerows([(b * width, histogram[b]) for b in range(HISTOGRAM_BINS)])


def main(params: Params) -> None:
    seed, mixture = params.base.seed, params.merge_data.mixture
    base = BaseModel.load(params.paths.base_model_dir)
    chat_template.end_of_turn_token(load_tokenizer(base))  # fail early on a template that cannot end a turn
    split_dir = Path(params.paths.split_dir)
    metrics: dict[str, Any] = {}
    histogram: Counter[int] = Counter()
    preference_out: dict[str, list[dict[str, Any]]] = {}
    for part, target in (("train", params.paths.train_file), ("val", params.paths.val_file)):
        files = sorted((split_dir / part).glob("*.jsonl"))
        if part == "train":
            _check_mixture(mixture, [f.stem for f in files])
        preference, index = _index(files)
        preference_out[part] = sorted(preference, key=lambda r: order_key(seed, part, r["id"]))
        order = final_order(index, files, part, mixture, seed)
        stats, part_histogram, written = _write_part(files, order, target, base, params, part == "train")
        histogram.update(part_histogram)
        metrics[part] = _part_metrics(stats, written, len(preference))
        log.info("%s: %d records -> %s", part, written, target)

    with atomic_dir(params.paths.preference_dir) as out:
        for part, recs in preference_out.items():
            write_jsonl(out / f"{part}.jsonl", recs)
    _write_length_plot(params.paths.length_plot, histogram, params.train.max_length)
    # split's dedup counts live inside its output directory; surface them as metrics here
    metrics["split"] = json.loads((split_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    write_json(params.paths.data_metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
