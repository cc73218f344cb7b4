"""Records whose identity and sampling the kernel fixed: decoding (full, metric and version-1
records) and the correlator's direct path (no hold, kspan.parent.source from the kernel)."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import replace

import pytest

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.linker import PARENT_SOURCE_ATTR
from correlator.records import EndReason, ExchangeId, ParentHint, ParentKind, Role
from correlator.sampling import parse_sampler
from correlator.spans import SpanKind, StatusCode
from tests.support.exchanges import make_chain, make_exchange, request_bytes, response_bytes
from tracer import records
from tracer.records import RawExchange

TRACE = bytes(range(1, 17))
SID = 0x0102030405060708
PSID = 0x1112131415161718


def _raw(*, rtype: int = records.REC_EXCHANGE, flags: int = records.FLAG_IDS | records.FLAG_SAMPLED,
         kind: int = 0, role: int = 2, status: int = 200, request: bytes | None = None,
         response: bytes | None = None, span_id: int = SID, parent_span_id: int = PSID) -> bytes:
    r = RawExchange()
    r.type = rtype
    r.pid, r.tid, r.role, r.end_reason, r.source, r.parent_kind = 4242, 4243, role, 1, 0, kind
    r.flags = flags | records.FLAG_TUPLE_KNOWN
    r.family, r.local_port, r.remote_port, r.status = 2, 8080, 40000, status
    r.local_addr[:4] = [127, 0, 0, 1]
    r.remote_addr[:4] = [127, 0, 0, 1]
    r.conn_id, r.req_start_ns, r.req_end_ns = 0xFFFF888000001000, 1_000_000_000, 1_000_010_000
    r.resp_start_ns, r.resp_end_ns = 1_002_000_000, 1_002_500_000
    r.parent_conn_id, r.parent_req_start_ns, r.parent_pid = 0xFFFF888000002000, 999_000_000, 77
    r.trace_id[:] = list(TRACE)
    r.span_id, r.parent_span_id = span_id, parent_span_id
    req = request if request is not None else request_bytes("GET", "/users/7?x=1", host="svc:8080")
    resp = response if response is not None else response_bytes(200, body=b"ok")
    r.req_head_len, r.resp_head_len, r.resp_tail_len = len(req), len(resp), min(8, len(resp))
    r.req_bytes, r.resp_bytes = len(req), len(resp)
    buf = bytearray(bytes(r))
    buf[RawExchange.req_head.offset : RawExchange.req_head.offset + len(req)] = req
    buf[RawExchange.resp_head.offset : RawExchange.resp_head.offset + len(resp)] = resp
    buf[RawExchange.resp_tail.offset : RawExchange.resp_tail.offset + min(8, len(resp))] = resp[-8:]
    if rtype == records.REC_METRIC:
        return bytes(buf[: records.METRIC_SIZE])
    return bytes(buf)


def _legacy(raw: bytes) -> bytes:
    """The same record in the version-1 layout: no identity bytes before req_head."""
    at, end = RawExchange.trace_id.offset, RawExchange.req_head.offset
    return raw[:at] + raw[end:]


def test_decode_kernel_ids() -> None:
    ex = records.decode_exchange(_raw(kind=ParentKind.PEER))
    assert ex.kernel_ids and ex.sampled and not ex.remote_parent
    assert ex.trace_id == TRACE
    # OTLP bytes are the big-endian bytes of the kernel's u64.
    assert ex.span_id == struct.pack(">Q", SID) and ex.parent_span_id == struct.pack(">Q", PSID)
    assert ex.parent == ParentHint(ParentKind.PEER, 77, ExchangeId(0xFFFF888000002000, 999_000_000))
    assert ex.req_head.startswith(b"GET /users/7") and ex.resp_head.startswith(b"HTTP/1.1 200")


def test_decode_flags_remote_root_and_unsampled() -> None:
    ex = records.decode_exchange(_raw(flags=records.FLAG_IDS | records.FLAG_REMOTE_PARENT,
                                      kind=ParentKind.TRACEPARENT))
    assert ex.kernel_ids and not ex.sampled and ex.remote_parent and ex.parent is not None
    assert ex.parent.kind == ParentKind.TRACEPARENT
    root = records.decode_exchange(_raw(parent_span_id=0))
    assert root.parent_span_id == b""
    # Without FLAG_IDS the identity bytes are ignored and the correlator decides sampling.
    old = records.decode_exchange(_raw(flags=records.FLAG_SAMPLED))
    assert not old.kernel_ids and old.sampled and old.trace_id == b"" and old.span_id == b""
    # A record claiming ids with a zero span id is treated as one without them.
    bad = records.decode_exchange(_raw(span_id=0))
    assert not bad.kernel_ids


def test_decode_legacy_layout() -> None:
    raw = _raw(flags=0)
    legacy = _legacy(raw)
    assert len(legacy) == records.LEGACY_EXCHANGE_SIZE == records.EXCHANGE_SIZE - 32
    a, b = records.decode_exchange(raw), records.decode_exchange(legacy)
    assert a == b  # the length tells the layout apart
    assert records.decode_exchange(legacy, legacy=True) == a
    with pytest.raises(ValueError, match="expected 960"):
        records.decode_exchange(legacy, legacy=False)


def test_decode_rejects_foreign_and_short_records() -> None:
    with pytest.raises(ValueError, match="not an exchange"):
        records.decode_exchange(_raw(rtype=records.REC_TCP))
    with pytest.raises(ValueError):
        records.decode_exchange(_raw()[:500])
    bad_enum = bytearray(_raw())
    bad_enum[RawExchange.role.offset] = 9
    with pytest.raises(ValueError, match="unknown enum"):
        records.decode_exchange(bytes(bad_enum))


def test_decode_metric_record() -> None:
    raw = _raw(rtype=records.REC_METRIC, flags=records.FLAG_IDS, kind=ParentKind.PEER, status=503)
    assert len(raw) == records.METRIC_SIZE == RawExchange.req_head.offset + 128
    mx = records.decode_metric(raw)
    assert mx.pid == 4242 and mx.role == Role.SERVER and mx.status == 503 and mx.responded
    assert mx.start_ns == 1_000_000_000 and mx.end_ns == 1_002_500_000
    assert mx.parent_kind == ParentKind.PEER and mx.parent_pid == 77
    assert mx.span_id == struct.pack(">Q", SID) and mx.parent_span_id == struct.pack(">Q", PSID)
    assert mx.req_head.startswith(b"GET /users/7?x=1 HTTP/1.1\r\nHost: svc:8080") and len(mx.req_head) <= 128
    assert mx.local_port == 8080 and mx.family == 2
    with pytest.raises(ValueError, match="not a metric record"):
        records.decode_metric(_raw())
    with pytest.raises(ValueError, match="at least"):
        records.decode_metric(raw[:100])


def test_layout_offsets_match_the_contract() -> None:
    assert RawExchange.trace_id.offset == 152 and RawExchange.req_head.offset == 184
    assert records.EXCHANGE_SIZE == ctypes.sizeof(RawExchange) == 960


# --- the correlator with kernel ids ---------------------------------------------------------


def _ids(ex, trace: bytes, sid: int, psid: int = 0, kind: ParentKind | None = None, sampled: bool = True):
    parent = ex.parent
    if kind is not None:
        parent = ParentHint(kind, parent.pid if parent else 0, parent.exchange if parent else ExchangeId(0, 0))
    return replace(ex, kernel_ids=True, trace_id=trace, span_id=struct.pack(">Q", sid),
                   parent_span_id=struct.pack(">Q", psid) if psid else b"", sampled=sampled, parent=parent)


def _corr(**kw) -> Correlator:
    return Correlator(WallClock(0), CorrelatorConfig(id_salt=b"t", **kw))


def test_spans_with_kernel_ids_leave_at_once_with_the_kernels_ids() -> None:
    chain = make_chain(("A", "B"))
    trace = b"\x42" * 16
    ids = {"client": (1, 0), "A.server": (2, 1), "A.client": (3, 2), "B.server": (4, 3)}
    corr = _corr()
    for ex in chain.exchanges:  # innermost first: B's server span arrives before its parent
        name = next(n for n, e in chain.by_name.items() if e == ex)
        sid, psid = ids[name]
        spans = corr.feed(_ids(ex, trace, sid, psid))
        assert len(spans) == 1, name  # nothing held
        s = spans[0]
        assert s.trace_id == trace and s.span_id == struct.pack(">Q", sid)
        assert s.parent_span_id == (struct.pack(">Q", psid) if psid else None)
        want = {"client": "none", "A.server": "peer", "A.client": "thread", "B.server": "peer"}[name]
        assert s.attributes[PARENT_SOURCE_ATTR] == want
        assert s.sampled
        if name == "A.client":  # its server end (B) came first: the client span knows B's process
            assert s.peer_pid == chain.by_name["B.server"].pid
    st = corr.stats
    assert st.held == 0 and st.peer_waiting == 0 and st.kernel_identified == 4 and st.sampled_exchanges == 4
    assert corr.flush() == []


@pytest.mark.parametrize(("kind", "source"), [
    (ParentKind.THREAD, "thread"), (ParentKind.PROCESS, "process"), (ParentKind.PEER, "peer"),
    (ParentKind.GOROUTINE, "goroutine"), (ParentKind.TRACEPARENT, "traceparent"),
    (ParentKind.TCP_OPTION, "tcp_option"), (ParentKind.EVIDENCE, "evidence"),
])
def test_parent_source_is_the_kernels_parent_kind(kind: ParentKind, source: str) -> None:
    ex = make_exchange(request_bytes(), response_bytes(), local=("127.0.0.1", 8080), remote=("127.0.0.1", 40000))
    (span,) = _corr().feed(_ids(ex, b"\x07" * 16, 9, 8, kind=kind))
    assert span.attributes[PARENT_SOURCE_ATTR] == source
    assert span.parent_span_id == struct.pack(">Q", 8)


def test_a_local_server_without_peer_hint_does_not_wait_when_the_kernel_decided() -> None:
    # The old path would park it for its client (peers.py); the kernel already decided: a root.
    ex = make_exchange(request_bytes(), response_bytes(), local=("127.0.0.1", 8080), remote=("127.0.0.1", 40000))
    corr = _corr()
    (span,) = corr.feed(_ids(ex, b"\x07" * 16, 9))
    assert span.parent_span_id is None and span.attributes[PARENT_SOURCE_ATTR] == "none"
    assert corr.stats.peer_waiting == 0


def test_traceparent_trace_state_and_unsampled() -> None:
    tp_trace = "0af7651916cd43dd8448eb211c80319c"
    req = request_bytes(headers=[("traceparent", f"00-{tp_trace}-b7ad6b7169203331-01"), ("tracestate", "k=v")])
    ex = make_exchange(req, response_bytes())
    (span,) = _corr().feed(_ids(ex, bytes.fromhex(tp_trace), 5, 0xB7AD6B7169203331, kind=ParentKind.TRACEPARENT))
    assert span.trace_state == "k=v" and span.parent_span_id == bytes.fromhex("b7ad6b7169203331")
    corr = _corr()
    (span,) = corr.feed(_ids(ex, b"\x01" * 16, 5, sampled=False))
    assert not span.sampled and span.trace_state == ""  # another trace than the header's
    assert corr.stats.unsampled_exchanges == 1


def test_repeat_of_a_kernel_identified_exchange_is_dropped_and_counted() -> None:
    ex = _ids(make_exchange(request_bytes(), response_bytes()), b"\x03" * 16, 11)
    corr = _corr()
    assert len(corr.feed(ex)) == 1
    # The sweep's TIMEOUT copy of the same exchange, read in the same poll.
    assert corr.feed(replace(ex, end=EndReason.TIMEOUT)) == []
    assert corr.stats.duplicate_exchanges == 1


def test_a_record_without_ids_links_to_a_kernel_identified_parent() -> None:
    """The timeout sweep's record of a client call the kernel had not identified still finds its
    parent, which went out with kernel ids."""
    chain = make_chain(("A", "B"))
    server = _ids(chain.by_name["A.server"], b"\x05" * 16, 21, 20)
    client = replace(chain.by_name["A.client"], end=EndReason.TIMEOUT, resp_start_ns=0, resp_end_ns=0,
                     resp_head=b"", resp_tail=b"", resp_bytes=0, status=0)
    corr = _corr()
    corr.feed(server)
    (span,) = corr.feed(client)
    assert span.trace_id == b"\x05" * 16 and span.parent_span_id == struct.pack(">Q", 21)
    assert span.attributes[PARENT_SOURCE_ATTR] == "thread" and span.status == StatusCode.ERROR
    # And the other order: the child (no ids) waits for its parent, released when it comes.
    corr = _corr()
    assert corr.feed(client) == []
    spans = corr.feed(server)
    assert [s.kind for s in spans] == [SpanKind.SERVER, SpanKind.CLIENT]
    assert spans[1].parent_span_id == struct.pack(">Q", 21) and spans[1].trace_id == b"\x05" * 16


def test_python_mirror_samples_records_without_ids_per_trace() -> None:
    """Records the kernel did not decide are kept or dropped as the kernel would: whole traces."""
    off = _corr(sampler=parse_sampler("always_off", None)[0])
    spans = [s for ex in make_chain(("A", "B")).exchanges for s in off.feed(ex)]
    assert len(spans) == 4 and not any(s.sampled for s in spans)
    ratio = _corr(sampler=parse_sampler("traceidratio", "0.5")[0])
    kept = []
    for i in range(200):
        chain = make_chain(("A", "B"), start_ns=10_000_000_000 + i * 10_000_000,
                           conn_base=0xFFFF_8880_0000_0000 + i * 0x10000)
        spans = [s for ex in chain.exchanges for s in ratio.feed(ex)]
        assert len(spans) == 4 and len({s.sampled for s in spans}) == 1  # whole traces
        kept.append(spans[0].sampled)
    assert 70 < sum(kept) < 130
    st = ratio.stats
    assert st.sampled_exchanges + st.unsampled_exchanges == 800


def test_python_mirror_honours_a_traceparent_under_parentbased() -> None:
    cfg = parse_sampler("parentbased_always_off", None)[0]
    for flag, kept in (("01", True), ("00", False)):
        req = request_bytes(headers=[("traceparent", f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flag}")])
        (span,) = _corr(sampler=cfg).feed(make_exchange(req, response_bytes()))
        assert span.sampled is kept


def test_a_swept_exchange_keeps_the_identity_and_decision_the_kernel_fixed() -> None:
    """The timeout sweep copies the record embedded in the connection state: ids fixed at the
    request's start survive, and an unsampled one becomes a metrics-only span."""
    from tracer import sweeper

    layout = sweeper.ConnLayout(records.EXCHANGE_SIZE, records.EXCHANGE_SIZE + 8, records.EXCHANGE_SIZE + 16)
    state = _raw(flags=records.FLAG_IDS, response=b"") + (1_000).to_bytes(8, "little") + b"\x01" + b"\0" * 7
    st = sweeper.stale_record(7, state, now_mono_ns=5_000_000_000, timeout_ns=10**9, layout=layout)
    assert st is not None
    ex = records.decode_exchange(st.record)
    assert ex.end == EndReason.TIMEOUT and ex.kernel_ids and not ex.sampled
    (span,) = _corr().feed(ex)
    assert span.span_id == struct.pack(">Q", SID) and not span.sampled and span.status == StatusCode.ERROR
