"""What the correlator consumes: one finished (or abandoned) HTTP exchange seen by the kernel.

tracer/records.py decodes the kernel's `struct kspan_exchange` (bpf/kspan.h) into these values.
Times are the kernel's CLOCK_MONOTONIC nanoseconds; correlator/clock.py maps them to wall time.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class Role(IntEnum):
    CLIENT = 1  # this process wrote the request
    SERVER = 2  # this process read the request


class EndReason(IntEnum):
    COMPLETE = 1
    NEXT_REQUEST = 2
    CLOSED = 3
    TIMEOUT = 4
    EVICTED = 5


class Source(IntEnum):
    SOCKET = 0
    OPENSSL = 1
    GO = 2


class ParentKind(IntEnum):
    NONE = 0
    THREAD = 1
    PROCESS = 2
    PEER = 3
    GOROUTINE = 4
    TRACEPARENT = 5  # a W3C traceparent header in the request: a remote parent
    TCP_OPTION = 6  # the peer host's kspan sent the context in a TCP option: a remote parent
    EVIDENCE = 7  # event loop: the request carries what names one served request


@dataclass(frozen=True, slots=True)
class ExchangeId:
    """Host-wide identity of an exchange: the connection (kernel socket address) and its request start."""

    conn_id: int
    req_start_ns: int


@dataclass(frozen=True, slots=True)
class ParentHint:
    kind: ParentKind
    pid: int
    exchange: ExchangeId


# Not frozen: a frozen dataclass's __init__ sets each of these fields through object.__setattr__
# (about 4 us instead of 0.6 per Exchange built in Python). Nothing changes an Exchange after it
# is built. The agent's are built by tracer/_records.c, which fills these slots directly and
# checks at import that they are exactly the fields it fills, in this order: a field added here
# is added there too (ParentHint, ExchangeId, MetricExchange and correlator/segments.py's Segment
# and SegmentRecord likewise).
@dataclass(slots=True, eq=True)
class Exchange:
    pid: int
    tid: int
    role: Role
    end: EndReason
    source: Source
    tls: bool
    conn_id: int
    family: int  # 2 = IPv4, 10 = IPv6, 0 = unknown tuple
    local_addr: str  # "" when unknown
    local_port: int
    remote_addr: str
    remote_port: int
    req_start_ns: int
    req_end_ns: int
    resp_start_ns: int  # 0: no response seen
    resp_end_ns: int
    req_bytes: int
    resp_bytes: int
    status: int  # parsed by the kernel; the correlator re-parses resp_head and trusts its own parse
    parent: ParentHint | None
    req_head: bytes
    resp_head: bytes
    resp_tail: bytes
    req_head_truncated: bool = False
    resp_head_truncated: bool = False
    interim_response: bool = False
    # The kernel saw this client request start on a thread (or process) serving several requests
    # at once and could not tell which one it belongs to: no parent, by rule (never a guess).
    parent_ambiguous: bool = False
    # Identity and head-sampling decision fixed in the kernel (kernel_ids): span ids are the 8
    # big-endian bytes of the kernel's u64, parent_span_id b"" for a root. Without kernel_ids
    # (the agent's timeout sweep, recordings made before) the correlator derives both itself.
    trace_id: bytes = b""
    span_id: bytes = b""
    parent_span_id: bytes = b""
    sampled: bool = True
    kernel_ids: bool = False
    remote_parent: bool = False  # parent_span_id names a span outside this host's kspan

    @property
    def id(self) -> ExchangeId:
        return ExchangeId(self.conn_id, self.req_start_ns)


class MetricExchange(NamedTuple):
    """An unsampled exchange (KSPAN_REC_METRIC): only what RED and service-graph metrics need.

    A tuple, not a dataclass: one is built per unsampled request, and metrics aggregate it
    without ever making a span. Addresses stay raw (16 bytes) until a metric needs one."""

    pid: int
    role: int  # Role value
    end: int  # EndReason value
    tls: bool
    status: int  # the kernel's parse of the final status line; 0 if none
    responded: bool  # a response byte was seen
    start_ns: int
    end_ns: int
    family: int  # 0: tuple unknown
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int
    parent_kind: int  # ParentKind value
    parent_pid: int
    span_id: bytes  # b"" without kernel ids
    parent_span_id: bytes  # b"": a root
    req_head: bytes  # the first bytes of the request head (METRIC_HEAD at most)


class TcpEventKind(IntEnum):
    RETRANSMIT = 1
    RESET_SENT = 2
    RESET_RECEIVED = 3
    CONNECT_FAILED = 4
    RTT = 5


@dataclass(frozen=True, slots=True)
class TcpEvent:
    """A TCP-level event from the kernel's tcp:/sock: tracepoints (network metrics)."""

    kind: TcpEventKind
    pid: int  # 0 when it fired outside any process context
    ts_ns: int
    conn_id: int
    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    value: int  # RTT in microseconds for RTT
