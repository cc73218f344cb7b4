"""Golden snapshot of MetricsAggregator's output on the bench's recorded load (bench/data/hotpath-*):
every collected metric's name, resource, attribute sets, counts, sums, bucket counts, min and max,
in export order, against tests/unit/data/metrics-golden.json.gz (computed by the aggregator before
its hot path was reworked, so rewrites of record_spans/record_red must keep the output bit for bit).

The input is the correlator's spans and RedFacts for those records, so a deliberate change to what
the correlator emits changes the expected metrics too: after checking the diff is the intended one,
regenerate with `PYTHONPATH=. python -m tests.unit.test_metrics_golden`.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from dataclasses import replace
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import Histogram, MetricsData

import exporters.metrics as metrics
from bench import hotpath
from correlator.red import RedFacts
from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode
from exporters.metrics import DB_BUCKETS, DURATION_BUCKETS, MetricsAggregator
from exporters.otlp_proto import ResourceOverrides
from tracer.agent import RecordDispatch

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "metrics-golden.json.gz")
PASSES = 2  # the second pass's shifted connection ids are new exchanges into warm aggregator state
# Variants: default limits; tight ones, so pair expiry (by age and by max_pending) and the
# cardinality overflow stream are exercised too; and both again with the recorded spans and facts
# varied (the recorded load is one route of one service pair: a handful of series).
_DEFAULT = {"pair_timeout_s": 10.0, "max_pending": 10000, "cardinality": metrics.CARDINALITY_LIMIT,
            "memo": metrics._MEMO_SIZE, "services": metrics._SERVICE_CACHE_SIZE}
# Tiny caches too: memos and the pid cache start over every few spans.
_TIGHT = {"pair_timeout_s": 1.0, "max_pending": 40, "cardinality": 6, "memo": 3, "services": 2}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {**_DEFAULT, "mutate": False},
    "tight": {**_TIGHT, "mutate": False},
    "varied": {**_DEFAULT, "mutate": True},
    "varied-tight": {**_TIGHT, "mutate": True},
    # A configured service name: a pid without process info is then named by it only while the
    # pid cache still holds the pid, else unknown_service (what the tiny pid cache exercises).
    "varied-tight-named": {**_TIGHT, "cardinality": metrics.CARDINALITY_LIMIT, "mutate": True, "service_name": "shop"},
}


class _Clock:
    """The aggregator's time source, stepped per poll batch: pair expiry must not depend on how fast
    the machine runs the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def time_ns(self) -> int:
        return int(self.t * 1e9)


_UNKNOWN_PID = 424242  # in no processes map
_SYNTHETIC = {1001: "svc-a", 1002: "svc-a", 1003: "svc-b", 1004: ""}  # 1002: a second process of svc-a
# Durations on bucket bounds (upper-inclusive buckets), zero, negative, and past the last bound.
_BOUND_NS = [round(b * 1e9) for b in (*DURATION_BUCKETS, *DB_BUCKETS)] + [0, -5, 12_000_000_000]
_ATTR_CHOICES: dict[str, list[Any]] = {
    "http.request.method": ["GET", "POST", "BREW", "get", None],
    "http.response.status_code": [200, 201, 404, 429, 500, 503, None],
    "error.type": ["timeout", None],
    "http.route": ["/a/{id}", "", None],
    "server.address": ["api", "10.1.2.3", None],
    "server.port": [80, 8080, None],
    "network.peer.address": ["10.0.0.9", "::1", "127.0.0.2", None],
    "network.peer.port": [5432, 0, None],
    "client.address": ["10.9.9.9", None],
    "url.scheme": ["https", None],
    "network.protocol.version": ["2", None],
}
_DB = [{"db.system.name": "postgresql", "db.namespace": "shop", "db.operation.name": "SELECT",
        "server.address": "db", "server.port": 5432},
       {"db.system.name": "redis", "db.operation.name": "GET", "error.type": "ERR"}]
_RPC = [{"rpc.system": "grpc", "rpc.service": "Shop", "rpc.method": "Buy", "rpc.grpc.status_code": 0},
        {"rpc.system": "grpc", "rpc.service": "Shop", "rpc.method": "Buy", "rpc.grpc.status_code": 14,
         "error.type": "14"}]
_RED_ATTRS = [(("http.request.method", "GET"), ("http.response.status_code", 500), ("error.type", "500")),
              (("http.request.method", "_OTHER"), ("url.scheme", "http")), ()]


def _vary_span(r: random.Random, s: Span) -> Span:
    a = dict(s.attributes)
    for k in r.sample(sorted(_ATTR_CHOICES), r.randint(1, 3)):
        v = r.choice(_ATTR_CHOICES[k])
        if v is None:
            a.pop(k, None)
        else:
            a[k] = v
    x = r.random()
    if x < 0.08:
        a.update(r.choice(_DB))
    elif x < 0.14:
        a.update(r.choice(_RPC))
    changes: dict[str, Any] = {"attributes": a}
    if r.random() < 0.2:
        changes["status"] = StatusCode.ERROR
    if r.random() < 0.2:
        changes["pid"] = r.choice([*_SYNTHETIC, _UNKNOWN_PID])
    if r.random() < 0.2:
        changes["peer_pid"] = r.choice([0, _UNKNOWN_PID, 1003])
    if r.random() < 0.1:
        changes["parent_span_id"] = None
    if r.random() < 0.03:
        changes["kind"] = SpanKind.CLIENT if s.kind == SpanKind.SERVER else SpanKind.SERVER
    if r.random() < 0.3:
        changes["end_ns"] = s.start_ns + r.choice(_BOUND_NS)
    return replace(s, **changes)


def _vary_facts(r: random.Random, f: RedFacts) -> RedFacts:
    changes: dict[str, Any] = {}
    if r.random() < 0.3:
        changes["attrs"] = r.choice(_RED_ATTRS)
    if r.random() < 0.3:
        changes["seconds"] = r.choice(_BOUND_NS) / 1e9
    if r.random() < 0.2:
        changes["failed"] = not f.failed
    if r.random() < 0.1:
        changes["span_id"] = b""
    if r.random() < 0.1:
        changes["parent_span_id"] = b""
    if r.random() < 0.2:
        changes["peer_pid"] = r.choice([0, _UNKNOWN_PID, 1003])
    if r.random() < 0.1:
        changes["local_peer"] = not f.local_peer
    if r.random() < 0.1:
        changes["peer"] = r.choice(["10.0.0.7", "user", ""])
    if r.random() < 0.1:
        changes["local_port"] = r.choice([0, 9999])
    if r.random() < 0.2:
        changes["pid"] = r.choice([*_SYNTHETIC, _UNKNOWN_PID])
    return f._replace(**changes)


def _vary_batch(r: random.Random, spans: list[Span], facts: list[RedFacts],
                procs: dict[int, ProcessInfo]) -> tuple[list[Span], list[RedFacts], dict[int, ProcessInfo]]:
    spans = [_vary_span(r, s) if r.random() < 0.35 else s for s in spans]
    facts = [_vary_facts(r, f) if r.random() < 0.35 else f for f in facts]
    if r.random() < 0.3:  # servers' halves before their clients' (and the other way round)
        spans.reverse()
        facts.reverse()
    procs = dict(procs)
    for pid, service in _SYNTHETIC.items():
        procs[pid] = ProcessInfo(pid, service, f"exe{pid}", f"exe{pid} --serve", {"host.name": "h"})
    if r.random() < 0.3:  # a process whose info is not in this batch's snapshot
        procs.pop(r.choice(sorted(procs)))
    return spans, facts, procs


# This host's name and kspan's version are not the aggregator's doing: left out of the snapshot.
_VOLATILE = frozenset({"host.name", "service.version", "telemetry.sdk.version"})


def _resource(attrs: Any) -> list[Any]:
    return sorted((k, v) for k, v in attrs.items() if k not in _VOLATILE)


def _points(data: MetricsData) -> list[Any]:
    out: list[Any] = []
    for rm in data.resource_metrics:
        metrics_out = []
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if isinstance(m.data, Histogram):
                    pts: list[Any] = [[sorted(p.attributes.items()), p.count, p.sum, list(p.bucket_counts),
                                       p.min, p.max] for p in m.data.data_points]
                else:
                    pts = [[sorted(p.attributes.items()), p.value] for p in m.data.data_points]
                metrics_out.append({"name": m.name, "unit": m.unit, "points": pts})
        out.append({"resource": _resource(rm.resource.attributes), "metrics": metrics_out})
    return out


def snapshot(recording: str, variant: str) -> dict[str, Any]:
    v = VARIANTS[variant]
    rec = hotpath.load(hotpath.RECORDINGS[recording])
    table, correlator = hotpath._setup(rec)
    dispatch = RecordDispatch(correlator, table)
    clock = _Clock()
    rng = random.Random(f"{recording}/{variant}")
    saved = metrics.time, metrics.CARDINALITY_LIMIT, metrics._MEMO_SIZE, metrics._SERVICE_CACHE_SIZE
    metrics.time = clock  # type: ignore[assignment]
    metrics.CARDINALITY_LIMIT, metrics._MEMO_SIZE, metrics._SERVICE_CACHE_SIZE = (
        v["cardinality"], v["memo"], v["services"])
    try:
        agg = MetricsAggregator(ResourceOverrides(service_name=v.get("service_name")),
                                pair_timeout_s=v["pair_timeout_s"], max_pending=v["max_pending"])
        for n in range(PASSES):
            recs = hotpath._shifted(rec.records, n)
            for i in range(0, len(recs), hotpath.POLL_BATCH):
                spans, facts, tcp = dispatch.feed(recs[i : i + hotpath.POLL_BATCH])
                procs = table.snapshot({s.pid for s in spans} | {s.peer_pid for s in spans if s.peer_pid}
                                       | {f.pid for f in facts} | {f.peer_pid for f in facts if f.peer_pid}
                                       | {e.pid for e in tcp})
                if v["mutate"]:
                    spans, facts, procs = _vary_batch(rng, spans, facts, procs)
                agg.record_spans(spans, procs)
                agg.record_red(facts, procs)
                agg.record_tcp(tcp, procs)
                clock.t += 0.4
        before_expiry = _points(agg.collect())
        clock.t += 3600.0
        agg.record_spans([], {})  # the sweep: every half still waiting counts
        # Expiry adds service-graph edges only, which are kspan's own resource's.
        agent = _resource(dict(agg.agent_resource_attributes))
        after = [r for r in _points(agg.collect()) if r["resource"] == agent]
        return {"points": before_expiry, "after_expiry": after,
                "overflowed": agg.overflowed, "unpaired_edges": agg.unpaired_edges}
    finally:
        metrics.time, metrics.CARDINALITY_LIMIT, metrics._MEMO_SIZE, metrics._SERVICE_CACHE_SIZE = saved  # type: ignore[assignment]


def _canonical(x: Any) -> Any:
    # JSON has no tuples: compare in JSON's own shapes.
    return json.loads(json.dumps(x))


def _all() -> dict[str, Any]:
    return {f"{r}/{v}": snapshot(r, v) for r in hotpath.RECORDINGS for v in VARIANTS}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    with gzip.open(GOLDEN, "rt") as f:
        return json.load(f)  # type: ignore[no-any-return]


@pytest.mark.parametrize("recording", sorted(hotpath.RECORDINGS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_recorded_load_gives_the_golden_metrics(golden: dict[str, Any], recording: str, variant: str) -> None:
    got = _canonical(snapshot(recording, variant))
    want = golden[f"{recording}/{variant}"]
    for k in ("overflowed", "unpaired_edges"):
        assert got[k] == want[k], k
    for k in ("points", "after_expiry"):
        assert len(got[k]) == len(want[k]), k
        for g, w in zip(got[k], want[k], strict=True):
            assert g["resource"] == w["resource"]
            assert [m["name"] for m in g["metrics"]] == [m["name"] for m in w["metrics"]]
            for gm, wm in zip(g["metrics"], w["metrics"], strict=True):
                assert gm == wm, gm["name"]


def test_the_golden_input_exercises_every_path(golden: dict[str, Any]) -> None:
    # A snapshot that never overflowed or never expired a half would not guard those paths.
    tight = [golden[f"{r}/varied-tight"] for r in hotpath.RECORDINGS]
    assert all(t["overflowed"] > 0 for t in tight)
    assert all(t["unpaired_edges"] > 0 for t in tight)
    names = {m["name"] for s in golden.values() for r in s["points"] for m in r["metrics"]}
    assert {"http.server.request.duration", "http.client.request.duration", "traces_service_graph_request_total",
            "traces_service_graph_request_failed_total", "traces_service_graph_request_server_seconds",
            "traces_service_graph_request_client_seconds"} <= names


if __name__ == "__main__":
    with gzip.GzipFile(GOLDEN, "wb", mtime=0) as gz:  # mtime 0: the same snapshot gives the same bytes
        gz.write(json.dumps(_canonical(_all()), separators=(",", ":")).encode() + b"\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
