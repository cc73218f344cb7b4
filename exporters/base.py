"""The one interface every span exporter implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from correlator.spans import ProcessInfo, Span


class SpanExporter(Protocol):
    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        """Send one batch. Return False when the batch could not be delivered (it will be retried
        or dropped and counted by the caller), never raise for a delivery failure."""
        ...

    def shutdown(self) -> None: ...
