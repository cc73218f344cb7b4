"""The input of the protocol decoders beyond HTTP/1 (Redis, PostgreSQL, MySQL, HTTP/2 and gRPC):
one socket transfer as the kernel copies it, and what a decoder makes of a connection's stream.

The kernel copies at most SEGMENT_DATA bytes of each transfer (a bounded copy), so a decoder sees
`data` shorter than `length` whenever a transfer was larger: the bytes in between are a gap it must
step over by the protocol's own framing (a length prefix tells how far), or give up on the
connection until it can resynchronise, counting what it could not decode. A connection may also
be picked up after its start (the agent started later): the first segment can begin mid-message.
Decoders are pure and deterministic: the same segments give the same operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from correlator.spans import AttrValue

# Bytes of each transfer the kernel copies for the protocols beyond HTTP/1.
SEGMENT_DATA = 512


# Segment and SegmentRecord are built by tracer/_records.c, slot by slot (see correlator/records.py's
# Exchange): their fields and its are changed together.
@dataclass(frozen=True, slots=True)
class Segment:
    conn_id: int  # the kernel's struct sock address: one connection, one end
    pid: int
    tid: int
    egress: bool  # this process wrote the bytes (False: it read them)
    start_ns: int  # CLOCK_MONOTONIC: a write's start; a read's data arrival
    end_ns: int
    length: int  # bytes transferred
    data: bytes  # the first min(length, SEGMENT_DATA) of them
    # Where data[0] sits in its direction's byte stream, modulo 2**32: the TCP sequence number of
    # the transfer's first byte when the kernel read it (both ends of a local connection then name
    # a request by the same position), else the bytes of that direction seen before it (TLS).
    pos: int = 0

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.length


# enum kspan_proto (bpf/kspan.h)
PROTO_REDIS = 1
PROTO_POSTGRES = 2
PROTO_MYSQL = 3
PROTO_HTTP2 = 4


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """A segment with what the kernel knew of its connection and, for a client's write, of the
    trace the request joins (the same parent rules and sampling as an HTTP request)."""

    seg: Segment
    proto: int  # PROTO_*
    client: bool  # the traced process is the connection's client end
    closed: bool  # the connection closed: no data, the decoder ends what is open
    seq: int  # segments of the connection the kernel emitted before this one (a gap: lost)
    from_start: bool  # the protocol's first bytes opened the connection (not picked up mid-stream)
    tls: bool
    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    parent_kind: int  # correlator.records.ParentKind value
    trace_id: bytes  # b"": no context (not a client's write, nor a server's read with a peer's)
    parent_span_id: bytes  # b"": a root
    sampled: bool
    ambiguous: bool
    seq_known: bool = False  # seg.pos is the TCP sequence number (plain TCP, the tuple known)
    # A server's transfer whose local client the kernel knows: trace_id and sampled are the trace
    # of that client's write which began at request-stream position ctx_seq, the latest before
    # ctx_end (the server's read position then), so the requests in [ctx_seq, ctx_end) are that
    # client's.
    peer: bool = False
    ctx_seq: int = 0
    ctx_end: int = 0
    # HTTP/2 walked by the kernel frame by frame: the transfer as frame-aligned sub-transfers (seg's
    # own data is then only the first one's); a decoder is fed these in order instead of seg.
    pieces: tuple[Segment, ...] = ()


@dataclass(slots=True)
class Operation:
    """One request and its response (or its failure) on a connection, from the traced process's
    side: a client span when it sent the request, a server span when it received it."""

    protocol: str  # "redis", "postgresql", "mysql", "http2", "grpc"
    client: bool  # the traced process sent the request
    start_ns: int  # the request's first byte
    end_ns: int  # the response's last byte (the request's end when no response came)
    name: str  # the span name, by the semantic conventions
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    error: str | None = None  # error.type when the operation failed (the span's error status)
    error_message: str | None = None  # a description safe to export (never query literals or values)
    pid: int = 0
    tid: int = 0
    # The request's first byte in the request direction's stream: its segment's pos plus its
    # offset in that segment's data, modulo 2**32 (see Segment.pos). It names the request on both
    # ends and tells apart the requests of one pipelined write. None: the decoder cannot place it.
    req_pos: int | None = None


def stream_pos(seg: Segment, offset: int) -> int:
    """The stream position of seg.data[offset] (an Operation's req_pos)."""
    return (seg.pos + offset) & 0xFFFFFFFF


class StreamDecoder(Protocol):
    """One connection's decoder. `feed` takes the connection's segments in order (both directions
    as the traced process saw them) and returns the operations they completed; `close` the ones
    left open when the connection ended (failed, no response). `counters` names what could not be
    decoded (garbage, gaps, messages cut mid-frame), so no byte is dropped silently."""

    counters: dict[str, int]

    def feed(self, seg: Segment) -> list[Operation]: ...

    def close(self, now_ns: int) -> list[Operation]: ...
