"""Spans of the protocols beyond HTTP/1: segment records in, one decoder per connection
(correlator/protocols/), an Operation per request and its response, a span per operation.

Pure and deterministic like the rest of the correlator. A client operation joins the trace the
kernel named on the write that started it (the same parent rules and sampling as an HTTP
request: the thread or goroutine serving a request, evidence, or a new trace).

A span id is a keyed hash of where its request sits in the connection's byte stream (its TCP
sequence number, Operation.req_pos) and the connection's two endpoints, so a replay gives the same
ids, the requests of one pipelined write get distinct ids, and both ends of a local connection
compute the client's id alike: a server operation whose read the kernel tied to its local
client's write (SegmentRecord.peer) takes the client's span as parent with no waiting, and when
the kernel could not tie it, it has no parent (counted), never a guess.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import struct
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b

from correlator.clock import WallClock
from correlator.linker import PARENT_SOURCE_ATTR, parent_source
from correlator.records import ParentKind
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

_CONTEXTS_PER_CONN = 64  # writes (or peer reads) whose context is kept until their operation completes
_PROTO_NAMES = {PROTO_REDIS: "redis", PROTO_POSTGRES: "postgresql", PROTO_MYSQL: "mysql", PROTO_HTTP2: "http2"}
_MASK = 0xFFFFFFFF
_WINDOW = 1 << 30  # stream positions further apart than this are not compared (they wrap at 4 GiB)
_pack_pos = struct.Struct("<QI").pack
_pack_ns = struct.Struct("<QQQ").pack


def _within(pos: int, start: int, end: int) -> bool:
    """start <= pos < end in stream positions modulo 2**32."""
    return ((pos - start) & _MASK) < ((end - start) & _MASK) < _WINDOW


class _Conn:
    __slots__ = ("decoder", "next_seq", "contexts", "peers", "rec", "pos", "unplaced", "ends")

    def __init__(self, decoder: StreamDecoder, rec: SegmentRecord) -> None:
        self.decoder = decoder
        self.next_seq = 0
        # client writes: (stream position, its end, start_ns, its record), oldest first
        self.contexts: list[tuple[int, int, int, SegmentRecord]] = []
        # server transfers the kernel tied to a local client's write: (the write's position, the
        # server's read position, the record); requests in [position, end) are that client's
        self.peers: list[tuple[int, int, SegmentRecord]] = []
        self.rec = rec  # the connection's latest record: its tuple and pid
        self.pos = [0, 0]  # without TCP sequence numbers (TLS): bytes seen per direction [in, out]
        self.unplaced = 0  # operations a decoder could not place in the stream
        self.ends = b""  # the two endpoints, client first (both ends of a local connection agree)


class ProtocolSpans:
    def __init__(self, clock: WallClock, salt: bytes, max_conns: int = 16384) -> None:
        self._clock = clock
        self._salt = salt
        self._conns: OrderedDict[int, _Conn] = OrderedDict()
        self._max_conns = max_conns
        self._factories: dict[int, Callable[..., StreamDecoder] | None] = {}
        self.counters: dict[str, int] = {"segments": 0, "segment_gaps": 0, "unknown_protocol": 0,
                                         "decoder_errors": 0, "protocol_spans": 0, "connections_evicted": 0,
                                         "peer_unlinked": 0}

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
                seg = rec.seg
                pieces = rec.pieces or (seg,)
                if not rec.seq_known:
                    # no sequence number (TLS plaintext, an old recording): positions count this
                    # end's bytes, unique on the connection though the other end cannot match them
                    d = 1 if seg.egress else 0
                    base = conn.pos[d]
                    pieces = tuple(dataclasses.replace(p, pos=(base + p.pos - seg.pos) & _MASK) for p in pieces)
                    seg = dataclasses.replace(seg, pos=base)
                    conn.pos[d] = (base + seg.length) & _MASK
                end = (seg.pos + seg.length) & _MASK
                if rec.client and seg.egress and rec.trace_id:
                    conn.contexts.append((seg.pos, end, seg.start_ns, rec))
                    if len(conn.contexts) > _CONTEXTS_PER_CONN:
                        del conn.contexts[0]
                elif rec.peer:
                    conn.peers.append((rec.ctx_seq, rec.ctx_end, rec))
                    if len(conn.peers) > _CONTEXTS_PER_CONN:
                        del conn.peers[0]
                ops = []
                for piece in pieces:
                    ops.extend(conn.decoder.feed(piece))
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

    @staticmethod
    def _context(conn: _Conn, op: Operation) -> SegmentRecord | None:
        """The record of the client write that holds the request's first byte (without a position,
        the newest write at or before the request's start)."""
        best = None
        for pos, end, ts, rec in conn.contexts:
            if op.req_pos is not None:
                if _within(op.req_pos, pos, end):
                    return rec
            elif ts <= op.start_ns:
                best = rec
        return best

    @staticmethod
    def _peer(conn: _Conn, req_pos: int) -> SegmentRecord | None:
        """The server transfer whose local client's write holds the request's first byte."""
        for ctx_seq, end, rec in conn.peers:
            if _within(req_pos, ctx_seq, end):
                return rec
        return None

    def _ident(self, conn: _Conn, op: Operation, client: bool) -> bytes:
        """24 bytes naming the client's (client=True) or the server's end of an operation: its span
        id, then a root's trace id. Keyed by the two endpoints and the request's stream position
        when the kernel gave TCP sequence numbers, so both ends of a local connection agree."""
        rec = conn.rec
        end = b"c" if client else b"s"
        if op.req_pos is not None and rec.seq_known and rec.family:
            if not conn.ends:
                here, there = f"{rec.local_addr}|{rec.local_port}", f"{rec.remote_addr}|{rec.remote_port}"
                conn.ends = (f"{here}|{there}" if op.client else f"{there}|{here}").encode()
            msg = conn.ends + _pack_pos(0, op.req_pos) + end
        elif op.req_pos is not None:
            msg = _pack_pos(rec.seg.conn_id, op.req_pos) + end
        else:
            conn.unplaced += 1
            msg = _pack_ns(rec.seg.conn_id, op.start_ns, conn.unplaced) + end
        return blake2b(msg, key=self._salt, digest_size=24).digest()

    def _span(self, conn: _Conn, op: Operation) -> Span:
        self.counters["protocol_spans"] += 1
        rec = conn.rec
        ident = self._ident(conn, op, op.client)
        span_id = ident[:8]
        trace_id, parent, kind, sampled = ident[8:24], None, 0, True
        if op.client:
            ctx = self._context(conn, op)
            if ctx is not None:
                trace_id = ctx.trace_id
                parent = ctx.parent_span_id or None
                kind = ctx.parent_kind if parent else 0
                sampled = ctx.sampled
        elif conn.peers:
            # a local client is on the other end: its span is this one's parent, when the kernel
            # tied the read that holds this request to the client's write
            peer = self._peer(conn, op.req_pos) if op.req_pos is not None and rec.seq_known else None
            if peer is not None:
                trace_id, sampled = peer.trace_id, peer.sampled
                parent, kind = self._ident(conn, op, True)[:8], ParentKind.PEER
            else:
                self.counters["peer_unlinked"] += 1
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
