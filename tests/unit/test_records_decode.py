"""The kernel-record decoders (tracer/_records.c) against references computed here: every field of
random exchange, metric and segment records (both layouts of each), read back through the ctypes
layouts and formatted with socket.inet_ntop; truncated, foreign and garbage records raise
ValueError with the decoders' messages, never anything else.

Example counts: the ones below under the derandomized "ci" profile (`make test`, plain pytest),
more under "fuzz" (`make fuzz`); tests/conftest.py has the profiles.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
import socket
import struct
from enum import IntEnum
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from correlator.records import EndReason, Exchange, ExchangeId, MetricExchange, ParentHint, ParentKind, Role, Source
from correlator.segments import Segment, SegmentRecord
from tracer import _records, records
from tracer.records import RawExchange, RawSegment

PROPERTY = settings(max_examples=max(300, settings.default.max_examples),
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

IDS_AT = RawExchange.trace_id.offset
REQ_AT = RawExchange.req_head.offset
EXCHANGE = records.EXCHANGE_SIZE
LEGACY = records.LEGACY_EXCHANGE_SIZE
SEG_V1 = records.SEGMENT_HEADER_V1
SEG_HEADER = records.SEGMENT_HEADER

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
# Each family's interesting shapes: IPv4-mapped and IPv4-compatible IPv6, zeros, ::1, garbage
# after an IPv4 address's 4 bytes.
addresses = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=4, max_size=4).map(lambda b: bytes(10) + b"\xff\xff" + b),
    st.binary(min_size=4, max_size=4).map(lambda b: bytes(12) + b),
    st.binary(min_size=4, max_size=4).map(lambda b: b + bytes(12)),
    st.sampled_from([bytes(16), bytes(15) + b"\x01", b"\xfe\x80" + bytes(13) + b"\x01"]),
)
families = st.sampled_from([0, socket.AF_INET, socket.AF_INET6, socket.AF_INET, socket.AF_INET6, 1, 7, 0xFFFF])
flags = st.integers(0, 0x1FF) | u32


def _text(family: int, raw: bytes) -> str:
    """An address as the agent reports it: IPv4-mapped IPv6 (a dual-stack socket's IPv4 peer) as
    the IPv4 address, anything but AF_INET/AF_INET6 as no address."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        if raw[:12] == bytes(10) + b"\xff\xff":
            return socket.inet_ntop(socket.AF_INET, raw[12:])
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


def _be(v: int) -> bytes:
    return struct.pack(">Q", v) if v else b""


def _same(got: Any, want: Any) -> None:
    """Equal, and every field of the same type (an int where an enum member belongs compares equal)."""
    assert type(got) is type(want)
    assert got == want
    names = [f.name for f in dataclasses.fields(want)] if dataclasses.is_dataclass(want) else list(want._fields)
    for name in names:
        g, w = getattr(got, name), getattr(want, name)
        assert type(g) is type(w), (name, g, w)
        if isinstance(w, (ParentHint, ExchangeId, Segment)):
            _same(g, w)
        elif isinstance(w, tuple) and not isinstance(w, MetricExchange):
            assert len(g) == len(w)
            for a, b in zip(g, w, strict=True):
                _same(a, b)


# --- exchange and metric records ------------------------------------------------------------

def _mostly(enum: type[IntEnum]) -> st.SearchStrategy[int]:
    """One of the enum's values, now and then any u8 (a record from another version)."""
    return st.integers(0, 15).flatmap(lambda k: st.sampled_from(sorted(enum)) if k else u8)


@st.composite
def exchange_records(draw: st.DrawFn, rtype: int = records.REC_EXCHANGE) -> bytes:
    r = RawExchange()
    r.type = rtype
    r.pid, r.tid, r.parent_pid = draw(u32), draw(u32), draw(u32)
    r.role, r.end_reason = draw(_mostly(Role)), draw(_mostly(EndReason))
    r.source, r.parent_kind = draw(_mostly(Source)), draw(_mostly(ParentKind))
    r.flags = draw(flags)
    r.family = draw(families)
    r.local_port, r.remote_port, r.status = draw(u16), draw(u16), draw(u16)
    r.local_addr[:] = list(draw(addresses))
    r.remote_addr[:] = list(draw(addresses))
    for f in ("conn_id", "req_start_ns", "req_end_ns", "resp_start_ns", "resp_end_ns", "req_bytes", "resp_bytes",
              "parent_conn_id", "parent_req_start_ns"):
        setattr(r, f, draw(st.just(0) | u64))
    r.req_head_len = draw(st.integers(0, 520) | u16)
    r.resp_head_len = draw(st.integers(0, 260) | u16)
    r.resp_tail_len = draw(st.integers(0, 9) | u8)
    r.trace_id[:] = list(draw(st.just(bytes(16)) | st.binary(min_size=16, max_size=16)))
    r.span_id, r.parent_span_id = draw(st.just(0) | u64), draw(st.just(0) | u64)
    buf = bytearray(bytes(r))
    # the heads: garbage past their lengths too, so a length clamped wrongly shows
    buf[REQ_AT:] = draw(st.binary(min_size=EXCHANGE - REQ_AT, max_size=EXCHANGE - REQ_AT))
    return bytes(buf)


def _legacy(raw: bytes) -> bytes:
    return raw[:IDS_AT] + raw[REQ_AT:]


def _enum_error(r: RawExchange) -> str | None:
    for value, enum in ((r.parent_kind, ParentKind), (r.role, Role), (r.end_reason, EndReason), (r.source, Source)):
        if value not in set(enum):
            return f"exchange record has an unknown enum value {value}"
    return None


def _want_exchange(raw: bytes, legacy: bool) -> Exchange:
    full = raw[:IDS_AT] + bytes(REQ_AT - IDS_AT) + raw[IDS_AT:] if legacy else raw
    r = RawExchange.from_buffer_copy(full[:EXCHANGE])
    known = bool(r.flags & records.FLAG_TUPLE_KNOWN)
    ids = not legacy and bool(r.flags & records.FLAG_IDS) and r.span_id != 0 and any(r.trace_id)
    parent = None
    if r.parent_kind:
        exchange = ExchangeId(r.parent_conn_id, r.parent_req_start_ns)
        parent = ParentHint(ParentKind(r.parent_kind), r.parent_pid, exchange)

    def head(field: str, n: int, cap: int) -> bytes:
        at = getattr(RawExchange, field).offset
        return full[at : at + min(n, cap)]

    return Exchange(
        pid=r.pid, tid=r.tid, role=Role(r.role), end=EndReason(r.end_reason), source=Source(r.source),
        tls=bool(r.flags & records.FLAG_TLS), conn_id=r.conn_id, family=r.family if known else 0,
        local_addr=_text(r.family, bytes(r.local_addr)) if known else "", local_port=r.local_port if known else 0,
        remote_addr=_text(r.family, bytes(r.remote_addr)) if known else "",
        remote_port=r.remote_port if known else 0, req_start_ns=r.req_start_ns, req_end_ns=r.req_end_ns,
        resp_start_ns=r.resp_start_ns, resp_end_ns=r.resp_end_ns, req_bytes=r.req_bytes, resp_bytes=r.resp_bytes,
        status=r.status, parent=parent,
        req_head=head("req_head", r.req_head_len, records.REQ_HEAD),
        resp_head=head("resp_head", r.resp_head_len, records.RESP_HEAD),
        resp_tail=head("resp_tail", r.resp_tail_len, records.TAIL),
        req_head_truncated=bool(r.flags & records.FLAG_REQ_HEAD_FULL),
        resp_head_truncated=bool(r.flags & records.FLAG_RESP_HEAD_FULL),
        interim_response=bool(r.flags & records.FLAG_INTERIM),
        parent_ambiguous=bool(r.flags & records.FLAG_AMBIGUOUS),
        trace_id=bytes(r.trace_id) if ids else b"", span_id=_be(r.span_id) if ids else b"",
        parent_span_id=_be(r.parent_span_id) if ids else b"",
        sampled=bool(r.flags & records.FLAG_SAMPLED) if ids else True, kernel_ids=ids,
        remote_parent=bool(r.flags & records.FLAG_REMOTE_PARENT),
    )


def _check_exchange(raw: bytes, old_layout: bool, **kw: Any) -> None:
    err = _enum_error(RawExchange.from_buffer_copy(raw[:IDS_AT] + bytes(EXCHANGE - IDS_AT)))
    if err is not None:
        with pytest.raises(ValueError) as e:
            records.decode_exchange(raw, **kw)
        assert str(e.value) == err
        return
    _same(records.decode_exchange(raw, **kw), _want_exchange(raw, old_layout))


@PROPERTY
@given(exchange_records())
def test_every_field_of_an_exchange_record(raw: bytes) -> None:
    _check_exchange(raw, old_layout=False)
    _check_exchange(raw, old_layout=False, legacy=False)
    _check_exchange(raw + b"\0\1", old_layout=False)  # longer than the struct: the rest is ignored
    old = _legacy(raw)
    _check_exchange(old, old_layout=True)  # told apart by its length
    _check_exchange(old, old_layout=True, legacy=True)
    _check_exchange(raw, old_layout=True, legacy=True)  # asked for: the first 928 bytes, in the old layout
    with pytest.raises(ValueError) as e:
        records.decode_exchange(old, legacy=False)
    assert str(e.value) == f"exchange record is {LEGACY} bytes, expected {EXCHANGE}"


@PROPERTY
@given(exchange_records(), st.data())
def test_short_and_foreign_exchange_records_raise(raw: bytes, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, EXCHANGE - 1).filter(lambda n: n != LEGACY))
    with pytest.raises(ValueError) as e:
        records.decode_exchange(raw[:n])
    assert str(e.value) == f"exchange record is {n} bytes, expected {EXCHANGE}"
    n = data.draw(st.integers(0, LEGACY - 1))
    with pytest.raises(ValueError) as e:
        records.decode_exchange(raw[:n], legacy=True)
    assert str(e.value) == f"exchange record is {n} bytes, expected {LEGACY}"
    rtype = data.draw(u32.filter(lambda t: t != records.REC_EXCHANGE))
    foreign = struct.pack("<I", rtype) + raw[4:]
    for rec in (foreign, _legacy(foreign)):
        with pytest.raises(ValueError) as e:
            records.decode_exchange(rec)
        assert str(e.value) == f"record type {rtype} is not an exchange"


def _want_metric(raw: bytes) -> MetricExchange:
    r = RawExchange.from_buffer_copy((raw + bytes(EXCHANGE))[:EXCHANGE])
    known = bool(r.flags & records.FLAG_TUPLE_KNOWN)
    ids = bool(r.flags & records.FLAG_IDS)
    return MetricExchange(
        pid=r.pid, role=r.role, end=r.end_reason, tls=bool(r.flags & records.FLAG_TLS), status=r.status,
        responded=r.resp_start_ns != 0, start_ns=r.req_start_ns,
        end_ns=max(r.req_start_ns, r.req_end_ns, r.resp_start_ns, r.resp_end_ns), family=r.family if known else 0,
        local_addr=bytes(r.local_addr), local_port=r.local_port if known else 0, remote_addr=bytes(r.remote_addr),
        remote_port=r.remote_port if known else 0, parent_kind=r.parent_kind, parent_pid=r.parent_pid,
        span_id=_be(r.span_id) if ids else b"", parent_span_id=_be(r.parent_span_id) if ids else b"",
        req_head=raw[REQ_AT : REQ_AT + min(r.req_head_len, records.METRIC_HEAD)],
    )


@PROPERTY
@given(exchange_records(rtype=records.REC_METRIC), st.integers(REQ_AT, EXCHANGE))
def test_every_field_of_a_metric_record(raw: bytes, n: int) -> None:
    for rec in (raw[: records.METRIC_SIZE], raw[:n]):  # the kernel's, and one cut anywhere in req_head
        role = RawExchange.from_buffer_copy(raw).role
        if role not in set(Role):
            with pytest.raises(ValueError) as e:
                records.decode_metric(rec)
            assert str(e.value) == f"metric record has an unknown role {role}"
            continue
        _same(records.decode_metric(rec), _want_metric(rec))


@PROPERTY
@given(exchange_records(rtype=records.REC_METRIC), st.integers(0, REQ_AT - 1), u32)
def test_short_and_foreign_metric_records_raise(raw: bytes, n: int, rtype: int) -> None:
    with pytest.raises(ValueError) as e:
        records.decode_metric(raw[:n])
    assert str(e.value) == f"metric record is {n} bytes, expected at least {REQ_AT}"
    if rtype != records.REC_METRIC:
        with pytest.raises(ValueError) as e:
            records.decode_metric(struct.pack("<I", rtype) + raw[4 : records.METRIC_SIZE])
        assert str(e.value) == f"record type {rtype} is not a metric record"


# --- segment records ------------------------------------------------------------------------

@dataclasses.dataclass
class H2Entry:
    off: int
    data: bytes  # the bytes present in the record (the last entry's may be cut short)


@st.composite
def segment_records(draw: st.DrawFn) -> tuple[bytes, list[H2Entry]]:
    """A segment record and, for an HTTP/2 one, the entries it was built from up to the first
    malformed one (an offset past the transfer's length or before the previous entry's)."""
    r = RawSegment()
    r.type = records.REC_SEGMENT
    r.pid, r.tid = draw(u32), draw(u32)
    r.dir, r.role = draw(st.sampled_from([1, 2]) | u8), draw(st.sampled_from([1, 2]) | u8)
    r.proto, r.parent_kind = draw(st.integers(1, 4) | u8), draw(st.integers(0, 7) | u8)
    r.flags = draw(flags)
    r.family = draw(families)
    r.local_port, r.remote_port = draw(u16), draw(u16)
    r.local_addr[:] = list(draw(addresses))
    r.remote_addr[:] = list(draw(addresses))
    r.seg_flags = draw(st.integers(0, 0x3F) | u32)
    r.tcp_seq, r.ctx_seq, r.ctx_end = draw(u32), draw(u32), draw(u32)
    r.conn_id, r.start_ns, r.end_ns, r.seq = draw(u64), draw(u64), draw(u64), draw(u64)
    r.len = draw(st.integers(0, 600) | u64)
    r.trace_id[:] = list(draw(st.just(bytes(16)) | st.binary(min_size=16, max_size=16)))
    r.parent_span_id = draw(st.just(0) | u64)
    entries: list[H2Entry] = []
    h2 = bool(r.seg_flags & records.SEG_H2_FRAMES)
    if h2:
        body, valid, cut = b"", True, False
        off = draw(st.sampled_from([0, 0, 9]) | st.integers(0, 700))
        for _ in range(draw(st.integers(0, 6))):
            copied = draw(st.integers(0, 80))
            chunk = draw(st.binary(min_size=copied, max_size=copied))
            cut = draw(st.integers(0, 9)) == 0  # the record ends inside this entry's bytes
            if cut:
                chunk = chunk[: draw(st.integers(0, copied))]
            body += struct.pack("<IHH", off, copied, draw(u16)) + chunk
            valid = valid and off <= r.len and (not entries or off >= entries[-1].off)
            if valid:  # past a malformed entry the rest is a gap the protocol decoder counts
                entries.append(H2Entry(off, chunk))
            if cut:
                break
            off = draw(st.integers(0, 120).map(lambda d, o=off: min(o + d, 0xFFFF_FFFF)) | u32)
        if not cut:
            body += draw(st.binary(max_size=7))  # less than an entry's header: not an entry
    else:
        body = draw(st.binary(max_size=600))
    v1 = draw(st.integers(0, 4)) == 0
    if v1:
        r.data_len = len(body)
    else:
        # more than the bytes present; fewer cuts the body (not an HTTP/2 one: its entries would change)
        r.data_len = draw(st.just(len(body)) | st.integers(len(body), 0xFFFF) | st.integers(0, 0 if h2 else 0xFFFF))
        if h2 and r.data_len < len(body):
            r.data_len = len(body)
        if r.data_len == len(body) + SEG_HEADER - SEG_V1:
            r.data_len += 1  # a current header whose size looks like the older one's: not this case
    return (bytes(r)[:SEG_V1] if v1 else bytes(r)) + body, entries


def _want_segment(raw: bytes, entries: list[H2Entry]) -> SegmentRecord:
    data_len = RawSegment.from_buffer_copy(raw[:SEG_V1] + bytes(SEG_HEADER - SEG_V1)).data_len
    head = SEG_V1 if len(raw) == SEG_V1 + data_len else SEG_HEADER
    r = RawSegment.from_buffer_copy(raw[:head] + bytes(SEG_HEADER - head))
    known = bool(r.flags & records.FLAG_TUPLE_KNOWN)
    family = r.family if known else 0
    has_trace = any(r.trace_id)
    client_write = r.role == Role.CLIENT and r.dir == 1
    peer = bool(r.seg_flags & records.SEG_PEER) and r.role == Role.SERVER and has_trace
    pos = r.tcp_seq if r.seg_flags & records.SEG_SEQ else 0
    data = raw[head : head + r.data_len]
    pieces: list[Segment] = []

    def seg(length: int, data: bytes, pos: int) -> Segment:
        return Segment(conn_id=r.conn_id, pid=r.pid, tid=r.tid, egress=r.dir == 1, start_ns=r.start_ns,
                       end_ns=r.end_ns, length=length, data=data, pos=pos)

    if r.seg_flags & records.SEG_H2_FRAMES:
        spans = [(e.off, e.data) for e in entries]
        if (not spans or spans[0][0] > 0) and not r.seg_flags & records.SEG_H2_TAIL:
            spans.insert(0, (0, b""))  # the rest of a frame the previous transfer began
        ends = [o for o, _ in spans[1:]] + [r.len] if spans else []
        pieces = [seg(end - off, chunk[: end - off], (pos + off) % 2**32)
                  for (off, chunk), end in zip(spans, ends, strict=True) if end > off]
        # seg.data: the transfer's first bytes, the pieces copied whole from its start
        data = b""
        if pieces and pieces[0].pos == pos:
            for p in pieces:
                data += p.data
                if len(p.data) < p.length:
                    break
    return SegmentRecord(
        seg=seg(r.len, data, pos), proto=r.proto, client=r.role == Role.CLIENT,
        closed=bool(r.seg_flags & records.SEG_CLOSED), seq=r.seq, from_start=bool(r.seg_flags & records.SEG_START),
        tls=bool(r.flags & records.FLAG_TLS), family=family, local_addr=_text(family, bytes(r.local_addr)),
        local_port=r.local_port if known else 0, remote_addr=_text(family, bytes(r.remote_addr)),
        remote_port=r.remote_port if known else 0, parent_kind=r.parent_kind if client_write else 0,
        trace_id=bytes(r.trace_id) if (client_write or peer) and has_trace else b"",
        parent_span_id=_be(r.parent_span_id) if client_write else b"",
        sampled=bool(r.flags & records.FLAG_SAMPLED) if client_write or peer else True,
        ambiguous=bool(r.flags & records.FLAG_AMBIGUOUS),
        seq_known=bool(r.seg_flags & records.SEG_SEQ) and known, peer=peer and known,
        ctx_seq=r.ctx_seq if peer else 0, ctx_end=r.ctx_end if peer else 0, pieces=tuple(pieces),
    )


@PROPERTY
@given(segment_records())
def test_every_field_of_a_segment_record(case: tuple[bytes, list[H2Entry]]) -> None:
    _same(records.decode_segment(case[0]), _want_segment(*case))


@PROPERTY
@given(segment_records(), st.data())
def test_short_and_foreign_segment_records_raise(case: tuple[bytes, list[H2Entry]], data: st.DataObject) -> None:
    raw = case[0]
    data_len = struct.unpack_from("<H", raw, RawSegment.data_len.offset)[0]
    n = data.draw(st.integers(0, min(SEG_HEADER, len(raw)) - 1).filter(lambda n: n != SEG_V1 + data_len))
    with pytest.raises(ValueError) as e:
        records.decode_segment(raw[:n])
    assert str(e.value) == f"segment record is {n} bytes, expected at least {SEG_HEADER}"
    rtype = data.draw(u32.filter(lambda t: t != records.REC_SEGMENT))
    with pytest.raises(ValueError) as e:
        records.decode_segment(struct.pack("<I", rtype) + raw[4:])
    assert str(e.value) == f"record type {rtype} is not a segment"


# --- anything at all ------------------------------------------------------------------------

_DECODERS = ((records.decode_exchange, Exchange), (records.decode_metric, MetricExchange),
             (records.decode_segment, SegmentRecord))  # fmt: skip


@PROPERTY
@given(st.sampled_from([records.REC_EXCHANGE, records.REC_METRIC, records.REC_SEGMENT, 0, 3, 0xFFFF_FFFF]),
       st.binary(max_size=1100), st.sampled_from([bytes, bytearray, memoryview]))
def test_garbage_decodes_or_raises_value_error(rtype: int, tail: bytes, kind: type) -> None:
    raw = struct.pack("<I", rtype) + tail
    assert records.record_type(kind(raw)) == rtype
    for decode, cls in _DECODERS:
        for rec in (raw, raw[: len(tail) // 2]):
            try:
                out = decode(kind(rec))
            except ValueError:
                continue
            assert type(out) is cls
            assert out == pickle.loads(pickle.dumps(out))


def test_addresses_beyond_the_memo() -> None:
    """The decoder remembers a bounded number of address texts: many more distinct addresses than
    it holds, each asked for twice, all come out right."""
    r = RawExchange(type=records.REC_EXCHANGE, role=1, end_reason=1, flags=records.FLAG_TUPLE_KNOWN)
    base = bytearray(bytes(r))
    local, remote = RawExchange.local_addr.offset, RawExchange.remote_addr.offset
    for i in range(3 * 4096):
        family = (socket.AF_INET, socket.AF_INET6)[i % 2]
        addrs = [struct.pack(">I", i) + bytes(12), bytes(10) + b"\xff\xff" + struct.pack(">I", i),
                 struct.pack(">QQ", 0x2001_0DB8 << 32, i)]
        a, b = addrs[i % 3], addrs[(i + 1) % 3]
        struct.pack_into("<H", base, RawExchange.family.offset, family)
        base[local : local + 16], base[remote : remote + 16] = a, b
        for _ in range(2):
            ex = records.decode_exchange(bytes(base))
            assert (ex.local_addr, ex.remote_addr) == (_text(family, a), _text(family, b))


def test_pids_and_ports_beyond_the_memo() -> None:
    """The decoder shares the int objects of pids, tids and ports it saw lately (a bounded memo):
    values that fall on the same memo entry, alternating, and many more than it holds, each
    decoded twice, all come out right."""
    r = RawExchange(type=records.REC_EXCHANGE, role=1, end_reason=1, flags=records.FLAG_TUPLE_KNOWN,
                    family=socket.AF_INET)
    base = bytearray(bytes(r))
    fields = (RawExchange.pid, RawExchange.tid, RawExchange.local_port, RawExchange.remote_port)
    values = [257 + i for i in range(2048)] + [257 + 256 * i for i in range(256)] + [0, 1, 256, 0xFFFF_FFFF]
    for i, v in enumerate(values + values[::-1]):
        want = [v, v ^ 0x5555, v & 0xFFFF, (v + i) & 0xFFFF]
        for f, w in zip(fields, want, strict=True):
            struct.pack_into("<I" if f.size == 4 else "<H", base, f.offset, w)
        for _ in range(2):
            ex = records.decode_exchange(bytes(base))
            assert [ex.pid, ex.tid, ex.local_port, ex.remote_port] == want
            mx = records.decode_metric(records.REC_METRIC.to_bytes(4, "little")
                                       + bytes(base[4:]))
            assert (mx.pid, mx.local_port, mx.remote_port) == (want[0], want[2], want[3])


def test_record_type() -> None:
    assert records.record_type(b"") == 0 and records.record_type(b"\1\0\0") == 0
    assert records.record_type(b"\5\0\0\0rest") == 5 and records.record_type(b"\xff\xff\xff\xff") == 0xFFFF_FFFF
    with pytest.raises(TypeError):
        records.record_type("text")  # type: ignore[arg-type]


# --- what the decoders build ----------------------------------------------------------------

def test_decoded_values_are_whole_objects() -> None:
    """The dataclasses are filled slot by slot without their __init__: every slot set, each object
    one the garbage collector sees into, equal after a round trip through pickle and replace."""
    raw = bytearray(bytes(RawExchange(type=records.REC_EXCHANGE, role=1, end_reason=1, parent_kind=3,
                                      flags=records.FLAG_TUPLE_KNOWN, family=2, parent_pid=9, parent_conn_id=5)))
    ex = records.decode_exchange(bytes(raw))
    for f in dataclasses.fields(Exchange):
        getattr(ex, f.name)
    assert ex.parent == ParentHint(ParentKind.PEER, 9, ExchangeId(5, 0)) and hash(ex.parent) == hash(
        ParentHint(ParentKind.PEER, 9, ExchangeId(5, 0)))
    assert ex.local_addr == "0.0.0.0" and ex.parent in gc.get_referents(ex) and gc.is_tracked(ex)
    assert pickle.loads(pickle.dumps(ex)) == ex == dataclasses.replace(ex)
    seg = records.decode_segment(bytes(RawSegment(type=records.REC_SEGMENT, data_len=2, len=2)) + b"hi")
    assert seg.seg.data == b"hi" and seg.seg in gc.get_referents(seg) and pickle.loads(pickle.dumps(seg)) == seg
    with pytest.raises(dataclasses.FrozenInstanceError):
        seg.proto = 2  # type: ignore[misc]


def test_setup_refuses_classes_it_cannot_fill() -> None:
    """A dataclass whose slots are not the fields the C decoder fills (one added, reordered, not
    slots at all) fails the import rather than being filled wrongly."""

    @dataclasses.dataclass(slots=True)
    class Reordered:
        conn_id: int
        req_start_ns: int = 0
        extra: int = 0

    @dataclasses.dataclass
    class NoSlots:
        conn_id: int
        req_start_ns: int

    @dataclasses.dataclass(slots=True)
    class OwnInit:
        conn_id: int
        req_start_ns: int

        def __init__(self, conn_id: int, req_start_ns: int) -> None:
            self.conn_id, self.req_start_ns = conn_id & 0xFFFF, req_start_ns

    @dataclasses.dataclass(slots=True)
    class PostInit:
        conn_id: int
        req_start_ns: int

        def __post_init__(self) -> None:
            self.conn_id &= 0xFFFF

    @dataclasses.dataclass(slots=True)
    class Same:
        conn_id: int
        req_start_ns: int

    try:
        for wrong in (Reordered, NoSlots, OwnInit, PostInit, int):
            with pytest.raises(TypeError):
                _records.setup(exchange=Exchange, parent_hint=ParentHint, exchange_id=wrong, metric=MetricExchange,
                               segment=Segment, segment_record=SegmentRecord, roles=Role, ends=EndReason,
                               sources=Source, parent_kinds=ParentKind, format_addr=str)
            with pytest.raises(RuntimeError, match="setup"):
                records.decode_exchange(bytes(EXCHANGE))
        _records.setup(exchange=Exchange, parent_hint=ParentHint, exchange_id=Same, metric=MetricExchange,
                       segment=Segment, segment_record=SegmentRecord, roles=Role, ends=EndReason,
                       sources=Source, parent_kinds=ParentKind, format_addr=str)
        ex = records.decode_exchange(bytes(RawExchange(type=records.REC_EXCHANGE, role=1, end_reason=1, parent_kind=1,
                                                       parent_conn_id=7, parent_req_start_ns=8)))
        assert ex.parent is not None and ex.parent.exchange == Same(7, 8)
    finally:
        records._setup_decoders()
    assert records.decode_metric(bytes(RawExchange(type=records.REC_METRIC, role=2))[: records.METRIC_SIZE]).role == 2


def test_layout_check_ties_the_ctypes_mirrors_to_the_compiled_header() -> None:
    records._check_layout(_records.LAYOUT, _records.CONSTANTS)
    size, fields = _records.LAYOUT["kspan_exchange"]
    assert size == EXCHANGE and fields["req_head"] == (REQ_AT, records.REQ_HEAD)
    moved = {**_records.LAYOUT, "kspan_exchange": (size, {**fields, "status": (fields["status"][0] + 2, 2)})}
    with pytest.raises(AssertionError, match="RawExchange"):
        records._check_layout(moved, _records.CONSTANTS)
    seg_size, seg_fields = _records.LAYOUT["kspan_segment"]
    longer = {**_records.LAYOUT, "kspan_segment": (seg_size, {**seg_fields, "data": (SEG_HEADER + 8, 512)})}
    with pytest.raises(AssertionError, match="RawSegment"):
        records._check_layout(longer, _records.CONSTANTS)
    with pytest.raises(AssertionError, match="constants"):
        records._check_layout(_records.LAYOUT, {**_records.CONSTANTS, "FLAG_IDS": 0x200})
