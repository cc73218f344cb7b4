"""What the correlator produces: the project's own small span value type.

exporters/ translate it to OTLP; nothing upstream of exporters/ imports OpenTelemetry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

AttrValue = str | int | float | bool


class SpanKind(IntEnum):
    # Values are OTLP's Span.SpanKind numbers, so exporters need no table.
    SERVER = 2
    CLIENT = 3


class StatusCode(IntEnum):
    # OTLP's Status.StatusCode numbers.
    UNSET = 0
    OK = 1
    ERROR = 2


@dataclass(slots=True)
class Span:
    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes
    parent_span_id: bytes | None  # 8 bytes, or None for a root
    name: str
    kind: SpanKind
    start_ns: int  # wall clock, Unix epoch nanoseconds
    end_ns: int
    pid: int  # the process the span belongs to: exporters look up its ProcessInfo
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    status: StatusCode = StatusCode.UNSET
    status_message: str = ""
    trace_state: str = ""
    # The pid of the local process at the other end of this call when kspan linked both ends
    # (a server span's client, a client span's server); 0 when the peer is not a traced process.
    # exporters/ use it for the service graph without re-deriving links.
    peer_pid: int = 0
    # Head sampling kept this span's trace. An unsampled span (one the kernel sent in full, e.g. a
    # timed-out exchange, or a record the correlator decided for) feeds metrics, never exporters.
    sampled: bool = True


@dataclass(slots=True)
class ProcessInfo:
    """The resource of one traced process (gathered by tracer/processes.py at first sight)."""

    pid: int
    service_name: str
    executable_name: str
    command_line: str
    attributes: dict[str, AttrValue] = field(default_factory=dict)  # host.name, k8s.*, container.id ...
