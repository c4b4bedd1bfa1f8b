"""Which params a stage reads: a tracking view of `Params`, and params sections as plain data."""

from __future__ import annotations

import dataclasses
from typing import Any


class TrackedParams:
    """A read-only view of a params dataclass that records every leaf key read through it.

    Used by the tests to check that dvc.yaml declares exactly the params each stage reads. A tuple of
    dataclasses (a list in YAML, such as `data.sources`) counts as one leaf: DVC tracks it as one key.
    """

    def __init__(self, obj: Any, prefix: str = "", reads: set[str] | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "reads", reads if reads is not None else set())

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        key = f"{self._prefix}{name}"
        if dataclasses.is_dataclass(value):
            return TrackedParams(value, f"{key}.", self.reads)
        self.reads.add(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(name)


def to_dict(section: Any) -> dict[str, Any]:
    """A params section as plain data (for JSON); read through a TrackedParams view, every key counts as read."""
    if isinstance(section, TrackedParams):
        return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section._obj)}
    return dataclasses.asdict(section)


def _plain(value: Any) -> Any:
    if isinstance(value, TrackedParams):
        return to_dict(value)
    if isinstance(value, tuple):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value
