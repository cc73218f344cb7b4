"""Metrics: RED histograms, service graph, network and health metrics, exported to a real OTLP endpoint."""

from __future__ import annotations

import json
import logging
import time

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from correlator.records import TcpEvent, TcpEventKind
from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode
from exporters.config import load_config
from exporters.metrics import (
    CARDINALITY_LIMIT,
    DURATION_BUCKETS,
    MetricsAggregator,
    MetricsRecorder,
)
from exporters.otlp_proto import ResourceOverrides
from tests.support.otlp_receiver import OtlpReceiver, flatten_metrics, unused_port
from tests.support.sample_spans import T0, chain_trace, processes

BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]


def _points(agg: MetricsAggregator) -> list[dict]:
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    return flatten_metrics(encode_metrics(agg.collect()), "local")


def _one(points: list[dict], name: str, **attrs) -> dict:
    found = [p for p in points if p["name"] == name and all(p["attributes"].get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (name, attrs, [(p["name"], p["attributes"]) for p in points if p["name"] == name])
    return found[0]


def _span(kind: SpanKind, pid: int, seconds: float, attrs: dict, **kw) -> Span:
    return Span(trace_id=kw.pop("trace_id", b"\x01" * 16), span_id=kw.pop("span_id", b"\x02" * 8),
                parent_span_id=kw.pop("parent", None), name="GET", kind=kind, start_ns=T0,
                end_ns=T0 + int(seconds * 1e9), pid=pid, attributes=attrs, **kw)


def test_bucket_boundaries_are_the_semconv_ones() -> None:
    assert list(DURATION_BUCKETS) == BUCKETS


def test_red_histograms_have_low_cardinality_attributes_and_a_resource_per_service() -> None:
    agg = MetricsAggregator()
    agg.record_spans(chain_trace(), processes())
    pts = _points(agg)
    srv = _one(pts, "http.server.request.duration", **{"http.route": "/items"})
    assert srv["unit"] == "s" and srv["type"] == "histogram"
    assert srv["explicit_bounds"] == BUCKETS
    assert srv["count"] == 1 and srv["sum"] == pytest.approx(0.005)
    assert srv["bucket_counts"][0] == 1  # 5 ms is in (0, 0.005]: buckets are upper-inclusive
    assert srv["attributes"] == {"http.request.method": "GET", "http.response.status_code": 200,
                                 "http.route": "/items", "url.scheme": "http", "network.protocol.version": "1.1"}
    assert srv["resource"]["service.name"] == "backend"
    assert srv["resource"]["host.name"] == "node-1"
    assert "process.pid" not in srv["resource"] and "process.command_line" not in srv["resource"]
    cli = _one(pts, "http.client.request.duration")
    assert cli["attributes"] == {"http.request.method": "GET", "http.response.status_code": 200,
                                 "server.address": "127.0.0.1", "server.port": 8081,
                                 "network.protocol.version": "1.1"}
    assert cli["resource"]["service.name"] == "frontend"
    for p in pts:
        assert "url.path" not in p["attributes"] and "url.full" not in p["attributes"]
        assert "process.pid" not in p["attributes"]


def test_two_processes_of_one_service_share_one_resource() -> None:
    agg = MetricsAggregator()
    procs = {1: ProcessInfo(1, "api", "api", "api --a"), 2: ProcessInfo(2, "api", "api", "api --b")}
    for pid in (1, 2):
        agg.record_spans([_span(SpanKind.SERVER, pid, 0.02, {"http.request.method": "GET",
                                                            "http.response.status_code": 200})], procs)
    p = _one(_points(agg), "http.server.request.duration")
    assert p["count"] == 2


def test_error_type_and_unknown_methods() -> None:
    agg = MetricsAggregator()
    procs = processes()
    agg.record_spans([
        _span(SpanKind.SERVER, 202, 0.3, {"http.request.method": "GET", "http.response.status_code": 503},
              status=StatusCode.ERROR),
        _span(SpanKind.SERVER, 202, 0.3, {"http.request.method": "GET", "http.response.status_code": 404}),
        _span(SpanKind.CLIENT, 101, 0.3, {"http.request.method": "GET", "http.response.status_code": 404,
                                          "server.address": "x", "server.port": 80}, span_id=b"\x03" * 8),
        _span(SpanKind.SERVER, 202, 0.3, {"http.request.method": "FUZZ"}),
    ], procs)
    pts = _points(agg)
    assert _one(pts, "http.server.request.duration", **{"http.response.status_code": 503})["attributes"][
        "error.type"] == "503"
    assert "error.type" not in _one(pts, "http.server.request.duration",
                                    **{"http.response.status_code": 404})["attributes"]
    assert _one(pts, "http.client.request.duration")["attributes"]["error.type"] == "404"
    _one(pts, "http.server.request.duration", **{"http.request.method": "_OTHER"})


def test_service_graph_from_linked_client_server_pairs() -> None:
    agg = MetricsAggregator()
    agg.record_spans(chain_trace("ok"), processes())
    agg.record_spans(chain_trace("bad", status=500), processes())
    pts = _points(agg)
    edge = {"client": "frontend", "server": "backend", "connection_type": ""}
    total = _one(pts, "traces_service_graph_request_total", **edge)
    assert total["value"] == 2 and total["type"] == "sum" and total["monotonic"]
    assert total["resource"]["service.name"] == "kspan"
    assert _one(pts, "traces_service_graph_request_failed_total", **edge)["value"] == 1
    server_s = _one(pts, "traces_service_graph_request_server_seconds", **edge)
    client_s = _one(pts, "traces_service_graph_request_client_seconds", **edge)
    assert server_s["unit"] == client_s["unit"] == "s"
    assert server_s["count"] == 2 and server_s["sum"] == pytest.approx(0.010)
    assert client_s["count"] == 2 and client_s["sum"] == pytest.approx(0.014)
    # The root server span was called by something kspan does not trace: the collector's "user".
    user = _one(pts, "traces_service_graph_request_total", client="user", server="frontend")
    assert user["attributes"]["connection_type"] == "virtual_node"


@pytest.mark.parametrize("server_first", [True, False])
def test_pairs_match_across_batches_in_either_order(server_first: bool) -> None:
    agg = MetricsAggregator()
    server, client, _ = chain_trace()
    for s in ([server, client] if server_first else [client, server]):
        agg.record_spans([s], processes())
    pts = _points(agg)
    assert _one(pts, "traces_service_graph_request_total", client="frontend", server="backend")["value"] == 1
    assert _one(pts, "traces_service_graph_request_server_seconds", client="frontend")["count"] == 1


def test_client_to_untraced_peer_is_a_virtual_node() -> None:
    agg = MetricsAggregator()
    agg.record_spans([_span(SpanKind.CLIENT, 101, 0.05, {"http.request.method": "GET",
                                                         "server.address": "api.example.com",
                                                         "server.port": 443})], processes())
    pts = _points(agg)
    p = _one(pts, "traces_service_graph_request_total", client="frontend", server="api.example.com")
    assert p["attributes"]["connection_type"] == "virtual_node"
    assert _one(pts, "traces_service_graph_request_client_seconds", server="api.example.com")["count"] == 1
    assert not [x for x in pts if x["name"] == "traces_service_graph_request_server_seconds"]


def test_unpaired_half_is_counted_after_the_timeout() -> None:
    agg = MetricsAggregator(pair_timeout_s=0.0)
    _, client, _ = chain_trace()
    agg.record_spans([client], processes())
    agg._last_sweep = 0.0  # force the sweep on the next call
    agg.record_spans([], processes())
    pts = _points(agg)
    assert _one(pts, "traces_service_graph_request_total", client="frontend", server="backend")["value"] == 1
    assert agg.unpaired_edges == 1
    # The edge's first count had no server-side duration: a later pair of the same services still
    # adds its own.
    server, client, _ = chain_trace("t2")
    agg.record_spans([server, client], processes())
    pts = _points(agg)
    edge = {"client": "frontend", "server": "backend"}
    assert _one(pts, "traces_service_graph_request_total", **edge)["value"] == 2
    assert _one(pts, "traces_service_graph_request_client_seconds", **edge)["count"] == 2
    assert _one(pts, "traces_service_graph_request_server_seconds", **edge)["count"] == 1


def test_network_metrics_per_service_pair() -> None:
    agg = MetricsAggregator()
    agg.record_spans(chain_trace(), processes())  # learns backend listens on 8081, reached at 127.0.0.1:8081

    def ev(kind: TcpEventKind, value: int = 0, pid: int = 101, lport: int = 50000, rport: int = 8081) -> TcpEvent:
        return TcpEvent(kind=kind, pid=pid, ts_ns=1, conn_id=7, family=2, local_addr="127.0.0.1",
                        local_port=lport, remote_addr="127.0.0.1", remote_port=rport, value=value)

    agg.record_tcp([ev(TcpEventKind.RETRANSMIT), ev(TcpEventKind.RETRANSMIT), ev(TcpEventKind.RESET_RECEIVED),
                    ev(TcpEventKind.CONNECT_FAILED, rport=9), ev(TcpEventKind.RTT, value=150),
                    ev(TcpEventKind.RESET_SENT, pid=202, lport=8081, rport=50000)], processes())
    pts = _points(agg)
    pair = {"source": "frontend", "destination": "backend"}
    assert _one(pts, "kspan.network.tcp.retransmits", **pair)["value"] == 2
    assert _one(pts, "kspan.network.tcp.resets", direction="received", **pair)["value"] == 1
    # The server side names its peer by address only: the client's port is ephemeral.
    assert _one(pts, "kspan.network.tcp.resets", direction="sent", source="backend")["attributes"][
        "destination"] == "127.0.0.1"
    assert _one(pts, "kspan.network.tcp.connect_failures", source="frontend")["attributes"][
        "destination"] == "127.0.0.1:9"
    rtt = _one(pts, "kspan.network.tcp.rtt", **pair)
    assert rtt["unit"] == "s" and rtt["sum"] == pytest.approx(150e-6)


def test_health_callbacks() -> None:
    agg = MetricsAggregator()
    lost = [3]
    agg.register_health("kspan.ringbuf.records_lost", lambda: lost[0], "{record}", monotonic=True)
    agg.register_health("kspan.processes.traced", lambda: 4, "{process}")
    agg.register_health("kspan.broken", lambda: 1 // 0)
    pts = _points(agg)
    lost_p = _one(pts, "kspan.ringbuf.records_lost")
    assert lost_p["type"] == "sum" and lost_p["monotonic"] and lost_p["value"] == 3
    assert lost_p["resource"]["service.name"] == "kspan"
    assert _one(pts, "kspan.processes.traced")["type"] == "gauge"
    assert not [p for p in pts if p["name"] == "kspan.broken"]
    assert agg.health_errors == 1


def test_cardinality_is_bounded() -> None:
    agg = MetricsAggregator()
    spans = [_span(SpanKind.SERVER, 202, 0.01, {"http.request.method": "GET", "http.route": f"/r{i}"},
                   span_id=i.to_bytes(8, "big")) for i in range(CARDINALITY_LIMIT + 50)]
    agg.record_spans(spans, processes())
    pts = [p for p in _points(agg) if p["name"] == "http.server.request.duration"]
    assert len(pts) == CARDINALITY_LIMIT + 1
    assert _one(pts, "http.server.request.duration", **{"otel.metric.overflow": True})["count"] == 50


def test_user_resource_attributes_and_service_name() -> None:
    agg = MetricsAggregator(ResourceOverrides(service_name="shop", attributes={"deployment.environment": "ci"}))
    agg.record_spans(chain_trace(), processes())
    pts = _points(agg)
    red = _one(pts, "http.client.request.duration")
    assert red["resource"]["service.name"] == "shop" and red["resource"]["deployment.environment"] == "ci"
    sg = _one(pts, "traces_service_graph_request_total", client="shop", server="shop")
    assert sg["resource"]["service.name"] == "kspan" and sg["resource"]["deployment.environment"] == "ci"


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_arrive_at_the_otlp_endpoint(protocol: str) -> None:
    with OtlpReceiver() as rx:
        ep = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
        cfg = load_config({"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k1"}, endpoint=ep, protocol=protocol)
        rec = MetricsRecorder(cfg, interval_s=0.3)
        try:
            rec.register_health("kspan.export.spans.dropped", lambda: 0, "{span}", monotonic=True)
            rec.record_spans(chain_trace(), processes())
            got = rx.wait_for_metrics(
                lambda ms: {"http.server.request.duration", "traces_service_graph_request_total",
                            "kspan.export.spans.dropped"} <= {m["name"] for m in ms}, timeout_s=10)
        finally:
            rec.shutdown()
        srv = next(m for m in got if m["name"] == "http.server.request.duration")
        assert srv["unit"] == "s" and srv["explicit_bounds"] == BUCKETS and srv["temporality"] == 2  # cumulative
        assert rx.metric_requests[0][2]["x-api-key"] == "k1"
        assert rec.exports >= 1 and rec.export_failures == 0


def test_metrics_survive_a_collector_outage(caplog: pytest.LogCaptureFixture) -> None:
    grpc_port = unused_port()
    cfg = load_config({"OTEL_EXPORTER_OTLP_TIMEOUT": "500"}, endpoint=f"http://127.0.0.1:{grpc_port}",
                      protocol="grpc")
    rec = MetricsRecorder(cfg, interval_s=0.3)
    rx = None
    caplog.set_level(logging.WARNING)
    try:
        rec.record_spans(chain_trace("a"), processes())
        deadline = time.monotonic() + 10
        while rec.export_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.export_failures >= 1
        rec.record_spans(chain_trace("b"), processes())
        rx = OtlpReceiver(grpc_port=grpc_port).start()
        # Cumulative temporality: the first export after the outage carries everything recorded.
        rx.wait_for_metrics(lambda ms: any(m["name"] == "traces_service_graph_request_total"
                                           and m["attributes"].get("server") == "backend" and m["value"] == 2
                                           for m in ms), timeout_s=15)
        deadline = time.monotonic() + 5
        while not any("resumed" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        rec.shutdown(2)
        if rx is not None:
            rx.stop()
    messages = [r.getMessage() for r in caplog.records]
    # One actionable line per outage (the SDK's per-attempt errors are folded into it), one on recovery.
    assert len([m for m in messages if "cannot export metrics" in m]) == 1, messages
    assert any("metric export to" in m and "resumed" in m for m in messages)
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]


def test_embedded_default_writes_otlp_json_metric_lines(tmp_path) -> None:
    out = tmp_path / "m.jsonl"
    cfg = load_config({}, output=str(tmp_path / "t.jsonl"), metrics_output=str(out))
    rec = MetricsRecorder(cfg, interval_s=60)
    rec.record_spans(chain_trace(), processes())
    rec.shutdown()  # the final export writes the line
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    names = {m["name"] for rm in doc["resourceMetrics"] for sm in rm["scopeMetrics"] for m in sm["metrics"]}
    assert {"http.server.request.duration", "http.client.request.duration",
            "traces_service_graph_request_total"} <= names
    hist = next(m for rm in doc["resourceMetrics"] for sm in rm["scopeMetrics"] for m in sm["metrics"]
                if m["name"] == "http.server.request.duration")
    assert hist["histogram"]["aggregationTemporality"] == 2  # enums as integers
    req = json_format.ParseDict(doc, ExportMetricsServiceRequest())
    assert len(req.resource_metrics) == 3  # frontend, backend, kspan


def test_recording_cost_per_span_is_small() -> None:
    agg = MetricsAggregator()
    spans = [s for i in range(300) for s in chain_trace(f"c{i}")]
    agg.record_spans(spans, processes())
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        agg.record_spans(spans, processes())
        best = min(best, (time.perf_counter() - t0) / len(spans))
    assert best < 40e-6, f"{best * 1e6:.1f} us per span"  # ~4 us idle here; generous for a loaded CI core


def test_unwritable_metrics_file_is_a_config_error(tmp_path) -> None:
    from exporters.config import ConfigError

    blocker = tmp_path / "f"
    blocker.write_text("")
    cfg = load_config({}, metrics_output=str(blocker / "sub" / "m.jsonl"))
    with pytest.raises(ConfigError, match="cannot open for writing"):
        MetricsRecorder(cfg)


def test_health_kind_is_inferred_from_the_name_when_not_given() -> None:
    from exporters.metrics import _looks_cumulative

    assert _looks_cumulative("kspan.records.lost") and _looks_cumulative("kspan.bytes.unparsed")
    assert _looks_cumulative("kspan.spans.dropped") and _looks_cumulative("x.requests_total")
    assert not _looks_cumulative("kspan.probes.attached") and not _looks_cumulative("kspan.processes.traced")


def test_no_metrics_destination_means_no_recording_cost() -> None:
    cfg = load_config({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"})
    assert cfg.metrics is None and cfg.metrics_output is None
    assert any("metrics are not exported" in n for n in cfg.notes)
    rec = MetricsRecorder(cfg)
    assert not rec.enabled
    rec.record_spans(chain_trace(), processes())
    assert rec.aggregator.collect().resource_metrics == []
    rec.shutdown()


def test_pipeline_health_metrics(tmp_path) -> None:
    from exporters.metrics import register_pipeline_health
    from exporters.pipeline import ExportPipeline

    class Refusing:
        last_error = "no"
        last_failure_permanent = True

        def export(self, spans, processes) -> bool:  # type: ignore[no-untyped-def]
            return False

        def shutdown(self) -> None:
            pass

    pipe = ExportPipeline([Refusing()], max_delay_s=0.01)
    rec = MetricsRecorder(load_config({}, metrics_output=str(tmp_path / "m.jsonl")), interval_s=60)
    try:
        register_pipeline_health(rec, pipe)
        pipe.submit(chain_trace(), processes())
        deadline = time.monotonic() + 5
        while pipe.stats()["dropped"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        pts = _points(rec.aggregator)
        dropped = _one(pts, "kspan.export.spans.dropped")
        assert dropped["value"] == 3 and dropped["type"] == "sum"
        assert _one(pts, "kspan.export.spans.queued")["type"] == "gauge"
    finally:
        pipe.shutdown(1)
        rec.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_over_tls_with_a_custom_ca(tmp_path, protocol: str) -> None:
    from tests.support.otlp_receiver import self_signed_cert

    cert, key = self_signed_cert(str(tmp_path))
    with OtlpReceiver(tls=(cert, key)) as rx:
        ep = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
        rec = MetricsRecorder(load_config({"OTEL_EXPORTER_OTLP_CERTIFICATE": cert}, endpoint=ep, protocol=protocol),
                              interval_s=60)
        rec.record_spans(chain_trace(), processes())
        assert rec.export_now(timeout_s=5)
        rec.shutdown()
        assert any(m["name"] == "http.server.request.duration" for m in rx.metrics())


def test_database_calls_have_their_own_duration_and_a_database_node() -> None:
    """db.client.operation.duration by system, namespace, operation and collection, never the query
    text; the service graph gets a database node named by its system; a database's own
    server-side spans add neither."""
    agg = MetricsAggregator()
    db = {"db.system.name": "postgresql", "db.namespace": "shop", "db.operation.name": "SELECT",
          "db.collection.name": "items", "db.query.text": "SELECT name FROM items WHERE id = ?",
          "server.address": "127.0.0.1", "server.port": 5432}
    agg.record_spans([
        _span(SpanKind.CLIENT, 101, 0.002, dict(db), span_id=b"\x03" * 8),
        _span(SpanKind.CLIENT, 101, 0.004, {**db, "db.response.status_code": "23505", "error.type": "23505"},
              span_id=b"\x04" * 8, status=StatusCode.ERROR),
        _span(SpanKind.SERVER, 102, 0.001, {"db.system.name": "postgresql", "db.operation.name": "SELECT"}),
    ], processes())
    points = _points(agg)
    series = [p for p in points if p["name"] == "db.client.operation.duration"]
    assert len(series) == 2 and all("db.query.text" not in p["attributes"] for p in series)
    ok = next(p for p in series if "error.type" not in p["attributes"])
    assert ok["count"] == 1 and ok["attributes"]["db.namespace"] == "shop"
    assert ok["attributes"]["db.collection.name"] == "items" and ok["attributes"]["server.port"] == 5432
    failed = _one(points, "db.client.operation.duration", **{"error.type": "23505"})
    assert failed["attributes"]["db.response.status_code"] == "23505"
    assert not [p for p in points if p["name"].startswith("http.")], "no HTTP series for database spans"
    edge = _one(points, "traces_service_graph_request_total", server="postgresql")
    assert edge["attributes"]["connection_type"] == "database" and edge["value"] == 2
    assert _one(points, "traces_service_graph_request_failed_total", server="postgresql")["value"] == 1
    assert not [p for p in points if p["name"] == "traces_service_graph_request_total"
                and p["attributes"].get("client") == "user"], "the database's own spans add no edge"


def test_rpc_calls_have_rpc_durations() -> None:
    agg = MetricsAggregator()
    rpc = {"rpc.system": "grpc", "rpc.service": "shop.Cart", "rpc.method": "Add", "rpc.grpc.status_code": 0}
    agg.record_spans([_span(SpanKind.SERVER, 101, 0.01, dict(rpc)),
                      _span(SpanKind.CLIENT, 101, 0.02, dict(rpc), span_id=b"\x05" * 8)], processes())
    points = _points(agg)
    assert _one(points, "rpc.server.call.duration", **{"rpc.method": "Add"})["count"] == 1
    assert _one(points, "rpc.client.call.duration", **{"rpc.service": "shop.Cart"})["count"] == 1
