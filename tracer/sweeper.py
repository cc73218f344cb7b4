"""Exchanges the kernel can never finish: a request whose response never comes.

The kernel only emits an exchange when bytes or a close arrive; user space walks the
connection-state map now and then and takes out the ones that made no progress within the
response timeout, as records with end_reason TIMEOUT. The decisions here are pure (bytes in,
bytes out) so they are unit-testable without a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracer.records import EXCHANGE_SIZE, REC_EXCHANGE, RawExchange

END_TIMEOUT = 4

PHASE_IDLE = 0
# enum kspan_phase KSPAN_PH_PREFIX: a connection holding bytes that may begin a request ("GE"), no
# exchange in progress; its embedded record is not one (or is an earlier, already emitted one).
PHASE_PREFIX = 4
# KSPAN_PH_PROTO: a connection of another protocol (segments, no exchange to time out).
PHASE_PROTO = 5

_END_REASON_OFFSET = RawExchange.end_reason.offset
_TYPE_OFFSET = RawExchange.type.offset


@dataclass(frozen=True, slots=True)
class ConnLayout:
    """Where struct kspan_conn (bpf/http_exchange.h) keeps its sweep fields; the capture reads the
    offsets from the object's BTF, so C and Python cannot drift apart."""

    last_ns: int
    phase: int
    size: int


@dataclass(frozen=True, slots=True)
class StaleState:
    conn_id: int
    last_ns: int
    record: bytes  # a struct kspan_exchange with end_reason TIMEOUT


def stale_record(
    conn_id: int, value: bytes, now_mono_ns: int, timeout_ns: int, layout: ConnLayout
) -> StaleState | None:
    """The TIMEOUT record for one connection state, or None if it is idle, only holds the first bytes
    of a request that may never come, or is still making progress."""
    if len(value) < layout.size or len(value) < EXCHANGE_SIZE:
        return None
    if value[layout.phase] in (PHASE_IDLE, PHASE_PREFIX, PHASE_PROTO):
        return None
    last = int.from_bytes(value[layout.last_ns : layout.last_ns + 8], "little")
    if last == 0 or now_mono_ns - last < timeout_ns:
        return None
    rec = bytearray(value[:EXCHANGE_SIZE])
    if int.from_bytes(rec[_TYPE_OFFSET : _TYPE_OFFSET + 4], "little") != REC_EXCHANGE:
        return None
    rec[_END_REASON_OFFSET] = END_TIMEOUT
    return StaleState(conn_id, last, bytes(rec))


def exchange_fields(value: bytes) -> RawExchange:
    """The struct kspan_exchange at the start of a connection state (it embeds the record)."""
    return RawExchange.from_buffer_copy(value[:EXCHANGE_SIZE])
