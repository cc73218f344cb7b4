"""OTLP-JSON lines: the encoding the collector's otlpjsonfile receiver reads."""

from __future__ import annotations

import base64
import json
import math

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from correlator.spans import Span, SpanKind, StatusCode
from exporters.jsonfile import JsonFileSpanExporter, json_any_value
from exporters.otlp_proto import ResourceCache, ResourceOverrides, build_request
from tests.support.sample_spans import chain_trace, many_traces, processes


def _hex_ids_to_base64(obj):
    """The OTLP/JSON ids are hex; protobuf's JSON parser expects base64 for bytes fields."""
    if isinstance(obj, dict):
        return {k: (base64.b64encode(bytes.fromhex(v)).decode()
                    if k in ("traceId", "spanId", "parentSpanId") else _hex_ids_to_base64(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_hex_ids_to_base64(x) for x in obj]
    return obj


def test_one_request_per_line_with_hex_ids_and_integer_enums(tmp_path) -> None:
    path = tmp_path / "out" / "traces.jsonl"
    exp = JsonFileSpanExporter(str(path))
    first, second = chain_trace("one", status=503), chain_trace("two")
    assert exp.export(first, processes())
    # Flushed per batch: readable before shutdown.
    assert len(path.read_text().splitlines()) == 1
    assert exp.export(second, processes())
    exp.shutdown()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    doc = json.loads(lines[0])
    spans = [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert {s["traceId"] for s in spans} == {first[0].trace_id.hex()}
    root = next(s for s in spans if "parentSpanId" not in s)
    assert root["spanId"] == first[2].span_id.hex()
    assert root["kind"] == 2 and root["status"]["code"] == 2
    assert root["startTimeUnixNano"] == str(first[2].start_ns)
    attrs = {a["key"]: a["value"] for a in root["attributes"]}
    assert attrs["http.response.status_code"] == {"intValue": "503"}
    assert attrs["http.request.method"] == {"stringValue": "GET"}
    res = {a["key"]: a["value"] for a in doc["resourceSpans"][0]["resource"]["attributes"]}
    assert "service.name" in res and "process.pid" in res


def test_lines_parse_back_to_the_same_otlp_request(tmp_path) -> None:
    spans = many_traces(5)
    spans.append(Span(trace_id=b"\xab" * 16, span_id=b"\xcd" * 8, parent_span_id=None, name="ünï",
                      kind=SpanKind.CLIENT, start_ns=1, end_ns=2, pid=5,
                      attributes={"f": 1.5, "b": True, "neg": -7}, status=StatusCode.OK,
                      status_message="fine", trace_state="x=y"))
    path = tmp_path / "t.jsonl"
    ov = ResourceOverrides(attributes={"deployment.environment": "test"})
    exp = JsonFileSpanExporter(str(path), ov)
    assert exp.export(spans, processes())
    exp.shutdown()
    parsed = json_format.ParseDict(_hex_ids_to_base64(json.loads(path.read_text())), ExportTraceServiceRequest())
    assert parsed == build_request(spans, processes(), ResourceCache(ov))


def test_non_finite_doubles_stay_valid_json() -> None:
    assert json_any_value(math.inf) == {"doubleValue": "Infinity"}
    assert json_any_value(math.nan) == {"doubleValue": "NaN"}
    assert json_any_value(True) == {"boolValue": True}


def test_undecodable_text_does_not_lose_the_batch(tmp_path) -> None:
    raw = b"/caf\xe9".decode("utf-8", "surrogateescape")  # how raw wire bytes may reach a string
    span = chain_trace()[2]
    span.attributes["url.path"] = raw
    path = tmp_path / "t.jsonl"
    exp = JsonFileSpanExporter(str(path))
    assert exp.export([span], processes())
    exp.shutdown()
    doc = json.loads(path.read_text())
    attrs = {a["key"]: a["value"] for a in doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"]}
    assert attrs["url.path"]["stringValue"].startswith("/caf")


def test_file_appends_across_runs(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    for seed in ("a", "b"):
        exp = JsonFileSpanExporter(str(path))
        assert exp.export(chain_trace(seed), processes())
        exp.shutdown()
    assert len(path.read_text().splitlines()) == 2
    assert exp.export(chain_trace("c"), processes()) is False  # closed: reported, not raised


def test_fast_text_line_equals_the_reference_dict_encoding() -> None:
    from exporters.jsonfile import JsonRequestBuilder

    spans = many_traces(3)
    spans.append(Span(trace_id=b"\x10" * 16, span_id=b"\x20" * 8, parent_span_id=b"\x30" * 8,
                      name='GET /"quoted"\\path\n\t\x01', kind=SpanKind.SERVER, start_ns=10, end_ns=20, pid=101,
                      attributes={"user_agent.original": 'a "b" \\ c', "x": 1.0, "y": False, "z": 2**63 - 1},
                      status=StatusCode.ERROR, status_message="bad\nthing", trace_state="k=v"))
    b = JsonRequestBuilder(ResourceOverrides(service_name="svc"))
    line = b.line(spans, processes())
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == b.request(spans, processes())
