"""Reading a BPF ring buffer map directly from its memory mapping, in batches.

A callback per record through ctypes costs about 5 us on this machine; reading the mapped pages
costs a fraction of that, which matters when every request yields a record at both ends. The walk
over the records is tracer/_records.c's drain(), which also decodes them where they lie (no bytes
object per record) for the agent.
The programs submit with BPF_RB_NO_WAKEUP: a wakeup costs about 1.4 us inside the traced process
at every record, so the reader drains on a short timer instead of waiting to be woken.
Layout (kernel/bpf/ringbuf.c, stable since 5.8): page 0 is
the consumer position (we write it), page 1 the producer position, then the data area mapped
twice in a row so a record that wraps around reads as one slice. Each record has an 8-byte
header: u32 length with BUSY (not yet committed) and DISCARD bits, u32 page offset.
"""

from __future__ import annotations

import mmap
import struct
import time
from typing import Any

from tracer import _records
from tracer import records as _decoders  # noqa: F401 - sets up tracer/_records.c's decoders

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8  # the walk itself is tracer/_records.c's drain()
# How often an idle reader looks at the producer position: the latency a record can wait, and
# the agent's only wake-ups when nothing happens.
DRAIN_INTERVAL_S = 0.01


class RingBufferReader:
    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self._init(mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0),
                   mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page),
                   data_size)

    @classmethod
    def over(cls, consumer: mmap.mmap, producer: mmap.mmap, data_size: int) -> RingBufferReader:
        """A reader of mappings laid out as the kernel's (the tests build a ring in plain memory)."""
        reader = cls.__new__(cls)
        reader._init(consumer, producer, data_size)
        return reader

    def _init(self, consumer: mmap.mmap, producer: mmap.mmap, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        self._mask = data_size - 1
        self._consumer = consumer
        self._producer = producer
        self._page = mmap.PAGESIZE
        self._closed = False

    def _positions(self) -> tuple[int, int]:
        cons = struct.unpack_from("<Q", self._consumer, 0)[0]
        prod = struct.unpack_from("<Q", self._producer, 0)[0]
        return cons, prod

    def drain(self, out: list[bytes], limit: int = 1 << 20) -> int:
        """Append every committed record to `out` as bytes (up to `limit`); returns how many."""
        return _records.drain(self._consumer, self._producer, self._page, self._mask + 1, limit, out, False)[0]

    def drain_decoded(self, out: list[Any], limit: int = 1 << 20) -> tuple[int, int]:
        """Every committed record (up to `limit`) decoded straight from the mapping into `out`, as
        tracer/_records.c's decode_batch does from bytes; returns (records, undecodable)."""
        return _records.drain(self._consumer, self._producer, self._page, self._mask + 1, limit, out, True)

    def pending(self) -> bool:
        cons, prod = self._positions()
        return cons < prod

    def wait(self, timeout_ms: int, interval_s: float = DRAIN_INTERVAL_S) -> None:
        """Return once records are committed or `timeout_ms` has passed, looking every `interval_s`:
        the kernel does not wake the reader (BPF_RB_NO_WAKEUP), and waiting a tick when records
        are already there would only delay them, so a non-empty ring returns at once."""
        if timeout_ms <= 0 or self.pending():
            return
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(interval_s, left))
            if self.pending():
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._producer.close()
        self._consumer.close()
