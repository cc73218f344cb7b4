"""ctypes mirror of bpf/kspan.h and the decoding of raw kernel records into correlator values.

Imports no bcc: `kspan replay` decodes recorded files with this module alone.
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass

from correlator.records import (
    EndReason,
    Exchange,
    ExchangeId,
    ParentHint,
    ParentKind,
    Role,
    Source,
    TcpEvent,
    TcpEventKind,
)

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


def format_addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        text = socket.inet_ntop(socket.AF_INET6, raw[:16])
        # An IPv4 peer on a dual-stack socket: report the IPv4 address users know.
        return text[7:] if text.startswith("::ffff:") and "." in text else text
    return ""


def record_type(data: bytes) -> int:
    return int.from_bytes(data[:4], "little") if len(data) >= 4 else 0


def decode_exchange(data: bytes) -> Exchange:
    """Decode one `struct kspan_exchange`. Raises ValueError on a short or foreign record."""
    if len(data) < EXCHANGE_SIZE:
        raise ValueError(f"exchange record is {len(data)} bytes, expected {EXCHANGE_SIZE}")
    r = RawExchange.from_buffer_copy(data[:EXCHANGE_SIZE])
    if r.type != REC_EXCHANGE:
        raise ValueError(f"record type {r.type} is not an exchange")
    known = bool(r.flags & FLAG_TUPLE_KNOWN)
    family = r.family if known else 0
    parent = None
    if r.parent_kind != ParentKind.NONE:
        parent = ParentHint(
            ParentKind(r.parent_kind), r.parent_pid, ExchangeId(r.parent_conn_id, r.parent_req_start_ns)
        )
    req_len = min(r.req_head_len, REQ_HEAD)
    resp_len = min(r.resp_head_len, RESP_HEAD)
    tail_len = min(r.resp_tail_len, TAIL)
    return Exchange(
        pid=r.pid,
        tid=r.tid,
        role=Role(r.role),
        end=EndReason(r.end_reason),
        source=Source(r.source),
        tls=bool(r.flags & FLAG_TLS),
        conn_id=r.conn_id,
        family=family,
        local_addr=format_addr(family, bytes(r.local_addr)),
        local_port=r.local_port if known else 0,
        remote_addr=format_addr(family, bytes(r.remote_addr)),
        remote_port=r.remote_port if known else 0,
        req_start_ns=r.req_start_ns,
        req_end_ns=r.req_end_ns,
        resp_start_ns=r.resp_start_ns,
        resp_end_ns=r.resp_end_ns,
        req_bytes=r.req_bytes,
        resp_bytes=r.resp_bytes,
        status=r.status,
        parent=parent,
        # ctypes c_char arrays stop at NUL; read the raw buffer with its length instead.
        req_head=bytes(data[RawExchange.req_head.offset : RawExchange.req_head.offset + req_len]),
        resp_head=bytes(data[RawExchange.resp_head.offset : RawExchange.resp_head.offset + resp_len]),
        resp_tail=bytes(data[RawExchange.resp_tail.offset : RawExchange.resp_tail.offset + tail_len]),
        req_head_truncated=bool(r.flags & FLAG_REQ_HEAD_FULL),
        resp_head_truncated=bool(r.flags & FLAG_RESP_HEAD_FULL),
        interim_response=bool(r.flags & FLAG_INTERIM),
        parent_ambiguous=bool(r.flags & FLAG_AMBIGUOUS),
    )


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
