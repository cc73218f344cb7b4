"""otel-collector-config/*.yaml: the structure the collector validates at start-up, checked here
(no collector binary on this machine): every component a pipeline names is defined, every defined
component is used, connectors join a traces pipeline to a metrics one, memory_limiter comes first
and batch is in every pipeline, and listeners bind where other containers can reach them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "otel-collector-config"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

# Component types these configs may use (classic names and their newer snake_case aliases): a typo
# such as `memorylimiter` must fail here as it would in the collector.
KNOWN_TYPES = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch", "tail_sampling", "filter", "resource", "attributes",
                   "k8sattributes", "transform"},
    "exporters": {"otlp", "otlp_grpc", "otlphttp", "otlp_http", "prometheus", "prometheusremotewrite",
                  "prometheus_remote_write", "debug", "loadbalancing"},
    "connectors": {"spanmetrics", "span_metrics", "servicegraph", "service_graph"},
    "extensions": {"health_check", "pprof", "zpages"},
}
# (signal it consumes, signal it produces) for each connector type.
CONNECTOR_SIGNALS = {name: ("traces", "metrics")
                     for name in ("spanmetrics", "span_metrics", "servicegraph", "service_graph")}
LISTENING_HOSTS = {"0.0.0.0", "[::]", "::", "${env:MY_POD_IP}"}


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name}: not a mapping"
    return doc


def ctype(component_id: str) -> str:
    """`otlp/jaeger` -> `otlp`: a component id is type[/name]."""
    return component_id.split("/", 1)[0]


def pipelines(doc: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    return doc["service"]["pipelines"]


def test_the_four_pipelines_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"jaeger.yaml", "tempo.yaml", "spanmetrics-servicegraph.yaml",
                                         "tail-sampling.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_named_component_is_defined_and_known(path: Path) -> None:
    doc = load(path)
    connectors = set(doc.get("connectors") or {})
    for section, known in KNOWN_TYPES.items():
        for component_id in doc.get(section) or {}:
            assert ctype(component_id) in known, f"{path.name}: unknown {section} type {component_id}"
    for name, pipeline in pipelines(doc).items():
        assert ctype(name) in ("traces", "metrics", "logs"), f"{path.name}: pipeline {name}"
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"{path.name}: {name} is incomplete"
        for rid in pipeline["receivers"]:
            assert rid in (doc.get("receivers") or {}) or rid in connectors, f"{path.name}: {name}: {rid}"
        for pid in pipeline.get("processors") or []:
            assert pid in (doc.get("processors") or {}), f"{path.name}: {name}: {pid}"
        for eid in pipeline["exporters"]:
            assert eid in (doc.get("exporters") or {}) or eid in connectors, f"{path.name}: {name}: {eid}"
    for eid in doc["service"].get("extensions") or []:
        assert eid in (doc.get("extensions") or {}), f"{path.name}: extension {eid}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_defined_component_is_used(path: Path) -> None:
    doc = load(path)
    used_as_receiver = {r for p in pipelines(doc).values() for r in p["receivers"]}
    used_as_exporter = {e for p in pipelines(doc).values() for e in p["exporters"]}
    used_processors = {x for p in pipelines(doc).values() for x in p.get("processors") or []}
    assert set(doc.get("receivers") or {}) <= used_as_receiver, path.name
    assert set(doc.get("exporters") or {}) <= used_as_exporter, path.name
    assert set(doc.get("processors") or {}) == used_processors, path.name
    assert set(doc.get("extensions") or {}) == set(doc["service"].get("extensions") or []), path.name
    for connector in doc.get("connectors") or {}:
        consumes, produces = CONNECTOR_SIGNALS[ctype(connector)]
        into = [n for n, p in pipelines(doc).items() if connector in p["exporters"]]
        out_of = [n for n, p in pipelines(doc).items() if connector in p["receivers"]]
        assert into and all(ctype(n) == consumes for n in into), f"{path.name}: {connector} exported from {into}"
        assert out_of and all(ctype(n) == produces for n in out_of), f"{path.name}: {connector} received in {out_of}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_memory_limiter_first_and_batch_in_every_pipeline(path: Path) -> None:
    for name, pipeline in pipelines(load(path)).items():
        processors = [ctype(p) for p in pipeline.get("processors") or []]
        assert processors and processors[0] == "memory_limiter", f"{path.name}: {name}: {processors}"
        assert "batch" in processors, f"{path.name}: {name}"
        if "tail_sampling" in processors:  # batch what is kept, not what the sampler will drop
            assert processors.index("batch") > processors.index("tail_sampling")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_listeners_bind_an_address_other_containers_reach(path: Path) -> None:
    doc = load(path)
    endpoints = []
    for rid, receiver in (doc.get("receivers") or {}).items():
        for protocol, settings in (receiver.get("protocols") or {}).items():
            assert settings and "endpoint" in settings, f"{path.name}: {rid}.{protocol} binds the default (localhost)"
            endpoints.append((f"{rid}.{protocol}", settings["endpoint"]))
    for eid, exporter in (doc.get("exporters") or {}).items():
        if ctype(eid) == "prometheus":  # a scrape endpoint is a listener too
            endpoints.append((eid, exporter["endpoint"]))
    for eid, extension in (doc.get("extensions") or {}).items():
        endpoints.append((eid, extension["endpoint"]))
    assert endpoints
    for what, endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        assert host in LISTENING_HOSTS and port.isdigit(), f"{path.name}: {what} listens on {endpoint}"
    ports = {e.rpartition(":")[2] for what, e in endpoints if what.startswith("otlp.")}
    assert ports == {"4317", "4318"}, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_kspan_metrics_have_a_pipeline_and_traces_go_out_over_otlp(path: Path) -> None:
    doc = load(path)
    names = pipelines(doc)
    # kspan exports metrics too: without an OTLP metrics pipeline the receiver rejects them.
    assert any(ctype(n) == "metrics" and "otlp" in p["receivers"] for n, p in names.items()), path.name
    traces = [p for n, p in names.items() if ctype(n) == "traces"]
    assert traces and all("otlp" in p["receivers"] for p in traces)
    backends = [e for p in traces for e in p["exporters"] if ctype(e) in ("otlp", "otlp_grpc")]
    assert backends, f"{path.name}: traces go nowhere"
    for exporter_id in backends:
        endpoint = doc["exporters"][exporter_id]["endpoint"]
        assert endpoint.rpartition(":")[2] == "4317", f"{path.name}: {exporter_id} -> {endpoint}"
    assert "jaeger" not in {ctype(e) for e in doc.get("exporters") or {}}  # removed from the collector


def test_backends_by_file() -> None:
    assert load(CONFIG_DIR / "jaeger.yaml")["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert load(CONFIG_DIR / "tempo.yaml")["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    policies = load(CONFIG_DIR / "tail-sampling.yaml")["processors"]["tail_sampling"]["policies"]
    by_type = {p["type"]: p for p in policies}
    assert by_type["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert by_type["latency"]["latency"]["threshold_ms"] > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_file_is_commented(path: Path) -> None:
    comments = [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 5, f"{path.name}: explain the pipeline in comments"
