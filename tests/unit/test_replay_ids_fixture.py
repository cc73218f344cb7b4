"""A stream recorded from the real kernel with kernel-fixed ids and head sampling, replayed.

tests/fixtures/python_chain_ids.kspan (recording version 2): `kspan record --sampler traceidratio
--sampler-arg 0.5` while a client called svc_a -> svc_b -> svc_c twelve times (every fourth with
?token=abc&q=1), then svc_a's /status/503. The kernel kept 6 of the 13 traces: those came as full
records with ids, the other 7 as metric records (38 exchanges).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.linker import PARENT_SOURCE_ATTR
from correlator.red import RedFacts
from correlator.spans import ProcessInfo, Span, SpanKind
from exporters.metrics import MetricsAggregator
from tracer import records
from tracer.recording import read_recording

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "python_chain_ids.kspan"


def _replay() -> tuple[list[Span], list[RedFacts], dict[int, ProcessInfo], Correlator]:
    with open(FIXTURE, "rb") as f:
        meta, frames = read_recording(f)
        assert meta.version == 2 and meta.exchange_size == records.EXCHANGE_SIZE
        assert meta.sampler == "traceidratio 0.5"
        corr = Correlator(WallClock(meta.clock_offset_ns), CorrelatorConfig(id_salt=bytes.fromhex(meta.id_salt)))
        spans: list[Span] = []
        facts: list[RedFacts] = []
        procs: dict[int, ProcessInfo] = {}
        for kind, payload in frames:
            if kind == "process":
                assert isinstance(payload, ProcessInfo)
                procs[payload.pid] = payload
                continue
            assert isinstance(payload, bytes)
            t = records.record_type(payload)
            if t == records.REC_EXCHANGE:
                spans.extend(corr.feed(records.decode_exchange(payload)))
            elif t == records.REC_METRIC:
                fact = corr.metric(records.decode_metric(payload))
                assert fact is not None
                facts.append(fact)
        assert corr.flush() == []  # nothing was held
    return spans, facts, procs, corr


def test_kept_traces_are_whole_with_the_kernels_ids() -> None:
    spans, facts, procs, corr = _replay()
    st = corr.stats
    assert st.kernel_identified == 36 and st.held == 0 and st.peer_waiting == 0 and st.orphaned_spans == 0
    assert st.metric_records == 38 and len(facts) == 38
    traces: dict[bytes, list[Span]] = defaultdict(list)
    for s in spans:
        assert s.sampled
        traces[s.trace_id].append(s)
    assert sorted(len(t) for t in traces.values()) == [6] * 6
    for trace in traces.values():
        by_id = {s.span_id: s for s in trace}
        roots = [s for s in trace if s.parent_span_id is None]
        assert len(roots) == 1 and roots[0].kind == SpanKind.CLIENT
        assert roots[0].attributes[PARENT_SOURCE_ATTR] == "none"
        for s in trace:
            if s.parent_span_id is not None:
                parent = by_id[s.parent_span_id]
                assert parent.start_ns <= s.start_ns
                if s.kind == SpanKind.SERVER:
                    assert parent.kind == SpanKind.CLIENT and s.attributes[PARENT_SOURCE_ATTR] == "peer"
                    assert s.peer_pid == parent.pid
                else:
                    assert parent.pid == s.pid and s.attributes[PARENT_SOURCE_ATTR] == "thread"
                    # Its server end came first in the stream: the client span names that process.
                    (callee,) = [c for c in trace if c.parent_span_id == s.span_id]
                    assert s.peer_pid == callee.pid
        servers = sorted((s.start_ns, procs[s.pid].service_name) for s in trace if s.kind == SpanKind.SERVER)
        assert [n for _, n in servers] == ["svc_a", "svc_b", "svc_c"]
    assert not any("abc" in str(v) for s in spans for v in s.attributes.values())


def test_metrics_count_all_thirteen_requests() -> None:
    spans, facts, procs, _ = _replay()
    agg = MetricsAggregator()
    agg.record_spans(spans, procs)
    agg.record_red(facts, procs)
    served: Counter[tuple[str, int]] = Counter()
    edges: Counter[tuple[str, str]] = Counter()
    for rm in agg.collect().resource_metrics:
        svc = str(rm.resource.attributes.get("service.name"))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    if m.name == "http.server.request.duration":
                        served[(svc, int(p.attributes["http.response.status_code"]))] += p.count
                    elif m.name == "traces_service_graph_request_total":
                        edges[(str(p.attributes["client"]), str(p.attributes["server"]))] += p.value
    assert served == {("svc_a", 200): 12, ("svc_a", 503): 1, ("svc_b", 200): 12, ("svc_c", 200): 12}
    assert edges[("svc_a", "svc_b")] == 12 and edges[("svc_b", "svc_c")] == 12
    assert sum(v for (c, s), v in edges.items() if s == "svc_a") == 13


def test_replay_is_deterministic() -> None:
    first, ffacts, _, _ = _replay()
    second, sfacts, _, _ = _replay()
    key = [(s.trace_id, s.span_id, s.parent_span_id, s.start_ns, s.end_ns, s.attributes) for s in first]
    assert key == [(s.trace_id, s.span_id, s.parent_span_id, s.start_ns, s.end_ns, s.attributes) for s in second]
    assert ffacts == sfacts
