"""Exporter configuration from the OTEL_* environment and kspan's flags."""

from __future__ import annotations

import pytest

from exporters.config import (
    DEFAULT_METRICS_OUTPUT,
    DEFAULT_OUTPUT,
    ConfigError,
    build_exporters,
    load_config,
)
from exporters.console import ConsoleSpanExporter
from exporters.jsonfile import JsonFileSpanExporter
from exporters.otlp_grpc import OtlpGrpcSpanExporter
from exporters.otlp_http import OtlpHttpSpanExporter


def test_no_endpoint_is_the_embedded_default() -> None:
    cfg = load_config({})
    assert cfg.traces is None and cfg.metrics is None
    assert cfg.console is True
    assert cfg.output == DEFAULT_OUTPUT
    assert cfg.metrics_output == DEFAULT_METRICS_OUTPUT


def test_base_endpoint_http_appends_signal_paths() -> None:
    cfg = load_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
                       "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert cfg.traces is not None and cfg.metrics is not None
    assert cfg.traces.endpoint == "http://collector:4318/v1/traces"
    assert cfg.metrics.endpoint == "http://collector:4318/v1/metrics"
    assert cfg.console is False and cfg.output is None


def test_per_signal_endpoint_is_used_as_is_and_wins_over_base() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom/path",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    cfg = load_config(env)
    assert cfg.traces.endpoint == "http://traces:9999/custom/path"
    assert cfg.metrics.endpoint == "http://base:4318/v1/metrics"


def test_flags_win_over_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env:4318/v1/traces",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    cfg = load_config(env, endpoint="http://flag:4317", protocol="grpc", output="x.jsonl")
    assert cfg.traces.protocol == "grpc"
    assert cfg.traces.endpoint == "http://flag:4317"
    assert cfg.traces.grpc_target == "flag:4317"
    assert cfg.output == "x.jsonl"  # --output given explicitly: the file is written besides OTLP


def test_per_signal_protocol_and_headers_take_precedence() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20tok,x-tenant=t1"}
    cfg = load_config(env)
    assert cfg.traces.protocol == "http/protobuf"
    assert cfg.metrics.protocol == "grpc"
    assert cfg.traces.headers == (("authorization", "Bearer tok"), ("x-tenant", "t1"))
    assert cfg.metrics.headers == (("a", "1"),)


def test_protocol_guessed_from_the_well_known_port() -> None:
    assert load_config({}, endpoint="http://localhost:4317").traces.protocol == "grpc"
    assert load_config({}, endpoint="http://localhost:4318").traces.protocol == "http/protobuf"


def test_timeout_compression_and_tls_choice() -> None:
    cfg = load_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317", "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
                       "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    assert cfg.traces.timeout_s == 2.5
    assert cfg.traces.compression == "gzip"
    assert cfg.traces.insecure is False
    plain = load_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert plain.traces.insecure is True
    no_scheme = load_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"})
    assert no_scheme.traces.insecure is True and no_scheme.traces.protocol == "grpc"


def test_service_name_and_resource_attributes() -> None:
    cfg = load_config({"OTEL_SERVICE_NAME": "shop",
                       "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%2Cb"})
    assert cfg.resource.service_name == "shop"
    assert dict(cfg.resource.attributes) == {"deployment.environment": "prod", "team": "a,b"}
    assert load_config({}).resource.service_name is None


@pytest.mark.parametrize(
    ("env", "flags", "needle"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}, {"endpoint": "http://c:4318"}, "grpc' or 'http/protobuf"),
        ({}, {"endpoint": "http://c:4318", "protocol": "http/json"}, "unknown OTLP protocol"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, {"endpoint": "http://c:4318"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "=v"}, {"endpoint": "http://c:4318"}, "malformed entry"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "k=caf%C3%A9"}, {"endpoint": "http://c:4318"}, "not ASCII"),
        ({}, {"endpoint": "ftp://c:4318"}, "unsupported scheme"),
        ({}, {"endpoint": "http://c:notaport"}, "malformed endpoint"),
        ({}, {"endpoint": "http://:4318"}, "no host"),
        ({}, {"endpoint": "c:4318", "protocol": "http/protobuf"}, "write http://c:4318"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, {"endpoint": "http://c:4318"}, "milliseconds"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "broken"}, {}, "OTEL_RESOURCE_ATTRIBUTES"),
    ],
)
def test_bad_configuration_raises_an_actionable_error(env: dict, flags: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env, **flags)
    assert needle in str(e.value)


def test_build_exporters_matches_the_configuration(tmp_path) -> None:
    out = str(tmp_path / "spans.jsonl")
    grpc_cfg = load_config({}, endpoint="http://127.0.0.1:4317", output=out)
    kinds = [type(e) for e in build_exporters(grpc_cfg)]
    assert kinds == [OtlpGrpcSpanExporter, JsonFileSpanExporter]
    http_cfg = load_config({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, endpoint="http://127.0.0.1:4318")
    assert [type(e) for e in build_exporters(http_cfg)] == [OtlpHttpSpanExporter]
    default = load_config({}, output=out)
    exps = build_exporters(default)
    assert [type(e) for e in exps] == [ConsoleSpanExporter, JsonFileSpanExporter]
    for e in exps:
        e.shutdown()


def test_unwritable_output_is_a_config_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot open for writing"):
        build_exporters(load_config({}, output=str(blocker / "sub" / "x.jsonl")))
