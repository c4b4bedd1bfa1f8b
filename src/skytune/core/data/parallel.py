"""Running independent per-source work on every core: the data stages are CPU-bound Python."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_processes(fn: Callable[[T], R], items: Sequence[T], weights: Sequence[float] | None = None,
                     workers: int | None = None) -> list[R]:
    """`[fn(item) for item in items]`, in worker processes when there are several items and cores.

    Heaviest items (by `weights`, say file sizes) start first, so the cores finish together. Results keep the
    order of `items`, so outputs do not depend on scheduling; the first exception is re-raised. `fn` must be a
    module-level function and `items` picklable. Workers are forked (on Linux), so they start with what the
    parent has imported.
    """
    workers = min(workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    order = sorted(range(len(items)), key=lambda i: -(weights[i] if weights else 0))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        return [futures[i].result() for i in range(len(items))]
