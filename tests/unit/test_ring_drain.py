"""tracer/_records.c's drain() through tracer/ringbuf.py's reader, on a ring laid out in plain memory
as the kernel lays out a BPF ring buffer (kernel/bpf/ringbuf.c; bench/hotpath.py's MemoryRing,
which bench.hotpath drains too): the consumer page, the producer page, the data area mapped twice
in a row. The live ring is the e2e tests' (tests/e2e/test_capture.py,
test_segments.py) and test_loader.py's."""

from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import pytest

from bench import hotpath
from correlator.records import Exchange, MetricExchange
from correlator.segments import SegmentRecord
from tests.unit.test_dispatch import FIXTURES, _mixed
from tracer import _records, records

PAGE = mmap.PAGESIZE
U64 = struct.Struct("<Q")


Ring = hotpath.MemoryRing


def _exchanges() -> list[bytes]:
    recs = hotpath.load(FIXTURES["python_chain_ids"]).records
    return [r for r in recs if records.record_type(r) == records.REC_EXCHANGE]


def _flat(decoded: list[Any]) -> list[Any]:
    """Comparable values, in order (a run ends where a drain ends: the runs are flattened)."""
    out: list[Any] = []
    for item in decoded:
        if type(item) is list:
            out.extend(("metric", mx) if isinstance(mx, MetricExchange) else ("exchange", dataclasses.astuple(mx))
                       for mx in item)
        elif isinstance(item, SegmentRecord):
            out.append(dataclasses.astuple(item))
        else:
            out.append(item)
    return out


def _fill_and_drain(ring: Ring, recs: list[bytes], decode: bool, limit: int = 1 << 20) -> tuple[list[Any], int]:
    """Put records in as the ring has room and drain them (the kernel and the agent taking turns)."""
    got: list[Any] = []
    undecodable = 0
    i = 0
    while i < len(recs):
        while i < len(recs) and ring.room(len(recs[i])):
            ring.put(recs[i])
            i += 1
        if decode:
            _, bad = ring.reader.drain_decoded(got, limit)
            undecodable += bad
        else:
            ring.reader.drain(got, limit)
    while ring.consumed < ring.prod:
        if decode:
            undecodable += ring.reader.drain_decoded(got, limit)[1]
        else:
            ring.reader.drain(got, limit)
    return got, undecodable


@pytest.mark.parametrize("name", ["python_chain_ids", "ratio10"])
@pytest.mark.parametrize("start", [0, 16384 - 200, (1 << 40) - 8])
def test_records_decoded_in_the_ring_are_what_decoding_their_bytes_gives(name: str, start: int) -> None:
    """Every kind of record, undecodable ones among them, through a small ring that wraps around
    many times (records cross its end); the positions are 64-bit and keep growing."""
    recs = _mixed(hotpath.load(FIXTURES[name]).records)
    ring = Ring(16384, start)
    got, bad = _fill_and_drain(ring, recs, decode=True)
    want: list[Any] = []
    want_bad = records.decode_batch(recs, want)
    assert _flat(got) == _flat(want) and bad == want_bad > 0
    assert ring.consumed == ring.prod
    # and record by record through the single-record decoders, independently of decode_batch
    flat = [x for item in got for x in (item if type(item) is list else [item])]
    expect = []
    for r in recs:
        try:
            kind = records.record_type(r)
            if kind == records.REC_EXCHANGE:
                expect.append(records.decode_exchange(r))
            elif kind == records.REC_METRIC:
                expect.append(records.decode_metric(r))
            elif kind == records.REC_SEGMENT:
                expect.append(records.decode_segment(r))
            elif kind in (records.REC_PROC, records.REC_TCP):
                expect.append(r)
        except ValueError:
            continue
    assert len(flat) == len(expect)
    for a, b in zip(flat, expect, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Exchange | SegmentRecord):
            assert dataclasses.astuple(a) == dataclasses.astuple(b)
        else:
            assert a == b


def test_the_raw_path_gives_the_records_bytes_exactly() -> None:
    """`kspan record` keeps the bytes: every record, whatever its type or length."""
    recs = _mixed(hotpath.load(FIXTURES["python_chain_ids"]).records) + [b"", b"\x07", b"x" * 13]
    ring = Ring(8192, 8192 - 24)
    got, _ = _fill_and_drain(ring, recs, decode=False)
    assert got == recs


def test_runs_of_exchanges_and_of_metric_records_are_grouped_and_everything_else_keeps_its_place() -> None:
    src = hotpath.load(FIXTURES["python_chain_ids"]).records
    by_kind: dict[int, list[bytes]] = {}
    for r in src:
        by_kind.setdefault(records.record_type(r), []).append(r)
    ex, mx, tcp, proc = (by_kind[k] for k in (records.REC_EXCHANGE, records.REC_METRIC, records.REC_TCP,
                                               records.REC_PROC))
    stream = [ex[0], ex[1], mx[0], ex[2], b"\x63\0\0\0" + bytes(40), ex[3], tcp[0], proc[0], ex[4], ex[5], ex[6],
              mx[1], mx[2], b"\x63\0\0\0" + bytes(40), mx[3], ex[7], mx[4]]
    ring = Ring(1 << 16)
    for r in stream:
        ring.put(r)
    out: list[Any] = []
    assert ring.reader.drain_decoded(out) == (len(stream), 2)

    def kind(run: list[Any]) -> str:
        kinds = {type(x).__name__ for x in run}
        assert len(kinds) == 1  # a run holds one kind of record
        return kinds.pop()

    shape = [(kind(x), len(x)) if type(x) is list else type(x).__name__ for x in out]
    # a foreign record is counted and does not end the run it is in
    assert shape == [("Exchange", 2), ("MetricExchange", 1), ("Exchange", 2), "bytes", "bytes", ("Exchange", 3),
                     ("MetricExchange", 3), ("Exchange", 1), ("MetricExchange", 1)]
    assert out[3] == tcp[0] and out[4] == proc[0]
    assert out[6] == [records.decode_metric(r) for r in (mx[1], mx[2], mx[3])]


def test_a_record_not_yet_committed_stops_the_drain_until_it_is() -> None:
    ex = _exchanges()
    ring = Ring(1 << 16)
    ring.put(ex[0])
    busy = ring.put(ex[1], busy=True)
    ring.put(ex[2])  # committed, but behind a reserved one: not ours yet
    out: list[Any] = []
    assert ring.reader.drain_decoded(out) == (1, 0)
    assert ring.consumed == busy and len(out) == 1 and len(out[0]) == 1
    assert ring.reader.drain_decoded(out) == (0, 0) and ring.consumed == busy
    assert ring.reader.pending()
    ring.commit(busy)
    out = []
    assert ring.reader.drain_decoded(out) == (2, 0)
    assert [e.conn_id for e in out[0]] == [records.decode_exchange(r).conn_id for r in ex[1:3]]
    assert ring.consumed == ring.prod and not ring.reader.pending()


def test_a_discarded_record_is_skipped() -> None:
    ex = _exchanges()
    ring = Ring(1 << 16)
    ring.put(ex[0])
    ring.put(ex[1], discard=True)
    ring.put(b"\x05\0\0\0", discard=True)
    ring.put(ex[2])
    out: list[Any] = []
    assert ring.reader.drain_decoded(out) == (2, 0)
    assert [e.conn_id for e in out[0]] == [records.decode_exchange(r).conn_id for r in (ex[0], ex[2])]
    assert ring.consumed == ring.prod
    raw: list[bytes] = []
    ring.put(ex[3], discard=True)
    ring.put(ex[4])
    assert ring.reader.drain(raw) == 1 and raw == [ex[4]]


def test_short_and_foreign_records_are_counted_and_skipped() -> None:
    src = hotpath.load(FIXTURES["python_chain_ids"]).records
    ex = next(r for r in src if records.record_type(r) == records.REC_EXCHANGE)
    mx = next(r for r in src if records.record_type(r) == records.REC_METRIC)
    bad = [b"", b"\x01\0", b"\x63\0\0\0" + bytes(64), ex[:-1], ex[:100], mx[:50],
           records.REC_SEGMENT.to_bytes(4, "little") + bytes(10)]
    ring = Ring(1 << 16)
    for r in [ex, *bad, mx]:
        ring.put(r)
    out: list[Any] = []
    assert ring.reader.drain_decoded(out) == (len(bad) + 2, len(bad))
    assert len(out) == 2 and len(out[0]) == 1 and out[1] == [records.decode_metric(mx)]


def test_the_limit_leaves_the_rest_for_the_next_drain() -> None:
    ex = _exchanges()
    ring = Ring(1 << 16)
    positions = [ring.put(r) for r in ex[:10]]
    out: list[Any] = []
    assert ring.reader.drain_decoded(out, 4) == (4, 0)
    assert ring.consumed == positions[4] and len(out[0]) == 4
    raw: list[bytes] = []
    assert ring.reader.drain(raw, 3) == 3 and raw == ex[4:7] and ring.consumed == positions[7]
    assert ring.reader.drain_decoded(out) == (3, 0) and ring.consumed == ring.prod


def test_a_length_the_ring_cannot_hold_is_an_error_not_a_read_past_it() -> None:
    ring = Ring(8192)
    ring.put(b"\x01\0\0\0" + bytes(60))
    at = ring.prod
    ring.write(at, struct.pack("<II", 9000, 0))  # longer than the ring
    ring.prod += 16
    U64.pack_into(ring.producer, 0, ring.prod)
    out: list[Any] = []
    with pytest.raises(ValueError, match="corrupt"):
        ring.reader.drain_decoded(out)
    assert ring.consumed == at  # what was read before it is consumed, it is not
    with pytest.raises(ValueError, match="corrupt"):
        ring.reader.drain([])


def test_the_mappings_must_hold_the_ring() -> None:
    out: list[Any] = []
    with pytest.raises(ValueError):
        _records.drain(mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE + 4096), PAGE, 4096, 10, out, True)
    with pytest.raises(ValueError):
        _records.drain(mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE + 2 * 6000), PAGE, 6000, 10, out, True)
    with pytest.raises(BufferError):
        _records.drain(b"\0" * 8, mmap.mmap(-1, PAGE + 8192), PAGE, 4096, 10, out, True)  # not writable


def _proc_record() -> bytes:
    r = records.RawProc()
    r.type, r.event, r.pid = records.REC_PROC, records.PROC_EXEC, 4242
    return bytes(r)


def test_a_burst_ends_a_long_interval_at_the_next_tick() -> None:
    """After a quiet spell the interval is long (DRAIN_INTERVAL_MAX_S); a burst that fills a
    quarter of the ring is drained at the caller's next tick, before the ring could overflow."""
    import time

    ex = _exchanges()
    ring = Ring(1 << 16)
    out: list[Any] = []
    ring.reader.drain(out)
    ring.put(ex[0])
    t0 = time.monotonic()
    assert ring.reader.wait(200, interval_s=30.0) is False  # one record: the tick passes, no drain
    assert time.monotonic() - t0 >= 0.2
    while ring.prod - ring.consumed <= ring.size // 4:
        ring.put(ex[1])
    t0 = time.monotonic()
    assert ring.reader.wait(200, interval_s=30.0) is True
    assert time.monotonic() - t0 < 5.0
    assert ring.reader.drain(out) > 1


def test_a_pause_ends_early_only_when_the_kernel_wakes_the_reader() -> None:
    """The reader batches records for an interval; only a wakeup (the kernel's, for an exec
    record: BPF_RB_FORCE_WAKEUP) ends a pause early. An eventfd stands for the ring's descriptor,
    watched edge-triggered as the agent watches the ring's: records waiting in the ring do not end
    the pause, and one wakeup ends one pause. The live kernel's wakeup is tests/e2e/
    test_hardening.py's server started after the agent (traced from its first request)."""
    import os
    import time

    ex = _exchanges()
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    base = Ring(1 << 16)
    ring_reader = type(base.reader).over(base.consumer, base.producer, base.size, wake_fd=wake)
    try:
        out: list[Any] = []
        ring_reader.drain(out)  # the interval counts from here
        base.put(ex[0])
        t0 = time.monotonic()
        ring_reader.wait(300, interval_s=30.0)
        assert time.monotonic() - t0 >= 0.3  # a committed record alone: the whole pause (the timeout)
        base.put(_proc_record())
        os.eventfd_write(wake, 1)  # the kernel's wakeup for the exec record
        t0 = time.monotonic()
        ring_reader.wait(10_000, interval_s=30.0)
        assert time.monotonic() - t0 < 5.0
        assert ring_reader.drain(out) == 2
        base.put(ex[1])
        t0 = time.monotonic()
        ring_reader.wait(300, interval_s=30.0)  # that wakeup was used: no early return again
        assert time.monotonic() - t0 >= 0.3
    finally:
        ring_reader.close()
        os.close(wake)
