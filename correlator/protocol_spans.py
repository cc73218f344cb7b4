"""Spans of the protocols beyond HTTP/1: segment records in, one decoder per connection
(correlator/protocols/), an Operation per request and its response, a span per operation.

Pure and deterministic like the rest of the correlator. A client operation joins the trace the
kernel named on the write that started it (the same parent rules and sampling as an HTTP
request: the thread or goroutine serving a request, evidence, or a new trace). Its span id is a
keyed hash of the connection and the request's start, so a replay gives the same ids.
"""

from __future__ import annotations

import importlib
import inspect
import struct
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b

from correlator.clock import WallClock
from correlator.linker import PARENT_SOURCE_ATTR, parent_source
from correlator.segments import (
    PROTO_HTTP2,
    PROTO_MYSQL,
    PROTO_POSTGRES,
    PROTO_REDIS,
    Operation,
    SegmentRecord,
    StreamDecoder,
)
from correlator.spans import Span, SpanKind, StatusCode

# Each protocol's decoder class, by module and name (imported on first use).
DECODERS: dict[int, tuple[str, str]] = {
    PROTO_REDIS: ("correlator.protocols.redis", "RedisDecoder"),
    PROTO_POSTGRES: ("correlator.protocols.postgres", "PostgresDecoder"),
    PROTO_MYSQL: ("correlator.protocols.mysql", "MySQLDecoder"),
    PROTO_HTTP2: ("correlator.protocols.http2", "Http2Decoder"),
}

_CONTEXTS_PER_CONN = 64  # client writes whose context is kept until their operation completes
_PROTO_NAMES = {PROTO_REDIS: "redis", PROTO_POSTGRES: "postgresql", PROTO_MYSQL: "mysql", PROTO_HTTP2: "http2"}
_pack = struct.Struct("<QQ").pack


class _Conn:
    __slots__ = ("decoder", "next_seq", "contexts", "rec")

    def __init__(self, decoder: StreamDecoder, rec: SegmentRecord) -> None:
        self.decoder = decoder
        self.next_seq = 0
        self.contexts: OrderedDict[int, SegmentRecord] = OrderedDict()  # write start -> its record
        self.rec = rec  # the connection's latest record: its tuple and pid


class ProtocolSpans:
    def __init__(self, clock: WallClock, salt: bytes, max_conns: int = 16384) -> None:
        self._clock = clock
        self._salt = salt
        self._conns: OrderedDict[int, _Conn] = OrderedDict()
        self._max_conns = max_conns
        self._factories: dict[int, Callable[..., StreamDecoder] | None] = {}
        self.counters: dict[str, int] = {"segments": 0, "segment_gaps": 0, "unknown_protocol": 0,
                                         "decoder_errors": 0, "protocol_spans": 0, "connections_evicted": 0}

    def _factory(self, proto: int) -> Callable[..., StreamDecoder] | None:
        if proto not in self._factories:
            where = DECODERS.get(proto)
            f = None
            if where is not None:
                try:
                    f = getattr(importlib.import_module(where[0]), where[1])
                except (ImportError, AttributeError):
                    f = None
            self._factories[proto] = f
        return self._factories[proto]

    @staticmethod
    def _new(factory: Callable[..., StreamDecoder], rec: SegmentRecord) -> StreamDecoder:
        """A decoder told what the kernel knows: which end the traced process is, and whether the
        connection is seen from its first byte (for the decoders that take either)."""
        params = inspect.signature(factory).parameters
        kwargs: dict[str, bool] = {}
        if "client" in params:
            kwargs["client"] = rec.client
        if "from_start" in params:
            kwargs["from_start"] = rec.from_start
        return factory(**kwargs)

    def feed(self, rec: SegmentRecord) -> list[Span]:
        self.counters["segments"] += 1
        key = rec.seg.conn_id
        conn = self._conns.get(key)
        if conn is None:
            factory = self._factory(rec.proto)
            if factory is None:
                self.counters["unknown_protocol"] += 1
                return []
            conn = self._conns[key] = _Conn(self._new(factory, rec), rec)
            if len(self._conns) > self._max_conns:
                _, old = self._conns.popitem(last=False)
                self.counters["connections_evicted"] += 1
                self._close_quietly(old, rec.seg.end_ns)
        else:
            self._conns.move_to_end(key)
        if rec.seq != conn.next_seq:
            self.counters["segment_gaps"] += 1  # records lost in the ring buffer: the decoder resyncs
        conn.next_seq = rec.seq + 1
        conn.rec = rec
        try:
            if rec.closed:
                del self._conns[key]
                ops = conn.decoder.close(rec.seg.end_ns)
                self._tally(conn)
            else:
                if rec.client and rec.seg.egress and rec.trace_id:
                    conn.contexts[rec.seg.start_ns] = rec
                    if len(conn.contexts) > _CONTEXTS_PER_CONN:
                        conn.contexts.popitem(last=False)
                ops = conn.decoder.feed(rec.seg)
        except Exception:  # noqa: BLE001 - a decoder bug must never stop the agent: count it
            self.counters["decoder_errors"] += 1
            return []
        return [self._span(conn, op) for op in ops]

    def _close_quietly(self, conn: _Conn, now_ns: int) -> None:
        try:
            conn.decoder.close(now_ns)
        except Exception:  # noqa: BLE001 - see feed
            self.counters["decoder_errors"] += 1
        self._tally(conn)

    def _tally(self, conn: _Conn) -> None:
        """A finished connection's decoder counts (what it could not decode, stepped over or
        resynchronised on) join the agent's, named by protocol, for the stop summary."""
        name = _PROTO_NAMES.get(conn.rec.proto, str(conn.rec.proto))
        for k, v in getattr(conn.decoder, "counters", {}).items():
            if v and isinstance(v, int):
                key = f"{name}_{k}"
                self.counters[key] = self.counters.get(key, 0) + v

    def _context(self, conn: _Conn, start_ns: int) -> SegmentRecord | None:
        """The record of the client write that started the operation (the newest at or before it)."""
        best = None
        for ts, rec in conn.contexts.items():
            if ts <= start_ns:
                best = rec
        return best

    def _span(self, conn: _Conn, op: Operation) -> Span:
        self.counters["protocol_spans"] += 1
        rec = conn.rec
        ident = blake2b(_pack(rec.seg.conn_id, op.start_ns), key=self._salt, digest_size=24).digest()
        span_id = ident[:8]
        ctx = self._context(conn, op.start_ns) if op.client else None
        if ctx is not None:
            trace_id = ctx.trace_id
            parent = ctx.parent_span_id or None
            kind = ctx.parent_kind if parent else 0
            sampled = ctx.sampled
        else:
            trace_id, parent, kind, sampled = ident[8:24], None, 0, True
        attrs = dict(op.attributes)
        if rec.family:
            if op.client:
                attrs.setdefault("server.address", rec.remote_addr)
                attrs.setdefault("server.port", rec.remote_port)
            else:
                attrs.setdefault("client.address", rec.remote_addr)
                attrs.setdefault("client.port", rec.remote_port)
            attrs["network.peer.address"] = rec.remote_addr
            attrs["network.peer.port"] = rec.remote_port
        attrs[PARENT_SOURCE_ATTR] = parent_source(kind)
        status, message = StatusCode.UNSET, ""
        if op.error:
            status = StatusCode.ERROR
            attrs.setdefault("error.type", op.error)
            message = op.error_message or ""
        wall = self._clock.to_wall
        return Span(
            trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=op.name,
            kind=SpanKind.CLIENT if op.client else SpanKind.SERVER,
            start_ns=wall(op.start_ns), end_ns=wall(max(op.end_ns, op.start_ns)), pid=op.pid or rec.seg.pid,
            attributes=attrs, status=status, status_message=message, sampled=sampled,
        )

    def flush(self, now_ns: int) -> list[Span]:
        out: list[Span] = []
        for conn in list(self._conns.values()):
            try:
                out.extend(self._span(conn, op) for op in conn.decoder.close(now_ns))
            except Exception:  # noqa: BLE001 - see feed
                self.counters["decoder_errors"] += 1
            self._tally(conn)
        self._conns.clear()
        return out
