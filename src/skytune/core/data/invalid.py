"""The error a converter raises for a row that cannot become a valid record."""

from __future__ import annotations

from skytune.core.errors import SkytuneError


class InvalidRecord(SkytuneError):
    """A record that cannot become a valid conversation; `field` names the key at fault."""

    def __init__(self, field: str, reason: str, detail: str = "") -> None:
        self.field = field
        self.reason = reason  # a fixed phrase, so that rejects group by reason in the metrics
        self.detail = detail  # what varies: the offending value
        super().__init__(f"{field}: {reason}" + (f" ({detail})" if detail else ""))
