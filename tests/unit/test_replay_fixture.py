"""A stream recorded from the real kernel (`kspan record`) replayed through the correlator.

tests/fixtures/python_chain.kspan: a client calling svc_a -> svc_b -> svc_c twice (the second time
with ?token=abc&q=1), then svc_a's /status/503, recorded with --port filters on a 2-core machine.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode
from tracer import records
from tracer.recording import read_recording

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "python_chain.kspan"


def _replay() -> tuple[list[Span], dict[int, ProcessInfo]]:
    with open(FIXTURE, "rb") as f:
        meta, frames = read_recording(f)
        corr = Correlator(WallClock(meta.clock_offset_ns), CorrelatorConfig(id_salt=bytes.fromhex(meta.id_salt)))
        spans: list[Span] = []
        procs: dict[int, ProcessInfo] = {}
        for kind, payload in frames:
            if kind == "process":
                assert isinstance(payload, ProcessInfo)
                procs[payload.pid] = payload
            elif isinstance(payload, bytes) and records.record_type(payload) == records.REC_EXCHANGE:
                spans.extend(corr.feed(records.decode_exchange(payload)))
        spans.extend(corr.flush())
    assert corr.stats.as_dict()["orphaned_spans"] == 0
    return spans, procs


def test_recorded_chain_replays_to_whole_traces() -> None:
    spans, procs = _replay()
    traces: dict[bytes, list[Span]] = defaultdict(list)
    for s in spans:
        traces[s.trace_id].append(s)
    assert sorted(len(t) for t in traces.values()) == [2, 6, 6]
    for trace in traces.values():
        by_id = {s.span_id: s for s in trace}
        roots = [s for s in trace if s.parent_span_id is None]
        assert len(roots) == 1 and roots[0].kind == SpanKind.CLIENT
        for s in trace:
            if s.parent_span_id is not None:
                parent = by_id[s.parent_span_id]
                assert parent.start_ns <= s.start_ns <= s.end_ns <= parent.end_ns
                # A server span's parent is a client span in another process; a client span's
                # parent is the server span of its own process.
                if s.kind == SpanKind.SERVER:
                    assert parent.kind == SpanKind.CLIENT and parent.pid != s.pid
                else:
                    assert parent.kind == SpanKind.SERVER and parent.pid == s.pid
        if len(trace) == 6:
            servers = sorted((s.start_ns, procs[s.pid].service_name) for s in trace if s.kind == SpanKind.SERVER)
            assert [name for _, name in servers] == ["svc_a", "svc_b", "svc_c"]


def test_recorded_chain_attributes_status_and_secrets() -> None:
    spans, _ = _replay()
    a_servers = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes["server.port"] == 9301]
    assert len(a_servers) == 3
    queries = sorted(str(s.attributes.get("url.query", "")) for s in a_servers)
    assert queries == ["", "", "token=REDACTED&q=1"]
    assert not any("abc" in str(v) for s in spans for v in s.attributes.values())
    failed = [s for s in spans if s.attributes.get("http.response.status_code") == 503]
    assert len(failed) == 2 and all(s.status == StatusCode.ERROR for s in failed)
    assert all(s.name == ("GET " + str(s.attributes["http.route"]) if s.kind == SpanKind.SERVER else "GET")
               for s in spans)
    assert {s.attributes["http.route"] for s in a_servers} == {"/chain", "/status/{id}"}


def test_replay_is_deterministic() -> None:
    first, _ = _replay()
    second, _ = _replay()
    assert [(s.trace_id, s.span_id, s.parent_span_id, s.start_ns, s.end_ns) for s in first] == [
        (s.trace_id, s.span_id, s.parent_span_id, s.start_ns, s.end_ns) for s in second
    ]
