"""Translation of correlator spans and process resources into OTLP protobuf messages.

One ResourceSpans per traced process (pid): OTLP resources describe the entity that produced the
telemetry, and for kspan that is each observed process, not the agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata

from google.protobuf.descriptor import FieldDescriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from correlator.spans import AttrValue, ProcessInfo, Span
from exporters import _wire


def _package_version() -> str:
    try:
        return metadata.version("kspan")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


KSPAN_VERSION = _package_version()
SCOPE_NAME = "kspan"
SDK_ATTRIBUTES: dict[str, AttrValue] = {
    # telemetry.sdk.* names what produced the telemetry: kspan itself, written in Python.
    "telemetry.sdk.name": "kspan",
    "telemetry.sdk.language": "python",
    "telemetry.sdk.version": KSPAN_VERSION,
}


@dataclass(frozen=True)
class ResourceOverrides:
    """What the user configured for every resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)."""

    service_name: str | None = None
    attributes: Mapping[str, AttrValue] = field(default_factory=dict)


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def otlp_text(s: str) -> str:
    """A str as a proto3 `string` field may carry it: valid UTF-8, which the official decoders insist
    on for the whole message. Lone surrogates (undecodable wire bytes decoded with surrogateescape)
    become backslash escapes, as in the OTLP-JSON file's output; exporters/_wire.c does the same."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode()
    return s


def any_value(value: AttrValue) -> AnyValue:
    # bool before int: bool is an int subclass and would otherwise become int_value.
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return AnyValue(int_value=value)
        # int_value is an int64: the exact number as text beats a clamped (wrong) one or a lost batch.
    elif isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=otlp_text(str(value)))


def key_values(attributes: Mapping[str, AttrValue]) -> list[KeyValue]:
    return [KeyValue(key=otlp_text(k), value=any_value(v)) for k, v in attributes.items()]


def resource_attributes(
    pid: int, info: ProcessInfo | None, overrides: ResourceOverrides
) -> dict[str, AttrValue]:
    """The resource of one process: detected facts, then the user's OTEL_RESOURCE_ATTRIBUTES (the user
    said so explicitly, so they win), then OTEL_SERVICE_NAME (which the spec ranks above both)."""
    attrs: dict[str, AttrValue] = {}
    if info is not None:
        attrs["service.name"] = info.service_name or f"unknown_service:{info.executable_name}"
        attrs["process.pid"] = info.pid
        if info.executable_name:
            attrs["process.executable.name"] = info.executable_name
        if info.command_line:
            attrs["process.command_line"] = info.command_line
        attrs.update(info.attributes)
    else:
        # The process left before its resource was gathered: still a valid, honest resource.
        attrs["service.name"] = "unknown_service"
        attrs["process.pid"] = pid
    attrs.update(SDK_ATTRIBUTES)
    attrs.update(overrides.attributes)
    if overrides.service_name:
        attrs["service.name"] = overrides.service_name
    return attrs


class ResourceCache:
    """Resource messages by pid; a process's resource does not change while it lives."""

    def __init__(self, overrides: ResourceOverrides, max_entries: int = 4096) -> None:
        self._overrides = overrides
        self._max = max_entries
        self._cache: dict[int, tuple[ProcessInfo | None, Resource]] = {}

    def get(self, pid: int, info: ProcessInfo | None) -> Resource:
        hit = self._cache.get(pid)
        # Identity check: a reused pid arrives with a new ProcessInfo object.
        if hit is not None and hit[0] is info:
            return hit[1]
        res = Resource(attributes=key_values(resource_attributes(pid, info, self._overrides)))
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[pid] = (info, res)
        return res


_SCOPE = InstrumentationScope(name=SCOPE_NAME, version=KSPAN_VERSION)
# W3C trace-flags "sampled": kspan exports every span it builds.
_SPAN_FLAGS_SAMPLED = 0x01


def pb_span(span: Span) -> PbSpan:
    pb = PbSpan(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id or b"",
        name=otlp_text(span.name),
        kind=int(span.kind),
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=span.end_ns,
        trace_state=otlp_text(span.trace_state),
        flags=_SPAN_FLAGS_SAMPLED,
        attributes=key_values(span.attributes),
    )
    if span.status or span.status_message:
        pb.status.CopyFrom(Status(code=int(span.status), message=otlp_text(span.status_message)))
    return pb


def group_by_pid(spans: Iterable[Span]) -> dict[int, list[Span]]:
    groups: dict[int, list[Span]] = {}
    for s in spans:
        g = groups.get(s.pid)
        if g is None:
            groups[s.pid] = [s]
        else:
            g.append(s)
    return groups


def build_request(
    spans: Sequence[Span],
    processes: Mapping[int, ProcessInfo],
    resources: ResourceCache,
) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for pid, group in group_by_pid(spans).items():
        rs: ResourceSpans = req.resource_spans.add()
        rs.resource.CopyFrom(resources.get(pid, processes.get(pid)))
        ss: ScopeSpans = rs.scope_spans.add()
        ss.scope.CopyFrom(_SCOPE)
        ss.spans.extend([pb_span(s) for s in group])
    return req


# --- Fast path: the protobuf wire format written directly, by exporters/_wire.c. ---------------
# Building message objects costs ~70 us per span here (every nested assignment copies); kspan must
# export tens of thousands of spans per second on a shared core, so the hot path writes the bytes
# in C, one call per batch. Only the per-process Resource and the scope, which repeat, are encoded
# here by the official library, once each, as finished fields the C code copies in.
# tests/unit/test_otlp_proto.py checks the bytes parse to exactly what build_request() produces.

_WIRE_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: 1, FieldDescriptor.TYPE_FIXED64: 1, FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5, FieldDescriptor.TYPE_FIXED32: 5, FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_BYTES: 2, FieldDescriptor.TYPE_MESSAGE: 2,
}


def _check_field_numbers() -> None:
    # The C encoder's tags are fixed by the OTLP .proto files; fail loudly at import if they moved.
    messages = {m.DESCRIPTOR.name: m.DESCRIPTOR for m in
                (ExportTraceServiceRequest, ResourceSpans, ScopeSpans, PbSpan, KeyValue, AnyValue, Status)}
    for qualified, (number, wire_type) in _wire.FIELDS.items():
        message, _, name = qualified.partition(".")
        f = messages[message].fields_by_name[name]
        actual = (f.number, _WIRE_TYPES.get(f.type, 0))  # every other scalar type is a varint
        if actual != (number, wire_type):
            raise ImportError(f"OTLP {qualified} is field {actual[0]} of wire type {actual[1]}, "
                              f"exporters/_wire.c writes field {number} of wire type {wire_type}")


_check_field_numbers()


class WireEncoder:
    """Encodes ExportTraceServiceRequest bytes straight from correlator spans."""

    def __init__(self, overrides: ResourceOverrides) -> None:
        self.resources = ResourceCache(overrides)
        self._resource_fields: dict[int, tuple[ProcessInfo | None, bytes]] = {}
        # A message with only its first field set serializes to exactly that field: the tag, the
        # length and the bytes, as the C code splices them in.
        self._scope_field = ScopeSpans(scope=_SCOPE).SerializeToString()

    def _resource_field(self, pid: int, info: ProcessInfo | None) -> bytes:
        hit = self._resource_fields.get(pid)
        if hit is not None and hit[0] is info:
            return hit[1]
        b = ResourceSpans(resource=self.resources.get(pid, info)).SerializeToString()
        if len(self._resource_fields) >= 4096:
            self._resource_fields.clear()
        self._resource_fields[pid] = (info, b)
        return b

    def encode(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bytes:
        get = processes.get
        # Called once per pid of the batch.
        return _wire.encode_spans(spans, lambda pid: self._resource_field(pid, get(pid)), self._scope_field,
                                  _SPAN_FLAGS_SAMPLED)
