"""exporters/_metrics.c: its stream types, and its record loops on records of other shapes and bad input."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import pytest

from correlator.red import RedFacts
from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode
from exporters import _metrics
from exporters.metrics import DURATION_BUCKETS, MetricsAggregator, MetricsRecorder

PROCS = {10: ProcessInfo(10, "front", "front", "front"), 20: ProcessInfo(20, "back", "back", "back")}
ATTRS = (("http.request.method", "GET"), ("http.response.status_code", 200))


def test_hist_buckets_are_upper_inclusive_and_fold_as_they_come() -> None:
    h = _metrics.Hist((0.1, 0.5, 1.0), 7)
    assert (h.n, h.total, h.counts, h.start_ns) == (0, 0.0, [0, 0, 0, 0], 7)
    assert h.lo == math.inf and h.hi == -math.inf
    for v in (0.1, 0.05, 0.5, 0.7, 1.0, 3.0, -1.0):
        h.add(v)
    # (-inf, 0.1]: 0.1, 0.05, -1.0; (0.1, 0.5]: 0.5; (0.5, 1.0]: 0.7, 1.0; (1.0, inf): 3.0
    assert h.counts == [3, 1, 2, 1]
    assert h.n == 7 and h.lo == -1.0 and h.hi == 3.0
    assert h.total == ((((((0.1 + 0.05) + 0.5) + 0.7) + 1.0) + 3.0) + -1.0)  # arrival order
    assert h.bounds == (0.1, 0.5, 1.0)
    h.counts.append(9)  # a copy: the stream is not changed through it
    assert h.counts == [3, 1, 2, 1]


def test_hist_rejects_what_it_cannot_fold() -> None:
    with pytest.raises(TypeError):
        _metrics.Hist([0.1], 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _metrics.Hist((0.5, 0.1), 0)
    with pytest.raises(TypeError):
        _metrics.Hist((0.1,), 0).add("slow")  # type: ignore[arg-type]


def test_counter_series_and_edge() -> None:
    c = _metrics.Counter(5)
    c.value += 3
    assert (c.value, c.start_ns) == (3, 5)
    e = _metrics.Series(None, ATTRS, None)
    assert (e.metric, e.attrs, e.hist, e.endpoint, e.local, e.peer, e.database, e.port) == (
        None, ATTRS, None, None, False, "unknown_service", None, 0)
    e.endpoint, e.local, e.port = ("10.0.0.1", 80), True, 8080
    assert (e.endpoint, e.local, e.port) == (("10.0.0.1", 80), True, 8080)
    h = _metrics.Hist(DURATION_BUCKETS, 0)
    g = _metrics.Edge(c, _metrics.Counter(5), h, None)
    assert g.total is c and g.server is h and g.client is None
    with pytest.raises(TypeError):
        _metrics.Edge(c, c, 1.0, None)  # type: ignore[arg-type]


def _facts() -> list[RedFacts]:
    # A traced client (pid 10) calling a traced server (pid 20), then a root server request.
    return [
        RedFacts(10, False, ATTRS, 0.02, False, b"c" * 8, b"", 0, True, "back", 40000),
        RedFacts(20, True, ATTRS, 0.01, False, b"s" * 8, b"c" * 8, 10, True, "127.0.0.1", 8080),
        RedFacts(20, True, ATTRS, 0.3, True, b"t" * 8, b"", 0, False, "10.0.0.9", 8080),
    ]


def _summary(agg: MetricsAggregator) -> dict[tuple[str, tuple[Any, ...]], Any]:
    out: dict[tuple[str, tuple[Any, ...]], Any] = {}
    for rm in agg.collect().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    key = (m.name, tuple(sorted(p.attributes.items())))
                    out[key] = (p.count, p.sum, list(p.bucket_counts)) if hasattr(p, "count") else p.value
    return out


def test_facts_give_hand_computed_red_and_edges() -> None:
    agg = MetricsAggregator()
    agg.record_red(_facts(), PROCS)
    got = _summary(agg)
    attrs = tuple(sorted(ATTRS))
    assert got[("http.client.request.duration", attrs)] == (1, 0.02, [0, 0, 1] + [0] * 12)
    assert got[("http.server.request.duration", attrs)] == (2, 0.01 + 0.3, [0, 1, 0, 0, 0, 0, 0, 1] + [0] * 7)
    paired = (("client", "front"), ("connection_type", ""), ("server", "back"))
    user = (("client", "user"), ("connection_type", "virtual_node"), ("server", "back"))
    assert got[("traces_service_graph_request_total", paired)] == 1
    assert got[("traces_service_graph_request_failed_total", paired)] == 0
    assert got[("traces_service_graph_request_server_seconds", paired)] == (1, 0.01, [0, 1] + [0] * 13)
    assert got[("traces_service_graph_request_client_seconds", paired)] == (1, 0.02, [0, 0, 1] + [0] * 12)
    assert got[("traces_service_graph_request_total", user)] == 1
    assert got[("traces_service_graph_request_failed_total", user)] == 1


class _ReorderedFacts(NamedTuple):  # RedFacts' fields, in another order
    peer: str
    local_port: int
    pid: int
    seconds: float
    server: bool
    attrs: tuple[tuple[str, Any], ...]
    failed: bool
    span_id: bytes
    parent_span_id: bytes
    peer_pid: int
    local_peer: bool


@dataclasses.dataclass(slots=True)
class _SlotFacts:
    pid: int
    server: bool
    attrs: tuple[tuple[str, Any], ...]
    seconds: float
    failed: bool
    span_id: bytes
    parent_span_id: bytes
    peer_pid: int
    local_peer: bool
    peer: str
    local_port: int


class _PlainFacts:  # neither slots nor a tuple: read by getattr
    def __init__(self, f: RedFacts) -> None:
        self.__dict__.update(f._asdict())


@pytest.mark.parametrize("shape", ["reordered", "slots", "plain", "mixed"])
def test_facts_are_read_by_field_name_whatever_their_class(shape: str) -> None:
    want = MetricsAggregator()
    want.record_red(_facts(), PROCS)
    conv: dict[str, Any] = {
        "reordered": lambda f: _ReorderedFacts(**f._asdict()),
        "slots": lambda f: _SlotFacts(*f),
        "plain": _PlainFacts,
    }
    if shape == "mixed":  # the layout is resolved again when the class changes mid-batch
        facts: list[Any] = [conv["slots"](_facts()[0]), _facts()[1], conv["reordered"](_facts()[2])]
    else:
        facts = [conv[shape](f) for f in _facts()]
    got = MetricsAggregator()
    got.record_red(facts, PROCS)
    assert _summary(got) == _summary(want)


def _span(**kw: Any) -> Span:
    base: dict[str, Any] = dict(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=None, name="GET",
                                kind=SpanKind.SERVER, start_ns=1_000, end_ns=1_000 + 250_000_000, pid=20,
                                attributes={"http.request.method": "GET", "http.response.status_code": 200})
    base.update(kw)
    return Span(**base)


def test_span_durations_as_python_divides_them() -> None:
    agg = MetricsAggregator()
    spans = [_span(end_ns=1_000 + 5_000_000), _span(end_ns=1_000), _span(end_ns=0),
             _span(start_ns=2**70, end_ns=2**70 + 10_000_000_000)]  # past int64: Python's own arithmetic
    agg.record_spans(spans, PROCS)
    attrs = tuple(sorted(ATTRS))
    count, total, buckets = _summary(agg)[("http.server.request.duration", attrs)]
    assert count == 4 and total == 0.005 + 0.0 + 0.0 + 10.0
    assert buckets == [3] + [0] * 12 + [1, 0]  # 0.005, 0, 0 (a negative duration is 0); 10 s


def test_bad_records_raise_and_the_recorder_counts_them() -> None:
    agg = MetricsAggregator()
    with pytest.raises(TypeError):
        agg.record_spans([_span(attributes=[("http.request.method", "GET")])], PROCS)
    with pytest.raises(AttributeError):
        agg.record_red([object()], PROCS)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        agg.record_red([RedFacts(20, True, ATTRS, "slow", False, b"", b"", 0, False, "", 0)], PROCS)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        agg.record_red(_facts()[0], PROCS)  # type: ignore[arg-type]  # one fact, not a sequence of them
    rec = MetricsRecorder.__new__(MetricsRecorder)
    rec.aggregator, rec._recording, rec.record_errors = agg, True, 0
    rec.record_spans([_span(status=StatusCode.ERROR, attributes=None)], PROCS)  # type: ignore[arg-type]
    assert rec.record_errors == 1
    # What was recorded before the bad record stays, and the aggregator goes on working.
    agg.record_red(_facts(), PROCS)
    assert _summary(agg)[("http.client.request.duration", tuple(sorted(ATTRS)))][0] == 1
