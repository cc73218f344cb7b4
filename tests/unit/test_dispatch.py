"""tracer/agent.py's RecordDispatch: a poll's records through the correlator in runs, exactly as one
call per record would go (Correlator.feed / metric / segment in stream order)."""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any

import pytest

from bench import hotpath
from correlator.clock import WallClock
from correlator.correlator import Correlator
from correlator.segments import PROTO_REDIS
from correlator.spans import Span
from tracer import records
from tracer.agent import Agent, RecordDispatch, RunOptions, _Session
from tracer.processes import ProcessTable
from tracer.records import RawExchange, RawSegment

FIXTURES = {
    "python_chain_ids": "tests/fixtures/python_chain_ids.kspan",
    "python_chain": "tests/fixtures/python_chain.kspan",
    "ratio10": hotpath.RECORDINGS["ratio10"],
    "sampled": hotpath.RECORDINGS["sampled"],
}


def _segment(conn_id: int, seq: int, egress: bool, data: bytes, ts: int) -> bytes:
    """A Redis client transfer as bpf/ sends it (struct kspan_segment, then its bytes)."""
    h = RawSegment(type=records.REC_SEGMENT, pid=4242, tid=4242, dir=1 if egress else 0, proto=PROTO_REDIS,
                   role=1, parent_kind=1 if egress else 0, flags=records.FLAG_TUPLE_KNOWN | records.FLAG_SAMPLED,
                   family=2, local_port=40000, remote_port=6379, data_len=len(data),
                   seg_flags=records.SEG_START if seq == 0 else 0, conn_id=conn_id, start_ns=ts, end_ns=ts + 10,
                   len=len(data), seq=seq)
    h.local_addr[:4] = h.remote_addr[:4] = [127, 0, 0, 1]
    if egress:
        h.trace_id[:] = list(range(1, 17))
        h.parent_span_id = 0x1122334455667788
    return bytes(h) + data


def _mixed(recs: list[bytes]) -> list[bytes]:
    """The recording with Redis operations (each a span from two segments), undecodable records of
    every kind and a repeated exchange spread through it: every record kind between exchanges."""
    out: list[bytes] = []
    redis = 0
    for i, r in enumerate(recs):
        out.append(r)
        if i % 7 == 3:
            ts = 10_000 + i
            out.append(_segment(0x5000 + redis, 0, True, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", ts))
            out.append(_segment(0x5000 + redis, 1, False, b"$-1\r\n", ts + 100))
            redis += 1
        if i % 11 == 5:
            kind = (records.REC_EXCHANGE, records.REC_METRIC, records.REC_SEGMENT, records.REC_TCP)[i % 4]
            out.append(kind.to_bytes(4, "little") + b"\0" * 20)  # short: counted, skipped
        if i % 13 == 2 and records.record_type(r) == records.REC_EXCHANGE:
            out.append(r)  # the kernel never repeats one, a damaged recording may: the correlator drops it
    assert redis > 5
    return out


def _reference(correlator: Correlator, processes: ProcessTable,
               recs: list[bytes]) -> tuple[list[Span], list[Any], list[Any], int]:
    """One correlator call per record, in stream order."""
    spans: list[Span] = []
    facts: list[Any] = []
    tcp: list[Any] = []
    bad = 0
    for data in recs:
        kind = records.record_type(data)
        try:
            if kind == records.REC_EXCHANGE:
                ex = records.decode_exchange(data)
                processes.get(ex.pid)
                spans.extend(correlator.feed(ex))
            elif kind == records.REC_METRIC:
                mx = records.decode_metric(data)
                processes.get(mx.pid)
                f = correlator.metric(mx)
                if f is not None:
                    facts.append(f)
            elif kind == records.REC_SEGMENT:
                seg = records.decode_segment(data)
                processes.get(seg.seg.pid)
                spans.extend(correlator.segment(seg))
            elif kind == records.REC_TCP:
                tcp.append(records.decode_tcp(data))
        except ValueError:
            bad += 1
    return spans, facts, tcp, bad


def _setup(path: str, **cfg: Any) -> tuple[ProcessTable, Correlator, list[bytes]]:
    """bench/hotpath.py's correlator for the recording (the agent's configuration), with `cfg`."""
    rec = hotpath.load(path)
    table, correlator = hotpath._setup(rec)
    if cfg:
        config = dataclasses.replace(correlator.config, **cfg)
        correlator = Correlator(WallClock(rec.meta.clock_offset_ns), config)
    return table, correlator, rec.records


def _state(correlator: Correlator) -> dict[str, Any]:
    return {"stats": correlator.stats.as_dict(), "protocols": dict(correlator.protocols.counters),
            "flushed": [dataclasses.astuple(s) for s in correlator.flush()]}


def _dispatched(path: str, recs: list[bytes], batch: int, **cfg: Any) -> tuple[Any, ...]:
    table, correlator, _ = _setup(path, **cfg)
    dispatch = RecordDispatch(correlator, table)
    spans: list[Span] = []
    facts: list[Any] = []
    tcp: list[Any] = []
    for i in range(0, len(recs), batch):
        dispatch.feed_into(recs[i : i + batch], spans, facts, tcp)
    return [dataclasses.astuple(s) for s in spans], facts, tcp, dispatch.undecodable, _state(correlator)


def _fed_one_by_one(path: str, recs: list[bytes], **cfg: Any) -> tuple[Any, ...]:
    table, correlator, _ = _setup(path, **cfg)
    spans, facts, tcp, bad = _reference(correlator, table, recs)
    return [dataclasses.astuple(s) for s in spans], facts, tcp, bad, _state(correlator)


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("batch", [1, 5, hotpath.POLL_BATCH])
def test_a_mixed_stream_gives_what_one_call_per_record_gives(name: str, batch: int) -> None:
    path = FIXTURES[name]
    recs = _mixed(hotpath.load(path).records)
    got = _dispatched(path, recs, batch)
    want = _fed_one_by_one(path, recs)
    assert got[0] == want[0]
    assert got[1:] == want[1:]
    spans, facts, tcp, bad, state = got
    assert bad > 0 and state["stats"]["exchanges"] > 0 and tcp
    assert any(s[3].startswith("GET") and dict(s[8]).get("db.system.name") == "redis" for s in spans)
    assert facts or name in ("sampled", "python_chain")


def _head_renamed(raw: bytes, old: bytes, new: bytes) -> bytes:
    at = RawExchange.req_head.offset
    assert len(old) == len(new) and raw[at : at + len(old)] == old
    return raw[:at] + new + raw[at + len(old) :]


def test_metric_records_keep_their_place_among_the_exchanges() -> None:
    """The route cap is shared by the span path and metric records: which route is admitted first
    depends on the stream order, so the dispatch must not feed a run of exchanges past a metric
    record. The stream is made so that order shows: metric records and exchanges name different
    routes and the cap admits one."""
    path = FIXTURES["python_chain_ids"]
    at = RawExchange.req_head.offset

    def renamed(r: bytes) -> bytes:
        kind = records.record_type(r)
        if kind not in (records.REC_EXCHANGE, records.REC_METRIC) or not r[at:].startswith(b"GET /chain"):
            return r
        return _head_renamed(r, b"GET /chain", b"GET /metrc" if kind == records.REC_METRIC else b"GET /exchg")

    stream = [renamed(r) for r in hotpath.load(path).records]
    cfg = {"max_routes": 1, "routes": []}
    got = _dispatched(path, stream, hotpath.POLL_BATCH, **cfg)
    assert got == _fed_one_by_one(path, stream, **cfg)
    is_metric = [records.record_type(r) == records.REC_METRIC for r in stream]
    metrics = [r for r, m in zip(stream, is_metric, strict=True) if m]
    others = [r for r, m in zip(stream, is_metric, strict=True) if not m]
    metrics_first, exchanges_first = metrics + others, others + metrics
    a, b = _fed_one_by_one(path, metrics_first, **cfg), _fed_one_by_one(path, exchanges_first, **cfg)
    assert sorted(map(repr, a[1])) != sorted(map(repr, b[1]))  # the order decides which route is admitted
    assert _dispatched(path, metrics_first, hotpath.POLL_BATCH, **cfg) == a
    assert _dispatched(path, exchanges_first, hotpath.POLL_BATCH, **cfg) == b


def test_an_undecodable_record_is_counted_and_the_run_goes_on() -> None:
    path = FIXTURES["python_chain_ids"]
    recs = [r for r in hotpath.load(path).records if records.record_type(r) == records.REC_EXCHANGE]
    short = recs[0][: ctypes.sizeof(RawExchange) - 1]
    table, correlator, _ = _setup(path)
    dispatch = RecordDispatch(correlator, table)
    spans, _, _ = dispatch.feed([recs[0], short, *recs[1:]])
    assert dispatch.undecodable == 1
    assert correlator.stats.exchanges == len(recs) and spans


class _Hooks:
    """An attacher's exec/exit hooks, noting how many exchanges the correlator had at each call."""

    def __init__(self, correlator: Correlator) -> None:
        self.correlator = correlator
        self.calls: list[tuple[str, int, int]] = []

    def on_exec(self, pid: int) -> None:
        self.calls.append(("exec", pid, self.correlator.stats.exchanges))

    def on_exit(self, pid: int) -> None:
        self.calls.append(("exit", pid, self.correlator.stats.exchanges))


class _Traced:
    """The capture's trace filter (the live one is the kernel's map): every process."""

    def is_traced(self, pid: int) -> bool:
        return True


def _proc(pid: int, event: int) -> bytes:
    return bytes(records.RawProc(type=records.REC_PROC, pid=pid, event=event, ts_ns=1, comm=b"svc"))


def test_exchanges_before_a_proc_record_are_fed_before_its_hooks_run() -> None:
    path = FIXTURES["python_chain_ids"]
    table, correlator, recs = _setup(path)
    ex = [r for r in recs if records.record_type(r) == records.REC_EXCHANGE]
    dispatch = RecordDispatch(correlator, table)
    hooks = _Hooks(correlator)
    ses = _Session(_Traced(), table, correlator, None, None, [hooks], dispatch)
    polled: list[Any] = []
    dispatch.decode([ex[0], ex[1], _proc(77, records.PROC_EXEC), ex[2], _proc(77, records.PROC_EXIT),
                     _proc(78, 9)[:10], ex[3]], polled)
    Agent(RunOptions())._dispatch(polled, ses)
    assert hooks.calls == [("exec", 77, 2), ("exit", 77, 3)]
    assert correlator.stats.exchanges == 4 and dispatch.undecodable == 1  # the short proc record
