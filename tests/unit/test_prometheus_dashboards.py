"""The Grafana dashboard and the rules file read only metrics kspan really serves: the names come from
kspan's own /metrics, produced by the agent's wiring (SpanOutput, its health registration, the
Prometheus endpoint) on sample spans and TCP events, never from a hand-kept list."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from correlator.clock import WallClock
from correlator.correlator import Correlator
from correlator.records import TcpEvent, TcpEventKind
from tests.support.promql import (
    DASHBOARD,
    dashboard_queries,
    metric_names,
    recorded_names,
    rule_queries,
    sample_names,
    scrape,
    substitute_variables,
)
from tests.support.sample_spans import chain_trace, processes
from tests.unit.test_alert_rules import promtool


class _CaptureReadings:
    """The two readings the agent's health metrics take from its Capture (which needs the kernel):
    its probe count and its kernel counters."""

    probes_attached = 12

    @staticmethod
    def counters() -> dict[str, int]:
        return {"ringbuf_lost": 0, "unparsed_bytes": 0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    from tracer.agent import Agent, RunOptions, SpanOutput, _correlator_config
    from tracer.processes import ProcessTable

    tmp = tmp_path_factory.mktemp("exported")
    table = ProcessTable()
    for info in processes().values():
        table.put(info)
    opts = RunOptions(console=False, output=str(tmp / "t.jsonl"), metrics=False, prometheus_port=0)
    out = SpanOutput(opts, table, {})
    try:
        correlator = Correlator(WallClock.now(), _correlator_config(opts, b"salt"))
        Agent(opts)._register_health(out, _CaptureReadings(), correlator, table)
        out.spans(chain_trace("ok") + chain_trace("failed", status=500))
        out.tcp([TcpEvent(kind=k, pid=101, ts_ns=1, conn_id=7, family=2, local_addr="127.0.0.1", local_port=50000,
                          remote_addr="127.0.0.1", remote_port=8081, value=100) for k in TcpEventKind])
        assert out.prometheus is not None
        return sample_names(scrape(out.prometheus.url))
    finally:
        out.shutdown(timeout_s=0.5)


def test_metric_names_of_a_query() -> None:
    assert metric_names('sum by (service_name, le) (rate(http_server_request_duration_seconds_bucket'
                        '{service_name=~"$service",error_type!=""}[$__rate_interval]))') == {
        "http_server_request_duration_seconds_bucket"}
    assert metric_names("histogram_quantile(0.95, sum(rate(a_bucket[5m])) by (le)) > on () group_left () "
                        "kspan:alert_threshold:latency_seconds or b_total * 0 and c offset 5m") == {
        "a_bucket", "kspan:alert_threshold:latency_seconds", "b_total", "c"}
    assert metric_names('label_join(label_replace(x_total, "source", "$1", "client", "(.*)"), "id", "->", "a")') == {
        "x_total"}
    assert metric_names("vector(0.10)") == set()
    with pytest.raises(AssertionError, match="unknown Grafana variables"):
        substitute_variables('rate(x{a=~"$nope"}[5m])')
    assert substitute_variables('label_replace(x[$__range], "s", "$1", "c", "(.*)")') == \
        'label_replace(x[1h], "s", "$1", "c", "(.*)")'


def test_the_exposition_is_what_the_queries_are_checked_against(exported: set[str]) -> None:
    # If the agent's wiring stopped serving something, the check below would be checking against less.
    assert {"http_server_request_duration_seconds_bucket", "http_client_request_duration_seconds_count",
            "traces_service_graph_request_total", "traces_service_graph_request_failed_total",
            "traces_service_graph_request_server_seconds_sum", "kspan_network_tcp_rtt_seconds_bucket",
            "kspan_network_tcp_retransmits_total", "kspan_probes_attached", "kspan_records_lost_total",
            "kspan_export_spans_dropped_total", "process_resident_memory_bytes"} <= exported
    assert not [n for n in exported if "." in n]


def test_every_query_names_a_metric_kspan_exports(exported: set[str]) -> None:
    recorded = recorded_names()
    queries = dashboard_queries() + rule_queries()
    assert len(queries) > 40
    unknown: dict[str, set[str]] = {}
    used: set[str] = set()
    for where, expr in queries:
        names = metric_names(expr)
        used |= names
        bad = {n for n in names if n not in exported and n not in recorded}
        if bad:
            unknown[where] = bad
    assert not unknown, f"queries read metrics kspan does not serve: {unknown}"
    # Recording rules are the rules file's own; every other name is a real series.
    assert used & recorded and used - recorded


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses each query as Prometheus will (Grafana's variables replaced as Grafana does).
    rules = [{"record": f"kspan_check:q{i}", "expr": substitute_variables(expr)}
             for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _panels() -> list[dict]:
    doc = json.loads(DASHBOARD.read_text())
    return [p for p in doc["panels"] if p["type"] != "row"]


def test_dashboard_panels() -> None:
    doc = json.loads(DASHBOARD.read_text())
    panels = _panels()
    by_title = {p["title"]: p for p in panels}
    assert len(by_title) == len(panels), "panel titles are unique"
    ids = [p["id"] for p in doc["panels"]]
    assert len(set(ids)) == len(ids)
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    # RED per service.
    for title in ("Requests per second", "Error ratio", "Average latency"):
        assert "http_server_request_duration_seconds" in by_title[title]["targets"][0]["expr"]
    thresholds = [s["value"] for s in by_title["Error ratio"]["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert 0.1 in thresholds
    assert 0.5 in [s["value"] for s in by_title["Average latency"]["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    # Top routes, by http_route.
    assert "http_route" in by_title["Top routes"]["targets"][0]["expr"]
    # The service graph: a node graph whose "edges" frame has the id, source and target fields.
    graph = by_title["Service graph"]
    assert graph["type"] == "nodeGraph"
    edges = graph["targets"][0]
    assert edges["refId"] == "edges" and edges["format"] == "table" and edges["instant"]
    for field in ('"source"', '"target"', '"id"'):
        assert field in edges["expr"]
    assert "traces_service_graph_request_total" in edges["expr"]
    # kspan's own health.
    health = " ".join(t["expr"] for p in panels for t in p["targets"])
    for name in ("kspan_probes_attached", "kspan_records_lost_total", "kspan_export_spans_dropped_total",
                 "process_resident_memory_bytes"):
        assert name in health
