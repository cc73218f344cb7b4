"""OTLP/HTTP (binary protobuf) span exporter over one keep-alive connection."""

from __future__ import annotations

import gzip
import http.client
import logging
import ssl
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from correlator.spans import ProcessInfo, Span
from exporters.config import OtlpTarget
from exporters.otlp_proto import KSPAN_VERSION, ResourceOverrides, WireEncoder

log = logging.getLogger("kspan.exporters")

# The OTLP/HTTP spec: only these answers mean "try the same request again later".
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_TLS_HINT = (" (for a private CA set OTEL_EXPORTER_OTLP_CERTIFICATE to its PEM file; "
             "use http:// if the collector does not speak TLS)")


def _rpc_status_message(body: bytes) -> str:
    """Error bodies are google.rpc.Status protobufs; show their message when there is one."""
    if not body:
        return ""
    try:
        from google.rpc import status_pb2

        st = status_pb2.Status.FromString(body)
        if st.message:
            return st.message
    except (ImportError, DecodeError):
        pass
    return body[:200].decode("utf-8", "replace")


class OtlpHttpSpanExporter:
    """POSTs ExportTraceServiceRequest protobufs. Never raises; False means "not delivered"."""

    def __init__(self, target: OtlpTarget, resource: ResourceOverrides | None = None) -> None:
        self.target = target
        self.url = target.endpoint
        u = urlsplit(self.url)
        self._https = u.scheme == "https"
        self._host = u.hostname or "localhost"
        self._port = u.port or (443 if self._https else 80)
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"kspan/{KSPAN_VERSION}",
        }
        if target.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        for k, v in target.headers:
            self._headers[k] = v
        self._encoder = WireEncoder(resource or ResourceOverrides())
        self._conn: http.client.HTTPConnection | None = None
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=target.certificate)
        self.last_error = ""
        # Set when the endpoint refused the batch for good (a 4xx other than 429): retrying the same
        # bytes cannot succeed, so the pipeline drops and counts it instead of blocking the queue.
        self.last_failure_permanent = False
        self.outage_hint = "check --otlp-endpoint / that the collector is running"
        self.rejected_spans = 0  # partial-success rejections reported by the endpoint
        self.retry_after_s = 0.0  # the endpoint's Retry-After on the last failure (0: none)

    def describe(self) -> str:
        return f"OTLP/HTTP endpoint {self.url}"

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.target.timeout_s, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.target.timeout_s)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def export_bytes(self, body: bytes, n_spans: int) -> bool:
        self.last_failure_permanent = False
        self.retry_after_s = 0.0
        if self.target.compression == "gzip":
            body = gzip.compress(body, compresslevel=5)
        # One retry on a fresh connection: a keep-alive connection the server closed while idle fails
        # on first use, and that is not an outage.
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                retry_after = resp.getheader("Retry-After", "")
                if resp.getheader("Connection", "").lower() == "close":
                    self._close()
            except (OSError, http.client.HTTPException) as e:
                self._close()
                if attempt == 0 and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError,
                                                   ConnectionResetError)):
                    continue
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, ssl.SSLError):
                    self.last_error += _TLS_HINT
                return False
            break
        if 200 <= status < 300:
            self._partial_success(data)
            self.last_error = ""
            return True
        msg = _rpc_status_message(data)
        self.last_error = f"HTTP {status}" + (f": {msg}" if msg else "")
        # The OTLP/HTTP spec: honour Retry-After (delay-seconds form) on 429 and 503.
        self.retry_after_s = float(retry_after) if retry_after.strip().isdigit() else 0.0
        if status not in RETRYABLE_STATUS:
            self.last_failure_permanent = True
            hint = ""
            if status in (401, 403):
                hint = " (check OTEL_EXPORTER_OTLP_HEADERS for the credentials the endpoint expects)"
            elif status == 404:
                hint = " (check the URL path: OTLP/HTTP traces go to /v1/traces)"
            self.last_error += hint
        return False

    def _partial_success(self, data: bytes) -> None:
        if not data:
            return
        try:
            resp = ExportTraceServiceResponse.FromString(data)
        except DecodeError:
            return
        ps = resp.partial_success
        if ps.rejected_spans or ps.error_message:
            self.rejected_spans += ps.rejected_spans
            # Partial success is not retryable (spec): count it and tell the user why.
            log.warning(
                "kspan: %s rejected %d spans: %s",
                self.describe(), ps.rejected_spans, ps.error_message or "(no reason given)",
            )

    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        try:
            body = self._encoder.encode(spans, processes)
        except Exception as e:  # a span the encoder cannot represent must not kill the exporter thread
            self.last_error = f"cannot encode spans: {e!r}"
            self.last_failure_permanent = True
            log.exception("kspan: bug: could not encode %d spans for OTLP", len(spans))
            return False
        return self.export_bytes(body, len(spans))

    def shutdown(self) -> None:
        self._close()
