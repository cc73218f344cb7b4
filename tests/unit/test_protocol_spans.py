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
