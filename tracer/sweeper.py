"""Exchanges the kernel can never finish: a request whose response never comes.

The kernel only emits an exchange when bytes or a close arrive; user space walks the
connection-state map now and then and takes out the ones that made no progress within the
response timeout, as records with end_reason TIMEOUT. The decisions here are pure (bytes in,
bytes out) so they are unit-testable without a kernel.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from tracer.records import EXCHANGE_SIZE, REC_EXCHANGE, RawExchange

END_TIMEOUT = 4

# struct kspan_conn (bpf/http_exchange.h): the exchange, then these fields.
_LAST_NS_OFFSET = EXCHANGE_SIZE
_PHASE_OFFSET = EXCHANGE_SIZE + 8 * 4 + 4 * 2
PHASE_IDLE = 0

_END_REASON_OFFSET = RawExchange.end_reason.offset
_TYPE_OFFSET = RawExchange.type.offset


@dataclass(frozen=True, slots=True)
class StaleState:
    conn_id: int
    last_ns: int
    record: bytes  # a struct kspan_exchange with end_reason TIMEOUT


def conn_phase(value: bytes) -> int:
    return value[_PHASE_OFFSET] if len(value) > _PHASE_OFFSET else PHASE_IDLE


def conn_last_ns(value: bytes) -> int:
    return int.from_bytes(value[_LAST_NS_OFFSET : _LAST_NS_OFFSET + 8], "little")


def stale_record(conn_id: int, value: bytes, now_mono_ns: int, timeout_ns: int) -> StaleState | None:
    """The TIMEOUT record for one connection state, or None if it is idle or still making progress."""
    if len(value) < EXCHANGE_SIZE + 48:
        return None
    if conn_phase(value) == PHASE_IDLE:
        return None
    last = conn_last_ns(value)
    if last == 0 or now_mono_ns - last < timeout_ns:
        return None
    rec = bytearray(value[:EXCHANGE_SIZE])
    if int.from_bytes(rec[_TYPE_OFFSET : _TYPE_OFFSET + 4], "little") != REC_EXCHANGE:
        return None
    rec[_END_REASON_OFFSET] = END_TIMEOUT
    return StaleState(conn_id, last, bytes(rec))


def raw_bytes(obj: ctypes.Structure | ctypes.Array) -> bytes:  # type: ignore[type-arg]
    return ctypes.string_at(ctypes.addressof(obj), ctypes.sizeof(obj))
