"""OTLP translation: resource per process, attribute types, and the fast wire encoder's exactness."""

from __future__ import annotations

import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode
from exporters.otlp_proto import (
    KSPAN_VERSION,
    ResourceCache,
    ResourceOverrides,
    WireEncoder,
    build_request,
    resource_attributes,
)
from tests.support.otlp_receiver import flatten_spans
from tests.support.sample_spans import chain_trace, many_traces, processes


def _attrs(kvs) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


def test_one_resource_per_process_with_process_and_sdk_attributes() -> None:
    req = build_request(chain_trace(), processes(), ResourceCache(ResourceOverrides()))
    assert len(req.resource_spans) == 2
    by_service = {_attrs(rs.resource.attributes)["service.name"]: rs for rs in req.resource_spans}
    assert set(by_service) == {"frontend", "backend"}
    fe = _attrs(by_service["frontend"].resource.attributes)
    assert fe["process.pid"] == 101
    assert fe["process.executable.name"] == "python3"
    assert fe["process.command_line"] == "python3 frontend.py --port 8080"
    assert fe["host.name"] == "node-1" and fe["k8s.pod.name"] == "frontend-abc"
    assert fe["telemetry.sdk.name"] == "kspan"
    assert fe["telemetry.sdk.language"] == "python"
    assert fe["telemetry.sdk.version"] == KSPAN_VERSION
    assert len(by_service["frontend"].scope_spans[0].spans) == 2
    assert len(by_service["backend"].scope_spans[0].spans) == 1
    scope = by_service["backend"].scope_spans[0].scope
    assert (scope.name, scope.version) == ("kspan", KSPAN_VERSION)


def test_user_resource_attributes_merge_and_service_name_override() -> None:
    info = processes()[101]
    plain = resource_attributes(101, info, ResourceOverrides(attributes={"deployment.environment": "prod"}))
    assert plain["service.name"] == "frontend"
    assert plain["deployment.environment"] == "prod"
    forced = resource_attributes(101, info, ResourceOverrides(service_name="shop"))
    assert forced["service.name"] == "shop"
    assert forced["process.pid"] == 101


def test_process_gone_before_export_still_gets_an_honest_resource() -> None:
    attrs = resource_attributes(999, None, ResourceOverrides())
    assert attrs["service.name"] == "unknown_service"
    assert attrs["process.pid"] == 999


def test_span_fields_kinds_status_and_attribute_types() -> None:
    s = Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), parent_span_id=None, name="GET",
             kind=SpanKind.CLIENT, start_ns=5, end_ns=9, pid=1,
             attributes={"b": True, "i": 7, "neg": -3, "f": 0.5, "s": "x", "u": "héllo"},
             status=StatusCode.ERROR, status_message="boom", trace_state="k=v")
    req = build_request([s], {}, ResourceCache(ResourceOverrides()))
    pb = req.resource_spans[0].scope_spans[0].spans[0]
    assert pb.kind == 3 and pb.status.code == 2 and pb.status.message == "boom"
    assert pb.parent_span_id == b"" and pb.trace_state == "k=v"
    assert pb.start_time_unix_nano == 5 and pb.end_time_unix_nano == 9
    a = {kv.key: kv.value for kv in pb.attributes}
    assert a["b"].WhichOneof("value") == "bool_value" and a["b"].bool_value is True
    assert a["i"].WhichOneof("value") == "int_value" and a["i"].int_value == 7
    assert a["neg"].int_value == -3
    assert a["f"].WhichOneof("value") == "double_value"
    assert a["u"].string_value == "héllo"


def test_wire_encoder_parses_to_exactly_the_message_build_request_makes() -> None:
    spans = many_traces(20)
    spans.append(Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=b"\x03" * 8,
                      name="POST /ü", kind=SpanKind.SERVER, start_ns=2**62, end_ns=2**63 - 1, pid=7,
                      attributes={"b": False, "big": 2**40, "neg": -(2**40), "f": -1.25, "e": ""},
                      status=StatusCode.OK, status_message="", trace_state="a=b"))
    # A malformed (short) id from an upstream bug stays one bad span, not a corrupt request.
    spans.append(Span(trace_id=b"\x05" * 4, span_id=b"\x06" * 3, parent_span_id=b"\x07", name="x",
                      kind=SpanKind.CLIENT, start_ns=1, end_ns=2, pid=7))
    procs = processes()
    ov = ResourceOverrides(service_name=None, attributes={"deployment.environment": "test"})
    expected = build_request(spans, procs, ResourceCache(ov))
    enc = WireEncoder(ov)
    for _ in range(2):  # the second run is served from the encoder's caches
        got = ExportTraceServiceRequest.FromString(enc.encode(spans, procs))
        assert got == expected


def test_wire_encoder_sees_a_reused_pid_as_a_new_process() -> None:
    enc = WireEncoder(ResourceOverrides())
    span = chain_trace()[2]
    first = flatten_spans(ExportTraceServiceRequest.FromString(enc.encode([span], processes())), "x")
    reborn = {101: ProcessInfo(pid=101, service_name="other", executable_name="other", command_line="other")}
    second = flatten_spans(ExportTraceServiceRequest.FromString(enc.encode([span], reborn)), "x")
    assert first[0]["resource"]["service.name"] == "frontend"
    assert second[0]["resource"]["service.name"] == "other"


def test_wire_encoding_cost_per_span_is_small() -> None:
    spans = many_traces(200)  # 600 spans
    procs = processes()
    enc = WireEncoder(ResourceOverrides())
    enc.encode(spans, procs)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        enc.encode(spans, procs)
        best = min(best, (time.perf_counter() - t0) / len(spans))
    # ~3-4 us here; a generous bound so a loaded CI core does not flake, still far below the
    # ~35-70 us of building message objects.
    assert best < 25e-6, f"{best * 1e6:.1f} us per span"
