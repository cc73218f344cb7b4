"""Translation of correlator spans and process resources into OTLP protobuf messages.

One ResourceSpans per traced process (pid): OTLP resources describe the entity that produced the
telemetry, and for kspan that is each observed process, not the agent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from correlator.spans import AttrValue, ProcessInfo, Span


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


def any_value(value: AttrValue) -> AnyValue:
    # bool before int: bool is an int subclass and would otherwise become int_value.
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def key_values(attributes: Mapping[str, AttrValue]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


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
    attrs = span.attributes
    pb = PbSpan(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id or b"",
        name=span.name,
        kind=int(span.kind),
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=span.end_ns,
        trace_state=span.trace_state,
        flags=_SPAN_FLAGS_SAMPLED,
        attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()],
    )
    if span.status or span.status_message:
        pb.status.CopyFrom(Status(code=int(span.status), message=span.status_message))
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


# --- Fast path: the protobuf wire format written directly. ------------------------------------
# Building message objects costs ~70 us per span here (every nested assignment copies); kspan must
# export tens of thousands of spans per second on a shared core, so the hot path writes the bytes
# itself, caching the encoded form of repeated attribute pairs and of each process's resource.
# tests/unit/test_otlp_proto.py checks it parses to exactly what build_request() produces.

_U32 = struct.Struct("<I")
_TIMES = struct.Struct("<BQBQ")  # tags of start_time_unix_nano (7) and end_time_unix_nano (8), fixed64
_DOUBLE = struct.Struct("<d")


def _varint_slow(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = tuple(_varint_slow(i) for i in range(1 << 14))


def _varint(n: int) -> bytes:
    if 0 <= n < 16384:
        return _SMALL_VARINTS[n]
    return _varint_slow(n)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _any_value_bytes(value: AttrValue) -> bytes:
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return _len_field(b"\x0a", str(value).encode("utf-8", "surrogateescape"))


def _key_value_field(tag: bytes, key: str, value: AttrValue) -> bytes:
    kv = _len_field(b"\x0a", key.encode()) + _len_field(b"\x12", _any_value_bytes(value))
    return _len_field(tag, kv)


class _AttrCache:
    """Encoded `attributes` fields by (key, value) for strings, (key, type, value) otherwise;
    bounded, cleared when full."""

    __slots__ = ("_d", "_max")

    def __init__(self, max_entries: int = 16384) -> None:
        self._d: dict[tuple, bytes] = {}
        self._max = max_entries

    def field(self, key: str, value: AttrValue) -> bytes:
        # The type is part of a non-string key because True == 1 and 1 == 1.0 hash alike; a
        # string's key is the (key, value) pair dict.items() hands out already (two items, so it
        # never equals a three-item key).
        ck = (key, value) if type(value) is str else (key, type(value), value)
        b = self._d.get(ck)
        if b is None:
            b = _key_value_field(b"\x4a", key, value)
            if len(self._d) >= self._max:
                self._d.clear()
            self._d[ck] = b
        return b


def _check_field_numbers() -> None:
    # The encoder's tags are fixed by the OTLP .proto files; fail loudly at import if they moved.
    f = PbSpan.DESCRIPTOR.fields_by_name
    expected = {"trace_id": 1, "span_id": 2, "trace_state": 3, "parent_span_id": 4, "name": 5,
                "kind": 6, "start_time_unix_nano": 7, "end_time_unix_nano": 8, "attributes": 9,
                "status": 15, "flags": 16}
    for name, number in expected.items():
        if f[name].number != number:
            raise ImportError(f"OTLP Span.{name} is field {f[name].number}, kspan's encoder expects {number}")


_check_field_numbers()
_FLAGS_FIELD = b"\x85\x01" + _U32.pack(_SPAN_FLAGS_SAMPLED)


class WireEncoder:
    """Encodes ExportTraceServiceRequest bytes straight from correlator spans."""

    def __init__(self, overrides: ResourceOverrides) -> None:
        self.resources = ResourceCache(overrides)
        self._attrs = _AttrCache()
        self._resource_fields: dict[int, tuple[ProcessInfo | None, bytes]] = {}
        self._scope_field = _len_field(b"\x0a", _SCOPE.SerializeToString())

    def _resource_field(self, pid: int, info: ProcessInfo | None) -> bytes:
        hit = self._resource_fields.get(pid)
        if hit is not None and hit[0] is info:
            return hit[1]
        b = _len_field(b"\x0a", self.resources.get(pid, info).SerializeToString())
        if len(self._resource_fields) >= 4096:
            self._resource_fields.clear()
        self._resource_fields[pid] = (info, b)
        return b

    def span_bytes(self, s: Span) -> bytes:
        cache = self._attrs
        memo = cache._d
        tid, sid, pid = s.trace_id, s.span_id, s.parent_span_id
        # Lengths are written from the values, not assumed: a malformed id must cost one span's
        # validity at the collector, not corrupt the framing of the whole request.
        if len(tid) == 16 and len(sid) == 8:
            parts = [b"\x0a\x10" + tid + b"\x12\x08" + sid]
        else:
            parts = [b"\x0a" + _varint(len(tid)) + tid + b"\x12" + _varint(len(sid)) + sid]
        if s.trace_state:
            parts.append(_len_field(b"\x1a", s.trace_state.encode()))
        if pid:
            parts.append(b"\x22" + _varint(len(pid)) + pid)
        name = s.name.encode("utf-8", "surrogateescape")
        parts.append(b"\x2a" + _varint(len(name)) + name + b"\x30" + _SMALL_VARINTS[s.kind]
                     + _TIMES.pack(0x39, s.start_ns, 0x41, s.end_ns))
        append = parts.append
        for kv in s.attributes.items():
            v = kv[1]
            b = memo.get(kv if type(v) is str else (kv[0], type(v), v))
            append(b if b is not None else cache.field(kv[0], v))
        if s.status or s.status_message:
            st = b""
            if s.status_message:
                st = _len_field(b"\x12", s.status_message.encode("utf-8", "surrogateescape"))
            if s.status:
                st += b"\x18" + _SMALL_VARINTS[s.status]
            append(_len_field(b"\x7a", st))
        append(_FLAGS_FIELD)
        return b"".join(parts)

    def encode(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bytes:
        out: list[bytes] = []
        span_bytes = self.span_bytes
        for pid, group in group_by_pid(spans).items():
            body = [self._scope_field]
            for s in group:
                sb = span_bytes(s)
                body.append(b"\x12")
                body.append(_varint(len(sb)))
                body.append(sb)
            scope_spans = b"".join(body)
            rs = self._resource_field(pid, processes.get(pid)) + _len_field(b"\x12", scope_spans)
            out.append(_len_field(b"\x0a", rs))
        return b"".join(out)
