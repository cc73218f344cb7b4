"""Micro-benchmark of the agent's per-record user-space path: decode -> correlator -> metrics ->
OTLP encoding, fed with raw kernel records recorded from a real load.

  python -m bench.hotpath                    # both bundled recordings, prints us/exchange
  python -m bench.hotpath --json             # the same figures as one JSON object
  python -m bench.hotpath --recording F.kspan[.gz] --passes 5

The bundled recordings (bench/data/) are `kspan record --pid <goserver> --exe goload` while
bench/goload sent 2,000 req/s to bench/goserver (both ends traced, so client and server records
with the kernel's PEER links), trimmed to their first 4,000 exchange or metric records:
hotpath-sampled.kspan.gz with `--sampler traceidratio --sampler-arg 1` (every record a full
exchange), hotpath-ratio10.kspan.gz with `--sampler-arg 0.1` (about 90% compact metric records).

Every pass runs the agent's own code (tracer/ringbuf.py's reader draining the records from a ring
buffer laid out in memory as the kernel's, tracer/agent.py's RecordDispatch, exporters/metrics.py's
aggregator, exporters/otlp_proto.py's encoder) on the whole recording, through one correlator,
aggregator and encoder, as in a running agent: each pass moves the records' connection ids so the
correlator takes them as new exchanges, and untimed passes first fill its memory of resolved
identities to its steady-state size (max_resolved), where every new one evicts the oldest.
Times are this thread's CPU time (time.thread_time_ns), the minimum over the passes, so other
work on a shared machine inflates them less than wall time would. The figures are per exchange
record (both ends of a request are two exchanges); "unsampled" is the cost of one metric record
alone (ring read and decode, correlator, metrics), the issue's per-unsampled-exchange target. Not
included: the HTTP export, and the agent's per-poll work (see bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import report
from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.sampling import parse_sampler
from correlator.spans import ProcessInfo, Span
from exporters.metrics import MetricsAggregator
from exporters.otlp_proto import ResourceOverrides, WireEncoder
from tracer import records
from tracer.agent import GC_THRESHOLDS, RecordDispatch
from tracer.processes import ProcessTable
from tracer.recording import RecordingMeta, read_recording
from tracer.records import RawExchange
from tracer.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER, RingBufferReader

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RECORDINGS = {
    "sampled": os.path.join(DATA, "hotpath-sampled.kspan.gz"),
    "ratio10": os.path.join(DATA, "hotpath-ratio10.kspan.gz"),
}
POLL_BATCH = 1024  # tracer/capture.py's POLL_BATCH: records per dispatch
RING_SIZE = 4096 * 4096  # the agent's default ring (--ringbuf-pages 4096)
EXPORT_BATCH = 512  # exporters/pipeline.py's default max_batch
WARM_PASSES_MAX = 15
DEFAULT_PASSES = 5


@dataclass
class Recording:
    meta: RecordingMeta
    records: list[bytes]
    processes: list[ProcessInfo]
    exchanges: int  # full exchange records
    metrics: int  # metric records (unsampled exchanges)


def load(path: str) -> Recording:
    opener: Callable[..., Any] = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        meta, frames = read_recording(f)
        recs: list[bytes] = []
        procs: list[ProcessInfo] = []
        for kind, payload in frames:
            if kind == "process":
                assert isinstance(payload, ProcessInfo)
                procs.append(payload)
            else:
                assert isinstance(payload, bytes)
                recs.append(payload)
    n_ex = sum(1 for r in recs if records.record_type(r) == records.REC_EXCHANGE)
    n_mx = sum(1 for r in recs if records.record_type(r) == records.REC_METRIC)
    return Recording(meta, recs, procs, n_ex, n_mx)


def _sampler(meta: RecordingMeta) -> Any:
    name, _, arg = meta.sampler.partition(" ")
    return parse_sampler(name or "always_on", arg or None)[0]


def _setup(rec: Recording) -> tuple[ProcessTable, Correlator]:
    table = ProcessTable()
    for p in rec.processes:
        table.put(p)
    # tracer/agent.py's _correlator_config, with the recording's salt and sampler
    cfg = CorrelatorConfig(id_salt=bytes.fromhex(rec.meta.id_salt), max_held_spans=20_000, sampler=_sampler(rec.meta))
    return table, Correlator(WallClock(rec.meta.clock_offset_ns), cfg)


_CONN_AT = RawExchange.conn_id.offset
_PARENT_CONN_AT = RawExchange.parent_conn_id.offset
_U64 = struct.Struct("<Q")


def _shifted(recs: list[bytes], n: int) -> list[bytes]:
    """The records with their connection identities moved (pass n of the same recording): the
    correlator takes them as new exchanges, as the next seconds of the same load would be."""
    if n == 0:
        return recs
    out = []
    for r in recs:
        if records.record_type(r) in (records.REC_EXCHANGE, records.REC_METRIC):
            b = bytearray(r)
            for at in (_CONN_AT, _PARENT_CONN_AT):
                v = _U64.unpack_from(b, at)[0]
                if v:
                    _U64.pack_into(b, at, v ^ (n << 4))
            r = bytes(b)
        out.append(r)
    return out


class MemoryRing:
    """A BPF ring buffer laid out in plain memory as the kernel lays one out (kernel/bpf/ringbuf.c;
    tracer/ringbuf.py): the consumer page, the producer page, the data area twice in a row (the
    second copy kept equal to the first, as the double mapping makes it). The kernel's side:
    reserve and commit records (BUSY until committed, DISCARD); `reader` is the agent's side."""

    PAGE = mmap.PAGESIZE
    _U64 = struct.Struct("<Q")

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.consumer = mmap.mmap(-1, self.PAGE)
        self.producer = mmap.mmap(-1, self.PAGE + 2 * size)
        self.prod = start
        self._U64.pack_into(self.consumer, 0, start)
        self._U64.pack_into(self.producer, 0, start)
        self.reader = RingBufferReader.over(self.consumer, self.producer, size)

    def write(self, pos: int, data: bytes) -> None:
        """Bytes at a ring position, wrapping at the end (in both copies of the data area)."""
        off = pos % self.size
        first = min(len(data), self.size - off)
        for base in (self.PAGE, self.PAGE + self.size):
            self.producer[base + off : base + off + first] = data[:first]
            self.producer[base : base + len(data) - first] = data[first:]

    def room(self, payload: int) -> bool:
        return self.prod + HEADER + payload + 8 - self.consumed <= self.size

    def put(self, payload: bytes, busy: bool = False, discard: bool = False) -> int:
        """A record at the producer position (committed unless busy); returns its position."""
        if not self.room(len(payload)):
            raise OverflowError("the ring is full")
        pos = self.prod
        length = len(payload) | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discard else 0)
        self.write(pos, struct.pack("<II", length, 0) + payload)
        self.prod += (len(payload) + HEADER + 7) & ~7
        self._U64.pack_into(self.producer, 0, self.prod)
        return pos

    def commit(self, pos: int) -> None:
        length = struct.unpack_from("<I", self.producer, self.PAGE + pos % self.size)[0]
        self.write(pos, struct.pack("<I", length & ~BUSY_BIT))

    @property
    def consumed(self) -> int:
        return self._U64.unpack_from(self.consumer, 0)[0]


def _cpu() -> int:
    return time.thread_time_ns()


def _time_passes(rec: Recording, recs: list[bytes], passes: int, encode: bool,
                 warm: int | None = None) -> dict[str, int]:
    """Minimum stage times (ns) over `passes` timed passes over `recs`, after warm-up passes that
    bring the correlator's remembered identities to their steady-state size (max_resolved)."""
    table, correlator = _setup(rec)
    gc.set_threshold(*GC_THRESHOLDS)  # the running agent's
    dispatch = RecordDispatch(correlator, table)
    ring = MemoryRing(RING_SIZE)
    agg = MetricsAggregator()
    enc = WireEncoder(ResourceOverrides())
    cap = correlator.config.max_resolved
    per_pass = max(1, sum(1 for r in recs if records.record_type(r) == records.REC_EXCHANGE))
    if warm is None:
        warm = min(WARM_PASSES_MAX, -(-cap // per_pass) + 1)
    best: dict[str, int] = {}
    for i_pass in range(warm + passes):
        batches = _shifted(recs, i_pass)
        batches_l = [batches[i : i + POLL_BATCH] for i in range(0, len(batches), POLL_BATCH)]
        t_dispatch = t_metrics = 0
        kept_all: list[Span] = []
        for batch in batches_l:
            for r in batch:
                ring.put(r)
            spans: list[Span] = []
            facts: list[Any] = []
            tcp: list[Any] = []
            polled: list[Any] = []
            t0 = _cpu()
            ring.reader.drain_decoded(polled, POLL_BATCH)  # as tracer/agent.py's _poll and _dispatch
            dispatch.feed_decoded(polled, spans, facts, tcp)
            t1 = _cpu()
            procs = table.snapshot({s.pid for s in spans} | {s.peer_pid for s in spans if s.peer_pid}
                                   | {f.pid for f in facts} | {f.peer_pid for f in facts if f.peer_pid})
            agg.record_spans(spans, procs)
            agg.record_red(facts, procs)
            t2 = _cpu()
            t_dispatch += t1 - t0
            t_metrics += t2 - t1
            kept_all.extend(s for s in spans if s.sampled)
        t_encode = 0
        if encode:
            t0 = _cpu()
            procs = table.snapshot({s.pid for s in kept_all})
            for i in range(0, len(kept_all), EXPORT_BATCH):
                enc.encode(kept_all[i : i + EXPORT_BATCH], procs)
            t_encode = _cpu() - t0
        if i_pass < warm:
            continue
        for k, v in (("dispatch", t_dispatch), ("metrics", t_metrics), ("encode", t_encode), ("spans", len(kept_all))):
            best[k] = min(best.get(k, v), v)
    return best


def measure(rec: Recording, passes: int, warm: int | None = None) -> dict[str, Any]:
    """warm: untimed passes first (None: enough to fill the correlator's remembered identities)."""
    best = _time_passes(rec, rec.records, passes, encode=True, warm=warm)
    spans_out = best.pop("spans")
    n = rec.exchanges + rec.metrics
    out: dict[str, Any] = {
        "exchanges": rec.exchanges, "metric_records": rec.metrics, "spans_exported": spans_out,
        "us_per_exchange": {k: v / 1e3 / n for k, v in best.items()},
    }
    out["us_per_exchange"]["total"] = sum(best.values()) / 1e3 / n
    # Metric records alone: decode + correlator + metrics, without the full exchanges.
    metric_only = [r for r in rec.records if records.record_type(r) == records.REC_METRIC]
    if metric_only:
        m = _time_passes(rec, metric_only, passes, encode=False, warm=warm)
        out["us_per_unsampled"] = (m["dispatch"] + m["metrics"]) / 1e3 / len(metric_only)
    return out


def run(paths: dict[str, str], passes: int) -> dict[str, Any]:
    return {name: measure(load(p), passes) for name, p in paths.items()}


def render(results: dict[str, Any]) -> str:
    return "\n".join(report.hotpath_lines(results, markdown=False))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    p.add_argument("--recording", action="append", default=[], help="a kspan recording (.kspan or .kspan.gz)")
    p.add_argument("--passes", type=int, default=DEFAULT_PASSES,
                   help="timed passes per recording (the minimum is reported)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    paths = {os.path.basename(r): r for r in args.recording} or RECORDINGS
    results = run(paths, max(1, args.passes))
    print(json.dumps(results, indent=1) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
