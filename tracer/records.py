"""ctypes mirror of bpf/kspan.h and the decoding of raw kernel records into correlator values.

Imports no bcc: `kspan replay` decodes recorded files with this module alone.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

from correlator.records import (
    EndReason,
    Exchange,
    ExchangeId,
    MetricExchange,
    ParentHint,
    ParentKind,
    Role,
    Source,
    TcpEvent,
    TcpEventKind,
)
from correlator.red import format_addr
from correlator.segments import Segment, SegmentRecord

REQ_HEAD = 512
RESP_HEAD = 256
TAIL = 8

REC_EXCHANGE = 1
REC_PROC = 2
REC_TCP = 3
REC_METRIC = 4  # an unsampled exchange: RawExchange cut after METRIC_HEAD bytes of req_head
METRIC_HEAD = 128

FLAG_TLS = 0x1
FLAG_REQ_HEAD_FULL = 0x2
FLAG_RESP_HEAD_FULL = 0x4
FLAG_TUPLE_KNOWN = 0x8
FLAG_INTERIM = 0x10
FLAG_AMBIGUOUS = 0x20
FLAG_SAMPLED = 0x40
FLAG_IDS = 0x80
FLAG_REMOTE_PARENT = 0x100


class RawExchange(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("role", ctypes.c_uint8),
        ("end_reason", ctypes.c_uint8),
        ("source", ctypes.c_uint8),
        ("parent_kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("status", ctypes.c_uint16),
        ("local_addr", ctypes.c_uint8 * 16),
        ("remote_addr", ctypes.c_uint8 * 16),
        ("_pad0", ctypes.c_uint32),
        ("conn_id", ctypes.c_uint64),
        ("req_start_ns", ctypes.c_uint64),
        ("req_end_ns", ctypes.c_uint64),
        ("resp_start_ns", ctypes.c_uint64),
        ("resp_end_ns", ctypes.c_uint64),
        ("req_bytes", ctypes.c_uint64),
        ("resp_bytes", ctypes.c_uint64),
        ("parent_conn_id", ctypes.c_uint64),
        ("parent_req_start_ns", ctypes.c_uint64),
        ("parent_pid", ctypes.c_uint32),
        ("req_head_len", ctypes.c_uint16),
        ("resp_head_len", ctypes.c_uint16),
        ("resp_tail_len", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 7),
        ("trace_id", ctypes.c_uint8 * 16),
        ("span_id", ctypes.c_uint64),
        ("parent_span_id", ctypes.c_uint64),
        ("req_head", ctypes.c_char * REQ_HEAD),
        ("resp_head", ctypes.c_char * RESP_HEAD),
        ("resp_tail", ctypes.c_char * TAIL),
    ]


class RawProc(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("event", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("comm", ctypes.c_char * 16),
    ]


class RawTcp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("event", ctypes.c_uint32),
        ("value", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("conn_id", ctypes.c_uint64),
        ("family", ctypes.c_uint16),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("local_addr", ctypes.c_uint8 * 16),
        ("remote_addr", ctypes.c_uint8 * 16),
    ]


EXCHANGE_SIZE = ctypes.sizeof(RawExchange)
METRIC_SIZE = RawExchange.req_head.offset + METRIC_HEAD


def record_type(data: bytes) -> int:
    return int.from_bytes(data[:4], "little") if len(data) >= 4 else 0


# The fixed part of struct kspan_exchange up to trace_id, in one unpack (a ctypes copy of the
# whole 960-byte record costs several times more); _check_layout() ties it to RawExchange.
_FIXED = struct.Struct("<IIIBBBBIHHHH16s16s4xQQQQQQQQQIHHB7x")
_IDS_AT = RawExchange.trace_id.offset
_REQ_AT = RawExchange.req_head.offset
_RESP_AT = RawExchange.resp_head.offset
_TAIL_AT = RawExchange.resp_tail.offset
# Recordings made before the kernel fixed identities (recording version 1): the same record
# without the 32 identity bytes before req_head.
_IDS_LEN = _REQ_AT - _IDS_AT
LEGACY_EXCHANGE_SIZE = EXCHANGE_SIZE - _IDS_LEN
_Z16 = b"\0" * 16
_Z8 = b"\0" * 8
_PARENT_KINDS = {int(k): k for k in ParentKind}
_ROLES = {int(k): k for k in Role}
_ENDS = {int(k): k for k in EndReason}
_SOURCES = {int(k): k for k in Source}


def _check_layout() -> None:
    if _METRIC.size != _REQ_AT:
        raise AssertionError("tracer/records.py: _METRIC does not match RawExchange (bpf/kspan.h)")
    if _FIXED.size != _IDS_AT or RawExchange.flags.offset != 16 or RawExchange.parent_pid.offset != 136:
        raise AssertionError("tracer/records.py: _FIXED does not match RawExchange (bpf/kspan.h)")


# The current layout's fixed part and identity together (everything before req_head), in one unpack.
_FULL = struct.Struct(_FIXED.format + "16sQQ")
_ADDR_MEMO = 4096  # distinct addresses remembered; cleared when full (a host talks to few peers)
_addrs4: dict[bytes, str] = {}
_addrs6: dict[bytes, str] = {}


def _addr(family: int, raw: bytes) -> str:
    """format_addr, memoised by the raw bytes: every record carries two addresses, and a host's
    records name the same few over and over."""
    if family == socket.AF_INET:
        memo = _addrs4
    elif family == socket.AF_INET6:
        memo = _addrs6
    else:
        return ""
    text = memo.get(raw)
    if text is None:
        text = format_addr(family, raw)
        if len(memo) >= _ADDR_MEMO:
            memo.clear()
        memo[raw] = text
    return text


def decode_exchange(data: bytes, legacy: bool | None = None) -> Exchange:
    """Decode one `struct kspan_exchange`. legacy: the layout before identity fields (recording
    version 1); None decides by the record's length. Raises ValueError on a short or foreign record."""
    n = len(data)
    if legacy is None:
        legacy = n < EXCHANGE_SIZE and n == LEGACY_EXCHANGE_SIZE
    if legacy:
        if n < LEGACY_EXCHANGE_SIZE:
            raise ValueError(f"exchange record is {n} bytes, expected {LEGACY_EXCHANGE_SIZE}")
        (rtype, pid, tid, role, end_reason, source, parent_kind, flags, family, local_port, remote_port, status,
         local_addr, remote_addr, conn_id, req_start, req_end, resp_start, resp_end, req_bytes, resp_bytes,
         parent_conn, parent_start, parent_pid, req_len, resp_len, tail_len) = _FIXED.unpack_from(data)
        trace = sid_b = psid_b = b""
        kernel_ids = False
        req_at, resp_at, tail_at = _REQ_AT - _IDS_LEN, _RESP_AT - _IDS_LEN, _TAIL_AT - _IDS_LEN
    else:
        if n < EXCHANGE_SIZE:
            raise ValueError(f"exchange record is {n} bytes, expected {EXCHANGE_SIZE}")
        (rtype, pid, tid, role, end_reason, source, parent_kind, flags, family, local_port, remote_port, status,
         local_addr, remote_addr, conn_id, req_start, req_end, resp_start, resp_end, req_bytes, resp_bytes,
         parent_conn, parent_start, parent_pid, req_len, resp_len, tail_len, trace, sid,
         psid) = _FULL.unpack_from(data)
        # A record that claims kernel ids but carries a zero trace or span id is taken as one without.
        kernel_ids = bool(flags & FLAG_IDS) and sid != 0 and trace != _Z16
        if kernel_ids:
            # The kernel writes u64s in host (little-endian) order; OTLP wants the u64's big-endian bytes.
            sid_b = sid.to_bytes(8, "big")
            psid_b = psid.to_bytes(8, "big") if psid else b""
        else:
            trace = sid_b = psid_b = b""
        req_at, resp_at, tail_at = _REQ_AT, _RESP_AT, _TAIL_AT
    if rtype != REC_EXCHANGE:
        raise ValueError(f"record type {rtype} is not an exchange")
    try:
        kind = _PARENT_KINDS[parent_kind]
        role_v = _ROLES[role]
        end_v = _ENDS[end_reason]
        source_v = _SOURCES[source]
    except KeyError as e:
        raise ValueError(f"exchange record has an unknown enum value {e}") from None
    if flags & FLAG_TUPLE_KNOWN:
        local = _addr(family, local_addr) if family else ""
        remote = _addr(family, remote_addr) if family else ""
    else:
        family = local_port = remote_port = 0
        local = remote = ""
    parent = None
    if parent_kind:
        parent = ParentHint(kind, parent_pid, ExchangeId(parent_conn, parent_start))
    return Exchange(
        pid, tid, role_v, end_v, source_v, bool(flags & FLAG_TLS), conn_id, family, local, local_port, remote,
        remote_port, req_start, req_end, resp_start, resp_end, req_bytes, resp_bytes, status, parent,
        # The heads are raw buffers with a length (c_char arrays would stop at a NUL).
        data[req_at : req_at + min(req_len, REQ_HEAD)],
        data[resp_at : resp_at + min(resp_len, RESP_HEAD)],
        data[tail_at : tail_at + min(tail_len, TAIL)],
        bool(flags & FLAG_REQ_HEAD_FULL),
        bool(flags & FLAG_RESP_HEAD_FULL),
        bool(flags & FLAG_INTERIM),
        bool(flags & FLAG_AMBIGUOUS),
        trace,
        sid_b,
        psid_b,
        # Without kernel ids the kernel made no decision: the correlator mirrors the sampler.
        bool(flags & FLAG_SAMPLED) if kernel_ids else True,
        kernel_ids,
        bool(flags & FLAG_REMOTE_PARENT),
    )


# What a metric record's consumers read, in one unpack: the rest of the fixed part is skipped.
_METRIC = struct.Struct("<II4xBBxBIHHHH16s16s4x8xQQQQ16x16xIH10x16x8s8s")
_new_metric = tuple.__new__


def decode_metric(data: bytes) -> MetricExchange:
    """Decode one KSPAN_REC_METRIC record (an unsampled exchange: the fixed part, the identity and
    the first METRIC_HEAD bytes of the request head). Raises ValueError on a short or foreign one."""
    if len(data) < _REQ_AT:
        raise ValueError(f"metric record is {len(data)} bytes, expected at least {_REQ_AT}")
    (rtype, pid, role, end_reason, parent_kind, flags, family, local_port, remote_port, status, local_addr,
     remote_addr, req_start, req_end, resp_start, resp_end, parent_pid, req_len, sid, psid) = _METRIC.unpack_from(data)
    if rtype != REC_METRIC:
        raise ValueError(f"record type {rtype} is not a metric record")
    if role not in _ROLES:
        raise ValueError(f"metric record has an unknown role {role}")
    if not flags & FLAG_TUPLE_KNOWN:
        family = local_port = remote_port = 0
    if flags & FLAG_IDS:
        sid = b"" if sid == _Z8 else sid[::-1]  # the u64's big-endian bytes, as OTLP wants
        psid = b"" if psid == _Z8 else psid[::-1]
    else:
        sid = psid = b""  # unknown: the service graph then pairs nothing
    end = max(resp_end, resp_start, req_end, req_start)
    return _new_metric(MetricExchange, (  # type: ignore[call-overload]
        pid, role, end_reason, bool(flags & FLAG_TLS), status, resp_start != 0, req_start, end, family,
        local_addr, local_port, remote_addr, remote_port, parent_kind, parent_pid, sid, psid,
        bytes(data[_REQ_AT : _REQ_AT + min(req_len, METRIC_HEAD)]),
    ))


_check_layout()


PROC_EXEC = 1
PROC_EXIT = 2


@dataclass(frozen=True, slots=True)
class ProcEvent:
    pid: int
    event: int  # PROC_EXEC or PROC_EXIT
    ts_ns: int
    comm: str


def decode_proc(data: bytes) -> ProcEvent:
    if len(data) < ctypes.sizeof(RawProc):
        raise ValueError(f"proc record is {len(data)} bytes, expected {ctypes.sizeof(RawProc)}")
    r = RawProc.from_buffer_copy(data[: ctypes.sizeof(RawProc)])
    return ProcEvent(r.pid, r.event, r.ts_ns, r.comm.decode("utf-8", "replace"))


def decode_tcp(data: bytes) -> TcpEvent:
    if len(data) < ctypes.sizeof(RawTcp):
        raise ValueError(f"tcp record is {len(data)} bytes, expected {ctypes.sizeof(RawTcp)}")
    r = RawTcp.from_buffer_copy(data[: ctypes.sizeof(RawTcp)])
    return TcpEvent(
        kind=TcpEventKind(r.event),
        pid=r.pid,
        ts_ns=r.ts_ns,
        conn_id=r.conn_id,
        family=r.family,
        local_addr=format_addr(r.family, bytes(r.local_addr)),
        local_port=r.local_port,
        remote_addr=format_addr(r.family, bytes(r.remote_addr)),
        remote_port=r.remote_port,
        value=r.value,
    )


REC_SEGMENT = 5
SEG_CLOSED = 0x1
SEG_START = 0x2
SEG_SEQ = 0x4
SEG_PEER = 0x8
SEG_H2_FRAMES = 0x10
SEG_H2_TAIL = 0x20
_H2_ENTRY = struct.Struct("<IHH")  # struct kspan_h2_entry: transfer offset, bytes copied, flags


class RawSegment(ctypes.Structure):
    """struct kspan_segment (bpf/kspan.h): one transfer on a connection of another protocol."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("dir", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("role", ctypes.c_uint8),
        ("parent_kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("data_len", ctypes.c_uint16),
        ("local_addr", ctypes.c_uint8 * 16),
        ("remote_addr", ctypes.c_uint8 * 16),
        ("seg_flags", ctypes.c_uint32),
        ("tcp_seq", ctypes.c_uint32),
        ("conn_id", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("seq", ctypes.c_uint64),
        ("trace_id", ctypes.c_uint8 * 16),
        ("parent_span_id", ctypes.c_uint64),
        ("ctx_seq", ctypes.c_uint32),
        ("ctx_end", ctypes.c_uint32),
    ]


SEGMENT_HEADER = ctypes.sizeof(RawSegment)  # the data follows: data_len bytes
# Recordings made before tcp_seq/ctx_seq: the header ended at parent_span_id (told apart by size:
# a ring record is exactly its header plus data_len bytes).
SEGMENT_HEADER_V1 = RawSegment.ctx_seq.offset
_DATA_LEN_AT = RawSegment.data_len.offset


def decode_segment(data: bytes) -> SegmentRecord:
    """Decode one `struct kspan_segment` (its header, then data_len bytes). Raises ValueError on a
    short or foreign record."""
    if len(data) < SEGMENT_HEADER_V1:
        raise ValueError(f"segment record is {len(data)} bytes, expected at least {SEGMENT_HEADER}")
    data_len = int.from_bytes(data[_DATA_LEN_AT : _DATA_LEN_AT + 2], "little")
    if len(data) == SEGMENT_HEADER_V1 + data_len:
        head = SEGMENT_HEADER_V1
        r = RawSegment.from_buffer_copy(bytes(data[:head]) + bytes(SEGMENT_HEADER - head))
    else:
        head = SEGMENT_HEADER
        if len(data) < head:
            raise ValueError(f"segment record is {len(data)} bytes, expected at least {SEGMENT_HEADER}")
        r = RawSegment.from_buffer_copy(data[:head])
    if r.type != REC_SEGMENT:
        raise ValueError(f"record type {r.type} is not a segment")
    n = min(r.data_len, len(data) - head)
    known = bool(r.flags & FLAG_TUPLE_KNOWN)
    family = r.family if known else 0
    tid = bytes(r.trace_id)
    client_write = r.role == Role.CLIENT and r.dir == 1
    peer = bool(r.seg_flags & SEG_PEER) and r.role == Role.SERVER and any(tid)
    seq_known = bool(r.seg_flags & SEG_SEQ)
    body = bytes(data[head : head + n])
    pos = r.tcp_seq if seq_known else 0
    pieces: tuple[Segment, ...] = ()
    if r.seg_flags & SEG_H2_FRAMES:
        pieces = _h2_pieces(r, body, pos)
        # seg.data keeps its meaning, the transfer's first bytes: the pieces copied whole from 0
        # (none when the first piece starts past a 101's head)
        whole = []
        for p in pieces if pieces and pieces[0].pos == pos else ():
            whole.append(p.data)
            if len(p.data) < p.length:
                break
        body = b"".join(whole)
    seg = Segment(conn_id=r.conn_id, pid=r.pid, tid=r.tid, egress=r.dir == 1, start_ns=r.start_ns,
                  end_ns=r.end_ns, length=r.len, data=body, pos=pos)
    return SegmentRecord(
        seg=seg, proto=r.proto, client=r.role == Role.CLIENT, closed=bool(r.seg_flags & SEG_CLOSED), seq=r.seq,
        from_start=bool(r.seg_flags & SEG_START),
        tls=bool(r.flags & FLAG_TLS), family=family,
        local_addr=_addr(family, bytes(r.local_addr)), local_port=r.local_port if known else 0,
        remote_addr=_addr(family, bytes(r.remote_addr)), remote_port=r.remote_port if known else 0,
        parent_kind=r.parent_kind if client_write else 0,
        trace_id=tid if (client_write or peer) and any(tid) else b"",
        parent_span_id=r.parent_span_id.to_bytes(8, "big") if client_write and r.parent_span_id else b"",
        sampled=bool(r.flags & FLAG_SAMPLED) if client_write or peer else True,
        ambiguous=bool(r.flags & FLAG_AMBIGUOUS),
        seq_known=seq_known and known,
        peer=peer and known,
        ctx_seq=r.ctx_seq if peer else 0,
        ctx_end=r.ctx_end if peer else 0,
        pieces=pieces,
    )


def _h2_pieces(r: RawSegment, body: bytes, pos: int) -> tuple[Segment, ...]:
    """An HTTP/2 transfer the kernel walked frame by frame (bpf/http_exchange.h, kspan_h2_frames):
    its entries as frame-aligned sub-transfers, each covering the transfer up to the next entry,
    so a decoder steps over the DATA payloads the kernel did not copy as it steps over any gap.
    Bytes before the first entry (the rest of a DATA frame) are a piece with no data, unless they
    are not HTTP/2 at all (SEG_H2_TAIL: the head of the 101 that switched the connection)."""
    entries: list[tuple[int, bytes]] = []
    i = 0
    while i + _H2_ENTRY.size <= len(body):
        off, copied, _ = _H2_ENTRY.unpack_from(body, i)
        i += _H2_ENTRY.size
        if off > r.len or (entries and off < entries[-1][0]):
            break  # malformed: the rest is a gap the decoder counts
        entries.append((off, body[i : i + copied]))
        i += copied
    if (not entries or entries[0][0] > 0) and not r.seg_flags & SEG_H2_TAIL:
        entries.insert(0, (0, b""))  # the rest of a frame the previous transfer began
    out = []
    for k, (off, chunk) in enumerate(entries):
        end = entries[k + 1][0] if k + 1 < len(entries) else r.len
        out.append(Segment(conn_id=r.conn_id, pid=r.pid, tid=r.tid, egress=r.dir == 1, start_ns=r.start_ns,
                           end_ns=r.end_ns, length=end - off, data=chunk[: end - off], pos=(pos + off) & 0xFFFFFFFF))
    return tuple(p for p in out if p.length)
