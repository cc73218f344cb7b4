"""OTLP-JSON lines: one ExportTraceServiceRequest per line, as the collector's otlpjsonfile receiver reads.

The OTLP/JSON encoding differs from protobuf's canonical JSON mapping in two ways the collector
insists on: trace and span ids are hex strings (not base64) and enums are integers. Field names are
lowerCamelCase and 64-bit integers are decimal strings, as the protobuf JSON mapping says.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from correlator.spans import AttrValue, ProcessInfo, Span
from exporters.otlp_proto import (
    _SPAN_FLAGS_SAMPLED,
    KSPAN_VERSION,
    SCOPE_NAME,
    ResourceOverrides,
    group_by_pid,
    resource_attributes,
)

log = logging.getLogger("kspan.exporters")

# The C string encoder json.dumps uses (ensure_ascii=False flavour): quotes and escapes one string.
_jstr: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]


def json_any_value(value: AttrValue) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"doubleValue": value}
        return {"doubleValue": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
    return {"stringValue": str(value)}


def json_attributes(attrs: Mapping[str, AttrValue]) -> list[dict[str, Any]]:
    return [{"key": k, "value": json_any_value(v)} for k, v in attrs.items()]


def json_span(s: Span) -> dict[str, Any]:
    d: dict[str, Any] = {"traceId": s.trace_id.hex(), "spanId": s.span_id.hex()}
    if s.trace_state:
        d["traceState"] = s.trace_state
    if s.parent_span_id:
        d["parentSpanId"] = s.parent_span_id.hex()
    d["flags"] = _SPAN_FLAGS_SAMPLED
    d["name"] = s.name
    d["kind"] = int(s.kind)
    d["startTimeUnixNano"] = str(s.start_ns)
    d["endTimeUnixNano"] = str(s.end_ns)
    if s.attributes:
        d["attributes"] = json_attributes(s.attributes)
    if s.status or s.status_message:
        st: dict[str, Any] = {}
        if s.status_message:
            st["message"] = s.status_message
        if s.status:
            st["code"] = int(s.status)
        d["status"] = st
    return d


class JsonRequestBuilder:
    """TracesData / ExportTraceServiceRequest as an OTLP/JSON dict, resources cached per process."""

    def __init__(self, overrides: ResourceOverrides) -> None:
        self._overrides = overrides
        self._resources: dict[int, tuple[ProcessInfo | None, dict[str, Any]]] = {}
        self._scope = {"name": SCOPE_NAME, "version": KSPAN_VERSION}
        self._scope_text = json.dumps(self._scope, separators=(",", ":"))
        self._resource_text: dict[int, tuple[ProcessInfo | None, str]] = {}
        self._attr_cache: dict[tuple[str, type, AttrValue], str] = {}

    def _resource(self, pid: int, info: ProcessInfo | None) -> dict[str, Any]:
        hit = self._resources.get(pid)
        if hit is not None and hit[0] is info:
            return hit[1]
        res = {"attributes": json_attributes(resource_attributes(pid, info, self._overrides))}
        if len(self._resources) >= 4096:
            self._resources.clear()
        self._resources[pid] = (info, res)
        return res

    def request(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> dict[str, Any]:
        return {
            "resourceSpans": [
                {
                    "resource": self._resource(pid, processes.get(pid)),
                    "scopeSpans": [{"scope": self._scope, "spans": [json_span(s) for s in group]}],
                }
                for pid, group in group_by_pid(spans).items()
            ]
        }

    def line(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> str:
        """request() as one JSON line, written as text directly: json.dumps of the dict tree costs
        ~4x more per span, and this file is the default output."""
        out = []
        for pid, group in group_by_pid(spans).items():
            info = processes.get(pid)
            hit = self._resource_text.get(pid)
            if hit is None or hit[0] is not info:
                text = json.dumps(self._resource(pid, info), separators=(",", ":"), ensure_ascii=False)
                if len(self._resource_text) >= 4096:
                    self._resource_text.clear()
                self._resource_text[pid] = hit = (info, text)
            span_text = ",".join([self._span_text(s) for s in group])
            out.append(f'{{"resource":{hit[1]},"scopeSpans":[{{"scope":{self._scope_text},"spans":[{span_text}]}}]}}')
        return '{"resourceSpans":[' + ",".join(out) + "]}\n"

    def _attr_text(self, key: str, value: AttrValue) -> str:
        ck = (key, type(value), value)
        t = self._attr_cache.get(ck)
        if t is None:
            t = json.dumps({"key": key, "value": json_any_value(value)}, separators=(",", ":"), ensure_ascii=False)
            if len(self._attr_cache) >= 16384:
                self._attr_cache.clear()
            self._attr_cache[ck] = t
        return t

    def _span_text(self, s: Span) -> str:
        parts = ['{"traceId":"', s.trace_id.hex(), '","spanId":"', s.span_id.hex(), '"']
        if s.trace_state:
            parts.append(',"traceState":' + _jstr(s.trace_state))
        if s.parent_span_id:
            parts.append(',"parentSpanId":"' + s.parent_span_id.hex() + '"')
        parts.append(f',"flags":{_SPAN_FLAGS_SAMPLED},"name":{_jstr(s.name)},"kind":{int(s.kind)},'
                     f'"startTimeUnixNano":"{s.start_ns}","endTimeUnixNano":"{s.end_ns}"')
        if s.attributes:
            attr = self._attr_text
            parts.append(',"attributes":[' + ",".join([attr(k, v) for k, v in s.attributes.items()]) + "]")
        if s.status or s.status_message:
            st = []
            if s.status_message:
                st.append('"message":' + _jstr(s.status_message))
            if s.status:
                st.append(f'"code":{int(s.status)}')
            parts.append(',"status":{' + ",".join(st) + "}")
        parts.append("}")
        return "".join(parts)


def open_output(path: str) -> IO[str]:
    """Open (append) a JSON-lines output; OSError is the caller's to turn into a user-facing error."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    # backslashreplace: a lone surrogate (undecodable bytes from the wire) becomes a valid JSON escape
    # instead of an encoding error that would lose the whole batch.
    return open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1 << 16)


class JsonFileSpanExporter:
    """Appends one OTLP/JSON line per batch to a file and flushes it, so `tail -f` and the collector's
    otlpjsonfile receiver see every batch as soon as it is exported."""

    def __init__(self, path: str, resource: ResourceOverrides | None = None) -> None:
        self.path = path
        self._f: IO[str] | None = open_output(path)
        self._builder = JsonRequestBuilder(resource or ResourceOverrides())
        self.last_error = ""
        self.last_failure_permanent = False
        self.outage_hint = "check free disk space and write permission of the --output path"
        self._broken_line = False

    def describe(self) -> str:
        return f"span file {self.path}"

    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        if not spans:
            return True
        if self._f is None:
            self.last_error = "file is closed"
            return False
        try:
            line = self._builder.line(spans, processes)
        except Exception as e:
            self.last_error = f"cannot encode spans: {e!r}"
            self.last_failure_permanent = True
            log.exception("kspan: bug: could not encode %d spans as OTLP/JSON", len(spans))
            return False
        try:
            if self._broken_line:
                # A failed write (disk full) may have left half a line: end it so the next is whole.
                line = "\n" + line
            self._f.write(line)
            self._f.flush()
        except OSError as e:
            self._broken_line = True
            self.last_error = f"cannot write {self.path}: {e.strerror or e}"
            return False
        self._broken_line = False
        self.last_error = ""
        return True

    def shutdown(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
