"""A real OTLP endpoint for tests: gRPC (the official opentelemetry-proto services) and OTLP/HTTP.

    with OtlpReceiver() as rx:
        run_agent(env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.grpc_endpoint})
        spans = rx.wait_for_spans(lambda ss: len(ss) >= 3, timeout_s=10)

Both servers listen on 127.0.0.1 (ephemeral ports unless given, so a test can stop a receiver and
start a new one on the same port: "the collector is down, then back").
"""

from __future__ import annotations

import gzip
import socket
import ssl
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SpanDict = dict[str, Any]
MetricDict = dict[str, Any]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, which)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def flatten_spans(req: trace_service_pb2.ExportTraceServiceRequest, transport: str) -> list[SpanDict]:
    out: list[SpanDict] = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append({
                    "trace_id": sp.trace_id.hex(),
                    "span_id": sp.span_id.hex(),
                    "parent_span_id": sp.parent_span_id.hex(),
                    "name": sp.name,
                    "kind": sp.kind,
                    "start_ns": sp.start_time_unix_nano,
                    "end_ns": sp.end_time_unix_nano,
                    "attributes": _attrs(sp.attributes),
                    "status_code": sp.status.code,
                    "status_message": sp.status.message,
                    "trace_state": sp.trace_state,
                    "flags": sp.flags,
                    "resource": resource,
                    "scope": {"name": ss.scope.name, "version": ss.scope.version},
                    "transport": transport,
                })
    return out


def flatten_metrics(req: metrics_service_pb2.ExportMetricsServiceRequest, transport: str) -> list[MetricDict]:
    """One dict per data point: name, unit, type, attributes, resource and the point's values."""
    out: list[MetricDict] = []
    for rm in req.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                base = {"name": m.name, "unit": m.unit, "description": m.description, "type": kind,
                        "resource": resource, "scope": sm.scope.name, "transport": transport}
                data = getattr(m, kind) if kind else None
                if data is None:
                    continue
                for p in data.data_points:
                    d = dict(base)
                    d["attributes"] = _attrs(p.attributes)
                    d["start_ns"] = p.start_time_unix_nano
                    d["time_ns"] = p.time_unix_nano
                    if kind == "histogram":
                        d.update(count=p.count, sum=p.sum, bucket_counts=list(p.bucket_counts),
                                 explicit_bounds=list(p.explicit_bounds),
                                 temporality=data.aggregation_temporality)
                    elif kind == "exponential_histogram":
                        d.update(count=p.count, sum=p.sum, temporality=data.aggregation_temporality)
                    elif kind == "summary":
                        d.update(count=p.count, sum=p.sum)
                    else:
                        d["value"] = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        if kind == "sum":
                            d["monotonic"] = data.is_monotonic
                            d["temporality"] = data.aggregation_temporality
                    out.append(d)
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, rx: OtlpReceiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (grpc's name)
        code = self.rx.reject_grpc_code
        if code is not None:
            context.abort(code, "rejected by the test receiver")
        self.rx._add_traces(request, "grpc", dict(context.invocation_metadata()))
        return self.rx._trace_response()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, rx: OtlpReceiver) -> None:
        self.rx = rx

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        code = self.rx.reject_grpc_code
        if code is not None:
            context.abort(code, "rejected by the test receiver")
        self.rx._add_metrics(request, "grpc", dict(context.invocation_metadata()))
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _make_http_handler(rx: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as collectors do

        def log_message(self, format: str, *args: Any) -> None:  # silence per-request stderr lines
            pass

        def setup(self) -> None:
            super().setup()
            with rx._cond:
                rx._http_conns.add(self.connection)

        def finish(self) -> None:
            with rx._cond:
                rx._http_conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def _reply(self, status: int, body: bytes = b"", ctype: str = "application/x-protobuf") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.split("?", 1)[0]
            if path not in ("/v1/traces", "/v1/metrics"):
                self._reply(404, b"unknown path", "text/plain")
                return
            if rx.reject_http_status is not None:
                self.send_response(rx.reject_http_status)
                body = b"rejected by the test receiver"
                if rx.retry_after_s is not None:
                    self.send_header("Retry-After", str(rx.retry_after_s))
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            enc = (self.headers.get("Content-Encoding") or "").lower()
            try:
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
            except (OSError, zlib.error, EOFError):
                self._reply(400, b"bad compressed body", "text/plain")
                return
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/x-protobuf":
                self._reply(415, b"only application/x-protobuf", "text/plain")
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                if path == "/v1/traces":
                    req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    rx._add_traces(req, "http", headers)
                    resp = rx._trace_response().SerializeToString()
                else:
                    mreq = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                    rx._add_metrics(mreq, "http", headers)
                    resp = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            except DecodeError:
                rx.decode_errors += 1
                self._reply(400, b"cannot decode protobuf", "text/plain")
                return
            self._reply(200, resp)

    return Handler


class _HttpServer(ThreadingHTTPServer):
    allow_reuse_address = True  # restart on the same port right after stop() (TIME_WAIT)
    daemon_threads = True


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class OtlpReceiver:
    """Collects everything received, thread-safe. Set reject_http_status / reject_grpc_code to make it
    answer every export with that error."""

    def __init__(self, grpc_port: int = 0, http_port: int = 0, host: str = "127.0.0.1",
                 tls: tuple[str, str] | None = None) -> None:
        """tls=(cert_file, key_file) serves both endpoints over TLS (https:// endpoints)."""
        self._host = host
        self._tls = tls
        self._want_grpc_port = grpc_port
        self._want_http_port = http_port
        self._cond = threading.Condition()
        self._spans: list[SpanDict] = []
        self._metrics: list[MetricDict] = []
        self.trace_requests: list[tuple[str, trace_service_pb2.ExportTraceServiceRequest, dict[str, str]]] = []
        self.metric_requests: list[tuple[str, metrics_service_pb2.ExportMetricsServiceRequest, dict[str, str]]] = []
        self.reject_http_status: int | None = None
        self.reject_grpc_code: grpc.StatusCode | None = None
        self.retry_after_s: int | None = None  # sent as Retry-After with reject_http_status
        # Answer trace exports with an OTLP partial success rejecting this many spans (0: full success).
        self.partial_rejected_spans = 0
        self.decode_errors = 0
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._http_conns: set[socket.socket] = set()
        self.grpc_port = 0
        self.http_port = 0

    # --- lifecycle ---

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), server)
        addr = f"{self._url_host}:{self._want_grpc_port}"
        if self._tls:
            with open(self._tls[0], "rb") as f:
                cert = f.read()
            with open(self._tls[1], "rb") as f:
                key = f.read()
            port = server.add_secure_port(addr, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"OtlpReceiver: cannot bind gRPC on {self._host}:{self._want_grpc_port}")
        server.start()
        self._grpc, self.grpc_port = server, port

        server_cls = _HttpServer6 if ":" in self._host else _HttpServer
        httpd = server_cls((self._host, self._want_http_port), _make_http_handler(self))
        if self._tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self._tls[0], self._tls[1])
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        self._http, self.http_port = httpd, httpd.server_address[1]
        self._http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                             name="otlp-receiver-http", daemon=True)
        self._http_thread.start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=0).wait(5)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            # A stopped collector also drops its keep-alive connections; without this an exporter's
            # open connection would keep being served by its handler thread.
            with self._cond:
                conns = list(self._http_conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
            self._http_thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def _scheme(self) -> str:
        return "https" if self._tls else "http"

    @property
    def _url_host(self) -> str:
        return f"[{self._host}]" if ":" in self._host else self._host

    @property
    def grpc_endpoint(self) -> str:
        return f"{self._scheme}://{self._url_host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """Base URL (OTEL_EXPORTER_OTLP_ENDPOINT style); POSTs go to /v1/traces and /v1/metrics."""
        return f"{self._scheme}://{self._url_host}:{self.http_port}"

    # --- collection ---

    def _trace_response(self) -> trace_service_pb2.ExportTraceServiceResponse:
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if self.partial_rejected_spans:
            resp.partial_success.rejected_spans = self.partial_rejected_spans
            resp.partial_success.error_message = "test receiver: spans rejected"
        return resp

    def _add_traces(self, req: Any, transport: str, headers: dict[str, str]) -> None:
        flat = flatten_spans(req, transport)
        with self._cond:
            self.trace_requests.append((transport, req, headers))
            self._spans.extend(flat)
            self._cond.notify_all()

    def _add_metrics(self, req: Any, transport: str, headers: dict[str, str]) -> None:
        flat = flatten_metrics(req, transport)
        with self._cond:
            self.metric_requests.append((transport, req, headers))
            self._metrics.extend(flat)
            self._cond.notify_all()

    def spans(self) -> list[SpanDict]:
        with self._cond:
            return list(self._spans)

    def metrics(self) -> list[MetricDict]:
        with self._cond:
            return list(self._metrics)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._metrics.clear()
            self.trace_requests.clear()
            self.metric_requests.clear()

    def _wait(self, get: Callable[[], list[dict[str, Any]]], predicate: Callable[[list[dict[str, Any]]], bool],
              timeout_s: float, what: str) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                items = list(get())
                if predicate(items):
                    return items
                left = end - time.monotonic()
                if left <= 0:
                    names = sorted({i.get("name", "?") for i in items})
                    raise TimeoutError(
                        f"OtlpReceiver: condition on {what} not met within {timeout_s} s; "
                        f"received {len(items)} {what}, names {names[:20]}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait_for_spans(self, predicate: Callable[[list[SpanDict]], bool] | None = None,
                       timeout_s: float = 10.0) -> list[SpanDict]:
        """Wait until predicate(all spans so far) is true (default: at least one span); return them.
        Raises TimeoutError describing what did arrive."""
        pred = predicate or (lambda ss: len(ss) > 0)
        return self._wait(lambda: self._spans, pred, timeout_s, "spans")

    def wait_for_metrics(self, predicate: Callable[[list[MetricDict]], bool] | None = None,
                         timeout_s: float = 10.0) -> list[MetricDict]:
        pred = predicate or (lambda ms: len(ms) > 0)
        return self._wait(lambda: self._metrics, pred, timeout_s, "metric points")


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for "collector down" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def self_signed_cert(directory: str, host: str = "127.0.0.1") -> tuple[str, str]:
    """A throwaway certificate for `host` (also the CA to trust), made with the openssl CLI."""
    cert, key = f"{directory}/otlp-cert.pem", f"{directory}/otlp-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=kspan-test",
         "-addext", f"subjectAltName=IP:{host},DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def span_tree(spans: list[SpanDict]) -> dict[str, list[SpanDict]]:
    """Children by parent span id (hex), for asserting trace shapes."""
    tree: dict[str, list[SpanDict]] = {}
    for s in spans:
        tree.setdefault(s["parent_span_id"], []).append(s)
    return tree


__all__ = ["OtlpReceiver", "flatten_metrics", "flatten_spans", "self_signed_cert", "span_tree", "unused_port"]
