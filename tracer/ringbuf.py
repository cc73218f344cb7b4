"""Reading a BPF ring buffer map directly from its memory mapping, in batches.

A callback per record through ctypes costs about 5 us on this machine; reading the mapped pages
costs a fraction of that, which matters when every request yields a record at both ends. The walk
over the records is tracer/_records.c's drain(), which also decodes them where they lie (no bytes
object per record) for the agent.
The programs submit with BPF_RB_NO_WAKEUP: a wakeup costs about 1.4 us inside the traced process
at every record, so the reader drains on a short timer instead of waiting to be woken. The one
exception is a process's exec record (bpf/process.bpf.c, BPF_RB_FORCE_WAKEUP): the agent must
attach to, or allow, the new process before its first request, so the reader sleeps in an
edge-triggered epoll on the ring's descriptor, which only such a wakeup ends early (level-triggered,
it would return at once whenever any record is waiting). The timer
paces the drains: after one that emptied the ring the next comes a whole interval later, even if
records arrived meanwhile, so a poll's batch is an interval's records (a drain costs the agent a
fixed part, and a small batch after a sleep runs on cold caches: 50 ms instead of 10 ms took the
agent's CPU per request at 1,000 req/s from about 40 to about 15 us here, 250 ms to about 11,
and 1 s about 10% less again). The interval adapts to the rate: about BATCH_RECORDS records a
drain, between DRAIN_INTERVAL_S (busy: the ring's headroom) and DRAIN_INTERVAL_MAX_S (quiet: a
record's wait before the agent sees it, within the OpenTelemetry SDK's own 5 s batch delay).
Only a drain cut by its limit is followed at once.
Layout (kernel/bpf/ringbuf.c, stable since 5.8): page 0 is
the consumer position (we write it), page 1 the producer position, then the data area mapped
twice in a row so a record that wraps around reads as one slice. Each record has an 8-byte
header: u32 length with BUSY (not yet committed) and DISCARD bits, u32 page offset.
"""

from __future__ import annotations

import mmap
import select
import struct
import time
from typing import Any

from tracer import _records
from tracer import records as _decoders  # noqa: F401  (sets up tracer/_records.c's decoders)

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8  # the walk itself is tracer/_records.c's drain()
# How often the reader drains: the latency a record can wait before the agent sees it (spans are
# exported in batches up to a second apart anyway). At 20,000 req/s with both ends traced, 50 ms
# is 2,000 records of the 17,000 the default ring holds.
DRAIN_INTERVAL_S = 0.05
DRAIN_INTERVAL_MAX_S = 1.0
BATCH_RECORDS = 768  # under tracer/capture.py's POLL_BATCH (1,024), a drain's limit


class RingBufferReader:
    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self._init(mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0),
                   mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page),
                   data_size, map_fd)

    @classmethod
    def over(cls, consumer: mmap.mmap, producer: mmap.mmap, data_size: int,
             wake_fd: int | None = None) -> RingBufferReader:
        """A reader of mappings laid out as the kernel's (the tests build a ring in plain memory;
        wake_fd, if given, stands for the ring's descriptor: an eventfd the test writes to)."""
        reader = cls.__new__(cls)
        reader._init(consumer, producer, data_size, wake_fd)
        return reader

    def _init(self, consumer: mmap.mmap, producer: mmap.mmap, data_size: int, wake_fd: int | None) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        self._epoll: select.epoll | None = None
        if wake_fd is not None:
            self._epoll = select.epoll()
            self._epoll.register(wake_fd, select.EPOLLIN | select.EPOLLET)
        self._mask = data_size - 1
        self._consumer = consumer
        self._producer = producer
        self._page = mmap.PAGESIZE
        self._closed = False
        self._backlog = False  # the last drain stopped at its limit: more is committed
        self._drained_at = float("-inf")  # time.monotonic() of the last drain
        self._interval = DRAIN_INTERVAL_MAX_S  # until the next drain, for the rate the last one saw

    def _positions(self) -> tuple[int, int]:
        cons = struct.unpack_from("<Q", self._consumer, 0)[0]
        prod = struct.unpack_from("<Q", self._producer, 0)[0]
        return cons, prod

    def drain(self, out: list[bytes], limit: int = 1 << 20) -> int:
        """Append every committed record to `out` as bytes (up to `limit`); returns how many."""
        n = _records.drain(self._consumer, self._producer, self._page, self._mask + 1, limit, out, False)[0]
        self._drained(n, limit)
        return n

    def drain_decoded(self, out: list[Any], limit: int = 1 << 20) -> tuple[int, int]:
        """Every committed record (up to `limit`) decoded straight from the mapping into `out`, as
        tracer/_records.c's decode_batch does from bytes; returns (records, undecodable)."""
        got = _records.drain(self._consumer, self._producer, self._page, self._mask + 1, limit, out, True)
        self._drained(got[0], limit)
        return got

    def _drained(self, n: int, limit: int) -> None:
        now = time.monotonic()
        self._backlog = n >= limit
        elapsed = now - self._drained_at
        # BATCH_RECORDS at the rate the ring filled since the last drain, within the bounds
        want = BATCH_RECORDS * elapsed / n if n else DRAIN_INTERVAL_MAX_S
        self._interval = min(DRAIN_INTERVAL_MAX_S, max(DRAIN_INTERVAL_S, want))
        self._drained_at = now

    @property
    def interval_s(self) -> float:
        """The pause before the next drain, for the rate the last one saw."""
        return self._interval

    def pending(self) -> bool:
        cons, prod = self._positions()
        return cons < prod

    def wait(self, timeout_ms: int, interval_s: float | None = None) -> bool:
        """Wait until the next drain is due, at most `timeout_ms`; whether it is. Due: at once after
        a drain cut by its limit (or with a zero timeout), once records are committed and
        `interval_s` has passed since the last drain, and as soon as the kernel wakes the reader
        (a process's exec record, the only one submitted with a wakeup). The timeout is the
        caller's own housekeeping tick, shorter than the interval at low rates: it does not make
        a drain due."""
        if timeout_ms <= 0 or self._backlog:
            return True
        if interval_s is None:
            interval_s = self._interval
        now = time.monotonic()
        deadline = now + timeout_ms / 1000.0
        due = self._drained_at + interval_s
        while True:
            wake_at = min(due, deadline)
            if now < wake_at and self._sleep(wake_at - now):
                return True
            now = time.monotonic()
            if now < wake_at:
                continue  # a signal cut the sleep short
            cons, prod = self._positions()
            if now >= due and cons < prod:
                return True
            # A quarter of the ring holds records: a burst after a quiet spell (an interval of up
            # to DRAIN_INTERVAL_MAX_S) is drained at the caller's next tick, before it overflows.
            if prod - cons > (self._mask + 1) // 4:
                return True
            if now >= deadline:
                return False
            due = now + interval_s  # nothing committed yet: a whole interval's records, not one

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; whether the kernel woke the reader meanwhile."""
        if self._epoll is None:
            time.sleep(seconds)
            return False
        return bool(self._epoll.poll(seconds, 1))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._epoll is not None:
            self._epoll.close()
        self._producer.close()
        self._consumer.close()
