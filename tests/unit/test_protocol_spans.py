"""correlator.protocol_spans: segment records in, spans out (the decoders have their own tests)."""

from __future__ import annotations

from correlator.clock import WallClock
from correlator.protocol_spans import ProtocolSpans
from correlator.segments import PROTO_REDIS, Segment, SegmentRecord
from correlator.spans import SpanKind, StatusCode

TRACE = bytes(range(16))
PARENT = b"\x11" * 8


def _rec(seq: int, egress: bool, data: bytes, ts: int, *, closed: bool = False, proto: int = PROTO_REDIS,
         ctx: bool = True) -> SegmentRecord:
    seg = Segment(conn_id=0xABC, pid=7, tid=7, egress=egress, start_ns=ts, end_ns=ts + 10, length=len(data), data=data)
    client_write = egress and ctx
    return SegmentRecord(seg=seg, proto=proto, client=True, closed=closed, seq=seq, from_start=seq == 0, tls=False,
                         family=2, local_addr="127.0.0.1", local_port=40000, remote_addr="127.0.0.1",
                         remote_port=6379, parent_kind=1 if client_write else 0,
                         trace_id=TRACE if client_write else b"", parent_span_id=PARENT if client_write else b"",
                         sampled=True, ambiguous=False)


def test_a_client_operation_takes_the_context_of_the_write_that_started_it() -> None:
    ps = ProtocolSpans(WallClock(1_000), b"salt")
    assert ps.feed(_rec(0, True, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 100)) == []
    (span,) = ps.feed(_rec(1, False, b"$-1\r\n", 200))
    assert span.kind == SpanKind.CLIENT and span.name.startswith("GET")
    assert span.trace_id == TRACE and span.parent_span_id == PARENT
    assert span.attributes["kspan.parent.source"] == "thread" and span.attributes["server.port"] == 6379
    assert span.start_ns == 1_100 and span.end_ns >= span.start_ns and span.pid == 7
    # the same segments give the same span id (a replay), another salt another
    again = ProtocolSpans(WallClock(1_000), b"salt")
    again.feed(_rec(0, True, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 100))
    assert again.feed(_rec(1, False, b"$-1\r\n", 200))[0].span_id == span.span_id
    other = ProtocolSpans(WallClock(1_000), b"pepper")
    other.feed(_rec(0, True, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 100))
    assert other.feed(_rec(1, False, b"$-1\r\n", 200))[0].span_id != span.span_id


def test_errors_gaps_and_the_decoders_counts_reach_the_summary() -> None:
    ps = ProtocolSpans(WallClock(0), b"s")
    ps.feed(_rec(0, True, b"*1\r\n$4\r\nNOPE\r\n", 100))
    (span,) = ps.feed(_rec(3, False, b"-ERR unknown command\r\n", 200))  # seq 1 and 2 were lost
    assert span.status == StatusCode.ERROR and span.attributes["error.type"] == "ERR"
    assert ps.counters["segment_gaps"] == 1
    ps.feed(_rec(4, True, b"*1\r\n$4\r\nPING\r\n", 300))
    (left,) = ps.feed(_rec(5, False, b"", 400, closed=True))  # no reply came: failed at close
    assert left.status == StatusCode.ERROR
    assert ps.counters.get("redis_commands", 0) >= 2 and ps.counters["protocol_spans"] == 2


def test_an_unknown_protocol_and_a_failing_decoder_are_counted(monkeypatch) -> None:  # noqa: ANN001
    ps = ProtocolSpans(WallClock(0), b"s")
    assert ps.feed(_rec(0, True, b"x", 1, proto=99)) == []
    assert ps.counters["unknown_protocol"] == 1

    class Broken:
        counters: dict[str, int] = {}

        def feed(self, seg: Segment) -> list:
            raise RuntimeError("bug")

        def close(self, now_ns: int) -> list:
            return []

    monkeypatch.setattr(ps, "_factory", lambda proto: Broken)
    assert ps.feed(_rec(0, True, b"*1\r\n", 1)) == []
    assert ps.counters["decoder_errors"] == 1


# -- both ends of a local connection (the kernel's TCP sequence numbers and peer contexts) ------

PING2 = b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$1\r\nx\r\n"  # two pipelined commands, one write
C2S, S2C = 0xFFFFFFF0, 7000  # the request stream wraps inside the write


def _end(conn: int, client: bool, egress: bool, data: bytes, pos: int, ts: int, seq: int, *,
         peer: tuple[int, int] | None = None) -> SegmentRecord:
    """A record of one end of 127.0.0.1:40000 -> 127.0.0.1:6379 with its stream position."""
    seg = Segment(conn_id=conn, pid=conn, tid=conn, egress=egress, start_ns=ts, end_ns=ts + 5, length=len(data),
                  data=data, pos=pos)
    here, there = ((40000, 6379) if client else (6379, 40000))
    ctx = client and egress
    return SegmentRecord(seg=seg, proto=PROTO_REDIS, client=client, closed=False, seq=seq, from_start=seq == 0,
                         tls=False, family=2, local_addr="127.0.0.1", local_port=here, remote_addr="127.0.0.1",
                         remote_port=there, parent_kind=1 if ctx else 0,
                         trace_id=TRACE if ctx or peer else b"", parent_span_id=PARENT if ctx else b"",
                         sampled=True, ambiguous=False, seq_known=True, peer=peer is not None,
                         ctx_seq=peer[0] if peer else 0, ctx_end=peer[1] if peer else 0)


def _both_ends(peer: tuple[int, int] | None) -> tuple[list, list, ProtocolSpans]:  # noqa: ANN401
    ps = ProtocolSpans(WallClock(0), b"salt")
    reply = b"+PONG\r\n$1\r\nx\r\n"
    ps.feed(_end(1, True, True, PING2, C2S, 100, 0))
    client = ps.feed(_end(1, True, False, reply, S2C, 300, 1))
    # the server read the write in two parts: the second command (at 14) starts in the second read
    ps.feed(_end(2, False, False, PING2[:10], C2S, 150, 0, peer=peer))
    ps.feed(_end(2, False, False, PING2[10:], (C2S + 10) & 0xFFFFFFFF, 160, 1, peer=peer))
    server = ps.feed(_end(2, False, True, reply, S2C, 200, 2, peer=peer))
    return client, server, ps


def test_pipelined_requests_get_distinct_span_ids_and_a_local_server_is_the_clients_child() -> None:
    client, server, ps = _both_ends((C2S, (C2S + len(PING2)) & 0xFFFFFFFF))
    assert [s.name for s in client] == ["PING", "ECHO"] == [s.name for s in server]
    assert len({s.span_id for s in client + server}) == 4
    for c, s in zip(client, server, strict=True):
        assert c.trace_id == s.trace_id == TRACE and c.parent_span_id == PARENT
        assert s.parent_span_id == c.span_id and s.attributes["kspan.parent.source"] == "peer"
        assert s.kind == SpanKind.SERVER and s.attributes["client.port"] == 40000
    assert ps.counters["peer_unlinked"] == 0
    # a replay gives the same ids
    again, again_srv, _ = _both_ends((C2S, (C2S + len(PING2)) & 0xFFFFFFFF))
    assert [s.span_id for s in again + again_srv] == [s.span_id for s in client + server]


def test_a_request_outside_the_kernels_peer_range_has_no_parent_and_is_counted() -> None:
    """The kernel tied only the bytes from the second command on to the client's write (say a
    newer write began there): the first command's server span links nothing, never a guess."""
    client, server, ps = _both_ends(((C2S + 14) & 0xFFFFFFFF, (C2S + len(PING2)) & 0xFFFFFFFF))
    first, second = server
    assert first.parent_span_id is None and first.trace_id != TRACE
    assert second.parent_span_id == client[1].span_id
    assert ps.counters["peer_unlinked"] == 1


def test_a_server_without_a_local_client_is_a_root_not_counted() -> None:
    client, server, ps = _both_ends(None)
    assert all(s.parent_span_id is None for s in server)
    assert {s.span_id for s in server}.isdisjoint(s.span_id for s in client)
    assert ps.counters["peer_unlinked"] == 0
