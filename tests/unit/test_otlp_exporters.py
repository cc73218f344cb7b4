"""OTLP gRPC and HTTP span exporters against a real OTLP endpoint (tests/support/otlp_receiver.py)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from exporters.config import build_exporters, load_config
from exporters.otlp_grpc import OtlpGrpcSpanExporter
from exporters.otlp_http import OtlpHttpSpanExporter
from tests.support.otlp_receiver import OtlpReceiver, self_signed_cert, span_tree, unused_port
from tests.support.sample_spans import chain_trace, processes

PROTOCOLS = ["grpc", "http/protobuf"]


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def _exporter(rx: OtlpReceiver, protocol: str, env: dict[str, str] | None = None):
    ep = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    (exp,) = build_exporters(load_config(env or {}, endpoint=ep, protocol=protocol))
    return exp


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_trace_arrives_whole_with_resources(rx: OtlpReceiver, protocol: str) -> None:
    exp = _exporter(rx, protocol, {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci"})
    try:
        assert exp.export(chain_trace(), processes()) is True
    finally:
        exp.shutdown()
    spans = rx.wait_for_spans(lambda ss: len(ss) == 3, timeout_s=5)
    assert {s["transport"] for s in spans} == {"grpc" if protocol == "grpc" else "http"}
    tree = span_tree(spans)
    (root,) = tree[""]
    assert root["name"] == "GET /api" and root["kind"] == 2
    assert root["resource"]["service.name"] == "frontend"
    assert root["resource"]["deployment.environment"] == "ci"
    (client,) = tree[root["span_id"]]
    assert client["kind"] == 3 and client["attributes"]["url.full"] == "http://127.0.0.1:8081/items/42"
    (server,) = tree[client["span_id"]]
    assert server["resource"]["service.name"] == "backend"
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["end_ns"] - server["start_ns"] == 5_000_000
    # one ResourceSpans per process
    (_, req, _) = rx.trace_requests[0]
    assert len(req.resource_spans) == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_headers_arrive_as_metadata_or_http_headers(rx: OtlpReceiver, protocol: str) -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cr%3Dt,X-Tenant=team-a"}
    exp = _exporter(rx, protocol, env)
    try:
        assert exp.export(chain_trace(), processes())
    finally:
        exp.shutdown()
    (_, _, headers) = rx.trace_requests[0]
    assert headers["x-api-key"] == "s3cr=t"
    assert headers["x-tenant"] == "team-a"
    assert headers["user-agent"].startswith("kspan/")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_gzip_compression(rx: OtlpReceiver, protocol: str) -> None:
    exp = _exporter(rx, protocol, {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    try:
        assert exp.export(chain_trace(), processes())
    finally:
        exp.shutdown()
    (_, _, headers) = rx.trace_requests[0]
    if protocol != "grpc":  # gRPC consumes grpc-encoding itself and does not show it to the servicer
        assert headers["content-encoding"] == "gzip"
    assert len(rx.spans()) == 3


def test_service_name_env_overrides_every_process(rx: OtlpReceiver) -> None:
    exp = _exporter(rx, "grpc", {"OTEL_SERVICE_NAME": "checkout"})
    try:
        assert exp.export(chain_trace(), processes())
    finally:
        exp.shutdown()
    assert {s["resource"]["service.name"] for s in rx.spans()} == {"checkout"}
    assert {s["resource"]["process.pid"] for s in rx.spans()} == {101, 202}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_endpoint_returns_false_and_says_why(protocol: str) -> None:
    port = unused_port()
    (exp,) = build_exporters(load_config({}, endpoint=f"http://127.0.0.1:{port}", protocol=protocol))
    try:
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_error
        assert exp.last_failure_permanent is False  # retryable: the collector may come back
    finally:
        exp.shutdown()


def test_http_retryable_and_permanent_statuses(rx: OtlpReceiver) -> None:
    exp = _exporter(rx, "http/protobuf")
    assert isinstance(exp, OtlpHttpSpanExporter)
    try:
        rx.reject_http_status = 503
        rx.retry_after_s = 7
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_failure_permanent is False and "503" in exp.last_error
        assert exp.retry_after_s == 7.0
        rx.retry_after_s = None
        rx.reject_http_status = 401
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_failure_permanent is True and "OTEL_EXPORTER_OTLP_HEADERS" in exp.last_error
        rx.reject_http_status = None
        assert exp.export(chain_trace(), processes()) is True  # same keep-alive connection recovers
        assert exp.last_error == ""
    finally:
        exp.shutdown()


def test_grpc_retryable_and_permanent_codes(rx: OtlpReceiver) -> None:
    exp = _exporter(rx, "grpc")
    assert isinstance(exp, OtlpGrpcSpanExporter)
    try:
        rx.reject_grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_failure_permanent is False
        rx.reject_grpc_code = grpc.StatusCode.INVALID_ARGUMENT
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_failure_permanent is True and "INVALID_ARGUMENT" in exp.last_error
        rx.reject_grpc_code = None
        assert exp.export(chain_trace(), processes()) is True
    finally:
        exp.shutdown()


def test_http_reconnects_after_the_server_restarts() -> None:
    rx = OtlpReceiver().start()
    port = rx.http_port
    exp = OtlpHttpSpanExporter(load_config({}, endpoint=rx.http_endpoint, protocol="http/protobuf").traces)
    try:
        assert exp.export(chain_trace("a"), processes())
        rx.stop()
        assert exp.export(chain_trace("b"), processes()) is False
        rx = OtlpReceiver(http_port=port).start()
        assert exp.export(chain_trace("c"), processes()) is True
        assert len(rx.spans()) == 3
    finally:
        exp.shutdown()
        rx.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ipv6_loopback_endpoint(protocol: str) -> None:
    with OtlpReceiver(host="::1") as rx6:
        assert "[::1]" in rx6.grpc_endpoint
        exp = _exporter(rx6, protocol)
        try:
            assert exp.export(chain_trace(), processes()), exp.last_error
        finally:
            exp.shutdown()
        assert len(rx6.spans()) == 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_partial_success_is_delivered_but_counted_and_logged(
    rx: OtlpReceiver, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    rx.partial_rejected_spans = 2
    exp = _exporter(rx, protocol)
    try:
        with caplog.at_level("WARNING", logger="kspan.exporters"):
            assert exp.export(chain_trace(), processes()) is True  # not retryable, per the spec
    finally:
        exp.shutdown()
    assert exp.rejected_spans == 2
    assert any("rejected 2 spans: test receiver" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_endpoint_with_a_custom_ca(tmp_path, protocol: str) -> None:
    cert, key = self_signed_cert(str(tmp_path))
    with OtlpReceiver(tls=(cert, key)) as rx_tls:
        ep = rx_tls.grpc_endpoint if protocol == "grpc" else rx_tls.http_endpoint
        assert ep.startswith("https://")
        # Without trusting the CA the handshake fails: reported, retryable, never raised.
        (untrusted,) = build_exporters(load_config({}, endpoint=ep, protocol=protocol))
        try:
            assert untrusted.export(chain_trace(), processes()) is False
            assert "OTEL_EXPORTER_OTLP_CERTIFICATE" in untrusted.last_error, untrusted.last_error
        finally:
            untrusted.shutdown()
        cfg = load_config({"OTEL_EXPORTER_OTLP_CERTIFICATE": cert}, endpoint=ep, protocol=protocol)
        assert cfg.traces.insecure is False
        (exp,) = build_exporters(cfg)
        try:
            assert exp.export(chain_trace(), processes()), exp.last_error
        finally:
            exp.shutdown()
        assert len(rx_tls.spans()) == 3
