"""ctypes mirror of bpf/kspan.h and the decoding of raw kernel records into correlator values.

The per-record decoders (record_type, decode_exchange, decode_metric, decode_segment) are
tracer/_records.c, compiled against bpf/kspan.h itself; this module hands it the correlator's
classes once and checks at import that its ctypes mirrors, which the sweeper, the recordings and
the tests use for offsets, agree with the compiled layout. Imports no bcc: `kspan replay` decodes
recorded files with this module alone.
"""

from __future__ import annotations

import ctypes
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
from tracer import _records
from tracer._records import decode_batch as decode_batch
from tracer._records import decode_exchange as decode_exchange
from tracer._records import decode_metric as decode_metric
from tracer._records import decode_segment as decode_segment
from tracer._records import record_type as record_type

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
# Recordings made before the kernel fixed identities (recording version 1): the same record
# without the 32 identity bytes before req_head.
LEGACY_EXCHANGE_SIZE = EXCHANGE_SIZE - (RawExchange.req_head.offset - RawExchange.trace_id.offset)

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


def _check_layout(layout: dict[str, tuple[int, dict[str, tuple[int, int]]]], constants: dict[str, int]) -> None:
    """tracer/_records.c reads the structs of bpf/kspan.h as it was compiled against (`layout`:
    struct -> (size, field -> (offset, size)), and its `constants`); a ctypes mirror that disagrees
    with it by one field, or a module built before the header changed, would read another field's
    bytes without any error, so the import fails instead."""
    for cls, name, beyond in ((RawExchange, "kspan_exchange", ()), (RawSegment, "kspan_segment", ("data",))):
        size, fields = layout[name]
        mirror = {f: (getattr(cls, f).offset, getattr(cls, f).size) for f, _ in cls._fields_}
        header = {f: at for f, at in fields.items() if f not in beyond}
        header_size = fields[beyond[0]][0] if beyond else size
        if mirror != header or ctypes.sizeof(cls) != header_size:
            raise AssertionError(f"tracer/records.py: {cls.__name__} does not match struct {name} as "
                                 "tracer/_records.c was compiled (bpf/kspan.h): rebuild it, or fix the mirror")
    wrong = {k: v for k, v in constants.items() if globals()[k] != v}
    if wrong:
        raise AssertionError(f"tracer/records.py: constants differ from bpf/kspan.h's: {wrong}")


def _setup_decoders() -> None:
    """The correlator's classes and enums to tracer/_records.c, once (see its setup())."""
    _records.setup(
        exchange=Exchange, parent_hint=ParentHint, exchange_id=ExchangeId, metric=MetricExchange, segment=Segment,
        segment_record=SegmentRecord, roles=Role, ends=EndReason, sources=Source, parent_kinds=ParentKind,
        format_addr=format_addr,
    )


_check_layout(_records.LAYOUT, _records.CONSTANTS)
_setup_decoders()
