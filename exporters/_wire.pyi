# exporters/_wire.c: ExportTraceServiceRequest bytes from correlator spans.
from collections.abc import Callable, Sequence

from correlator.spans import Span

FIELDS: dict[str, tuple[int, int]]  # "Message.field" -> (field number, wire type), for every field written

def encode_spans(
    spans: Sequence[Span], resource_field: Callable[[int], bytes], scope_field: bytes, flags: int
) -> bytes: ...
