"""OTLP/gRPC span exporter (opentelemetry.proto.collector.trace.v1.TraceService/Export)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from correlator.spans import ProcessInfo, Span
from exporters.config import OtlpTarget
from exporters.otlp_proto import KSPAN_VERSION, ResourceOverrides, WireEncoder

log = logging.getLogger("kspan.exporters")

# The OTLP spec's retryable gRPC codes; anything else will fail again with the same request.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})

_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"]
# Same method the generated TraceServiceStub calls; kspan passes bytes it encoded itself
# (otlp_proto.WireEncoder), so the request serializer is the identity.
EXPORT_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Export'].name}"

_CHANNEL_OPTIONS = [
    # gRPC's own reconnect backoff grows to 120 s by default: after a collector restart spans would
    # wait minutes. kspan's pipeline already backs off, so keep the channel's short.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.primary_user_agent", f"kspan/{KSPAN_VERSION}"),
]


class OtlpGrpcSpanExporter:
    """Never raises; False means "not delivered" (see last_error / last_failure_permanent)."""

    def __init__(self, target: OtlpTarget, resource: ResourceOverrides | None = None) -> None:
        self.target = target
        self.url = target.endpoint
        self._metadata = tuple(target.headers)
        self._compression = grpc.Compression.Gzip if target.compression == "gzip" else grpc.Compression.NoCompression
        addr = target.grpc_target
        if target.insecure:
            self._channel = grpc.insecure_channel(addr, options=_CHANNEL_OPTIONS)
        else:
            root = None
            if target.certificate:
                with open(target.certificate, "rb") as f:
                    root = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(addr, creds, options=_CHANNEL_OPTIONS)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        self._encoder = WireEncoder(resource or ResourceOverrides())
        self.last_error = ""
        self.last_failure_permanent = False
        self.outage_hint = "check --otlp-endpoint / that the collector is running"
        self.rejected_spans = 0

    def describe(self) -> str:
        return f"OTLP/gRPC endpoint {self.url}"

    def export_bytes(self, body: bytes, n_spans: int) -> bool:
        self.last_failure_permanent = False
        try:
            resp = self._export(
                body,
                timeout=self.target.timeout_s,
                metadata=self._metadata,
                compression=self._compression,
            )
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = (e.details() if hasattr(e, "details") else str(e)) or ""
            self.last_error = f"{code.name}: {details}"
            if not self.target.insecure and any(w in details.lower() for w in ("ssl", "handshake", "certificate")):
                self.last_error += (" (for a private CA set OTEL_EXPORTER_OTLP_CERTIFICATE to its PEM file; "
                                    "use http:// if the collector does not speak TLS)")
            if code not in RETRYABLE_CODES:
                self.last_failure_permanent = True
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self.last_error += " (check OTEL_EXPORTER_OTLP_HEADERS for the credentials it expects)"
                elif code == grpc.StatusCode.UNIMPLEMENTED:
                    self.last_error += " (is this an OTLP/HTTP port? try --otlp-protocol http/protobuf)"
            return False
        except Exception as e:  # grpc can raise plain errors on a broken channel; never kill the caller
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        ps = resp.partial_success
        if ps.rejected_spans or ps.error_message:
            self.rejected_spans += ps.rejected_spans
            log.warning(
                "kspan: %s rejected %d spans: %s",
                self.describe(), ps.rejected_spans, ps.error_message or "(no reason given)",
            )
        self.last_error = ""
        return True

    def encode_spans(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bytes:
        """One ExportTraceServiceRequest; requests concatenate into one (the pipeline joins them)."""
        return self._encoder.encode(spans, processes)

    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        try:
            body = self.encode_spans(spans, processes)
        except Exception as e:
            self.last_error = f"cannot encode spans: {e!r}"
            self.last_failure_permanent = True
            log.exception("kspan: bug: could not encode %d spans for OTLP", len(spans))
            return False
        return self.export_bytes(body, len(spans))

    def shutdown(self) -> None:
        self._channel.close()
