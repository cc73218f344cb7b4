"""The Prometheus scrape endpoint: OpenTelemetry -> Prometheus names, the exposition's content, the
HTTP endpoint and its flags."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from correlator.records import TcpEvent, TcpEventKind
from correlator.spans import ProcessInfo
from exporters.config import ConfigError
from exporters.metrics import DURATION_BUCKETS, MetricsAggregator
from exporters.prometheus import PrometheusEndpoint, exposition, label_name, metric_name
from tests.support.sample_spans import chain_trace, processes


@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    ("http.server.request.duration", "s", "histogram", "http_server_request_duration_seconds"),
    ("http.client.request.duration", "s", "histogram", "http_client_request_duration_seconds"),
    # Already ends in its unit / already a counter name: nothing doubles.
    ("traces_service_graph_request_server_seconds", "s", "histogram", "traces_service_graph_request_server_seconds"),
    ("traces_service_graph_request_total", "{request}", "counter", "traces_service_graph_request_total"),
    ("traces_service_graph_request_failed_total", "{request}", "counter",
     "traces_service_graph_request_failed_total"),
    ("kspan.network.tcp.retransmits", "{segment}", "counter", "kspan_network_tcp_retransmits_total"),
    ("kspan.network.tcp.rtt", "s", "histogram", "kspan_network_tcp_rtt_seconds"),
    ("kspan.records.lost", "{record}", "counter", "kspan_records_lost_total"),
    ("kspan.bytes.unparsed", "By", "counter", "kspan_bytes_unparsed_total"),
    ("kspan.export.spans.queued", "{span}", "gauge", "kspan_export_spans_queued"),
    ("system.cpu.utilization", "1", "gauge", "system_cpu_utilization_ratio"),
    ("kspan.total.requests", "1", "counter", "kspan_requests_total"),
    ("net.io", "By/s", "gauge", "net_io_bytes_per_second"),
    ("process.memory", "MiBy", "gauge", "process_memory_mebibytes"),
    ("2xx..responses", "{response}", "gauge", "_2xx_responses"),
])
def test_names_follow_the_opentelemetry_prometheus_rules(name: str, unit: str, kind: str, expected: str) -> None:
    assert metric_name(name, unit, kind) == expected


def test_label_names() -> None:
    assert label_name("http.response.status_code") == "http_response_status_code"
    assert label_name("k8s.pod.name") == "k8s_pod_name"
    assert label_name("1st") == "key_1st"
    assert label_name("__reserved") == "key__reserved"
    assert label_name("") == "key"


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(text: str, name: str, **labels: str) -> list:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s)
    return out


def _one(text: str, name: str, **labels: str) -> float:
    found = _samples(text, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def _tcp(kind: TcpEventKind, value: int = 0, pid: int = 101, lport: int = 50000, rport: int = 8081) -> TcpEvent:
    return TcpEvent(kind=kind, pid=pid, ts_ns=1, conn_id=7, family=2, local_addr="127.0.0.1",
                    local_port=lport, remote_addr="127.0.0.1", remote_port=rport, value=value)


def test_exposition_carries_red_service_graph_network_and_health_metrics() -> None:
    agg = MetricsAggregator()
    agg.record_spans(chain_trace("ok1") + chain_trace("ok2") + chain_trace("bad", status=500), processes())
    agg.record_tcp([_tcp(TcpEventKind.RETRANSMIT), _tcp(TcpEventKind.RESET_RECEIVED),
                    _tcp(TcpEventKind.CONNECT_FAILED, rport=9), _tcp(TcpEventKind.RTT, value=250)], processes())
    agg.register_health("kspan.records.lost", lambda: 7, "{record}", monotonic=True)
    agg.register_health("kspan.probes.attached", lambda: 12, "{probe}", monotonic=False)
    text = exposition(agg.collect)
    fams = _families(text)

    # RED: a histogram per service, the semconv buckets, cumulative, +Inf equal to _count.
    assert fams["http_server_request_duration_seconds"].type == "histogram"
    ok = {"service_name": "backend", "http_route": "/items", "http_response_status_code": "200"}
    assert _one(text, "http_server_request_duration_seconds_count", **ok) == 2
    assert _one(text, "http_server_request_duration_seconds_sum", **ok) == pytest.approx(0.010)
    buckets = _samples(text, "http_server_request_duration_seconds_bucket", **ok)
    assert [float(b.labels["le"]) for b in buckets] == [*DURATION_BUCKETS, float("inf")]
    assert [b.value for b in buckets] == [2.0] * len(buckets)  # 5 ms each: all in the first bucket and up
    front = _samples(text, "http_server_request_duration_seconds_bucket", service_name="frontend",
                     http_response_status_code="200")
    assert [b.value for b in front][:2] == [0.0, 2.0]  # 10 ms is in (0.005, 0.01]: upper-inclusive
    err = {"service_name": "backend", "error_type": "500"}
    assert _one(text, "http_server_request_duration_seconds_count", **err) == 1
    assert _one(text, "http_client_request_duration_seconds_count", service_name="frontend",
                server_address="127.0.0.1", server_port="8081", http_response_status_code="200") == 2

    # The service graph under Tempo's and the collector connector's own names.
    assert fams["traces_service_graph_request"].type == "counter"
    edge = {"client": "frontend", "server": "backend", "connection_type": ""}
    assert _one(text, "traces_service_graph_request_total", **edge) == 3
    assert _one(text, "traces_service_graph_request_failed_total", **edge) == 1
    assert _one(text, "traces_service_graph_request_server_seconds_count", **edge) == 3
    assert _one(text, "traces_service_graph_request_total", client="user", server="frontend",
                connection_type="virtual_node") == 3

    # Network and health.
    pair = {"source": "frontend", "destination": "backend"}
    assert _one(text, "kspan_network_tcp_retransmits_total", **pair) == 1
    assert _one(text, "kspan_network_tcp_resets_total", direction="received", **pair) == 1
    assert _one(text, "kspan_network_tcp_connect_failures_total", source="frontend") == 1
    assert _one(text, "kspan_network_tcp_rtt_seconds_sum", **pair) == pytest.approx(250e-6)
    assert _one(text, "kspan_records_lost_total", service_name="kspan") == 7
    assert fams["kspan_probes_attached"].type == "gauge"
    assert _one(text, "kspan_probes_attached") == 12

    # Resources: every series names its service; target_info carries the rest.
    info = {s.labels["service_name"]: s.labels for s in _samples(text, "target_info")}
    assert set(info) == {"frontend", "backend", "kspan"}
    assert info["frontend"]["k8s_pod_name"] == "frontend-abc"
    assert "process_pid" not in info["frontend"]  # per-process attributes stay out, as on OTLP
    assert _one(text, "kspan_prometheus_conflicts_total") == 0
    # No OTLP name leaks through untranslated.
    assert "." not in "".join(f.name for f in fams.values())


def test_series_identical_after_translation_are_summed() -> None:
    # Two pods of one service (one resource each) have the same Prometheus labels: one series, summed.
    procs = {pid: ProcessInfo(pid=pid, service_name="backend", executable_name="backend", command_line="",
                              attributes={"k8s.pod.name": pod})
             for pid, pod in ((202, "backend-1"), (303, "backend-2"))}
    agg = MetricsAggregator()
    agg.record_spans([s for s in chain_trace("a") if s.pid == 202], procs)
    agg.record_spans(_with_pid([s for s in chain_trace("b") if s.pid == 202], 303), procs)
    text = exposition(agg.collect)
    assert _one(text, "http_server_request_duration_seconds_count", service_name="backend") == 2
    assert _one(text, "http_server_request_duration_seconds_bucket", service_name="backend", le="+Inf") == 2
    pods = {s.labels["k8s_pod_name"] for s in _samples(text, "target_info", service_name="backend")}
    assert pods == {"backend-1", "backend-2"}


def _with_pid(spans: list, pid: int) -> list:
    import dataclasses

    return [dataclasses.replace(s, pid=pid) for s in spans]


def test_what_prometheus_cannot_express_is_counted_not_served_twice() -> None:
    agg = MetricsAggregator()
    agg.record_spans(chain_trace(), processes())
    # A health gauge whose Prometheus name is the RED histogram's: one type per name in Prometheus.
    agg.register_health("http.server.request.duration", lambda: 1, "s", monotonic=False)
    text = exposition(agg.collect)
    assert text.count("# TYPE http_server_request_duration_seconds ") == 1
    assert _families(text)["http_server_request_duration_seconds"].type == "histogram"
    assert _one(text, "kspan_prometheus_conflicts_total") == 1


def test_colliding_attribute_keys_are_joined() -> None:
    from exporters.prometheus import _labels

    assert _labels({"a.b": "x", "a_b": "y"}) == {"a_b": "x;y"}
    # A point attribute never replaces the resource's service_name.
    assert _labels({"service.name": "spoof"}, {"service_name": "real"}) == {"service_name": "real",
                                                                            "exported_service_name": "spoof"}
    assert _labels({"flag": True, "n": 3, "xs": ["a", "b"]}) == {"flag": "true", "n": "3", "xs": '["a","b"]'}


def _get(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def test_endpoint_serves_text_and_openmetrics_on_loopback() -> None:
    agg = MetricsAggregator()
    agg.record_spans(chain_trace(), processes())
    ep = PrometheusEndpoint(agg.collect, port=0)
    try:
        assert ep.address == "127.0.0.1" and ep.url == f"http://127.0.0.1:{ep.port}/metrics"
        ctype, text = _get(ep.url)
        assert ctype.startswith("text/plain")
        assert _one(text, "http_server_request_duration_seconds_count", service_name="backend") == 1
        assert _samples(text, "process_resident_memory_bytes"), "the agent's own process metrics"
        # What Prometheus asks for first: OpenMetrics, which must parse strictly.
        ctype, om = _get(ep.url, "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        assert ctype.startswith("application/openmetrics-text")
        names = {f.name for f in parse_openmetrics(om)}
        assert {"http_server_request_duration_seconds", "traces_service_graph_request", "target"} <= names
        # Recording goes on between scrapes: the next scrape sees the new totals.
        agg.record_spans(chain_trace("again"), processes())
        _, text = _get(ep.url)
        assert _one(text, "http_server_request_duration_seconds_count", service_name="backend") == 2
    finally:
        ep.close()
    with pytest.raises(OSError):
        _get(ep.url)


def test_endpoint_on_ipv6_loopback() -> None:
    ep = PrometheusEndpoint(MetricsAggregator().collect, address="::1", port=0)
    try:
        assert ep.url == f"http://[::1]:{ep.port}/metrics"
        assert _one(_get(ep.url)[1], "kspan_prometheus_conflicts_total") == 0
    finally:
        ep.close()


def test_a_busy_port_is_a_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--prometheus-port {port}.*cannot listen"):
            PrometheusEndpoint(MetricsAggregator().collect, port=port)


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tracer.cli import _options, build_parser

    def opts(*argv: str):
        return _options(build_parser().parse_args(["run", *argv]))

    monkeypatch.delenv("KSPAN_PROMETHEUS_PORT", raising=False)
    monkeypatch.delenv("KSPAN_PROMETHEUS_ADDRESS", raising=False)
    o = opts()
    assert o.prometheus_port is None and o.prometheus_address == "127.0.0.1"  # off by default
    o = opts("--prometheus-port", "9464", "--prometheus-address", "0.0.0.0")
    assert (o.prometheus_port, o.prometheus_address) == (9464, "0.0.0.0")
    monkeypatch.setenv("KSPAN_PROMETHEUS_PORT", "9500")
    monkeypatch.setenv("KSPAN_PROMETHEUS_ADDRESS", "[::1]")
    o = opts()
    assert (o.prometheus_port, o.prometheus_address) == (9500, "::1")
    assert opts("--prometheus-port", "9464").prometheus_port == 9464  # the flag wins
    monkeypatch.setenv("KSPAN_PROMETHEUS_PORT", "nine")
    with pytest.raises(SystemExit, match="KSPAN_PROMETHEUS_PORT='nine'"):
        opts()
    with pytest.raises(SystemExit):
        opts("--prometheus-port", "70000")


def test_span_output_records_for_the_scrape_even_when_nothing_is_pushed(tmp_path: Path) -> None:
    # Traces to OTLP with no metrics endpoint, and --no-metrics: only the scrape endpoint wants metrics.
    from tracer.agent import RunOptions, SpanOutput
    from tracer.processes import ProcessTable

    table = ProcessTable()
    for info in processes().values():
        table.put(info)
    opts = RunOptions(console=False, output=str(tmp_path / "t.jsonl"), metrics=False, prometheus_port=0,
                      otlp_endpoint="http://127.0.0.1:9/")
    out = SpanOutput(opts, table, {})
    try:
        assert out.prometheus is not None and out.metrics is not None and out.metrics.enabled
        out.spans(chain_trace())
        _, text = _get(out.prometheus.url)
        assert _one(text, "http_server_request_duration_seconds_count", service_name="backend") == 1
        assert not (tmp_path / "kspan-metrics.jsonl").exists()
    finally:
        out.shutdown(timeout_s=0.5)
    assert out.metrics.exports == 0  # nothing pushed
