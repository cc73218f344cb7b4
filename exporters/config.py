"""Exporter configuration: the OTEL_* environment of the OpenTelemetry specification plus kspan's flags.

Flags win over the environment. No endpoint anywhere means the embedded default: a console span
tree and an OTLP-JSON-lines file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from correlator.spans import AttrValue
from exporters.base import SpanExporter
from exporters.otlp_proto import ResourceOverrides

PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_OUTPUT = "kspan-traces.jsonl"
DEFAULT_METRICS_OUTPUT = "kspan-metrics.jsonl"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_METRICS_INTERVAL_S = 15.0


class ConfigError(ValueError):
    """A configuration the user must fix; the message says what and how."""


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how one signal (traces or metrics) is sent."""

    signal: str  # "traces" | "metrics"
    endpoint: str  # http/protobuf: the full URL to POST to; grpc: scheme://host:port
    protocol: str  # "grpc" | "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S
    insecure: bool = False  # grpc only: plaintext channel
    compression: str | None = None  # "gzip" or None
    certificate: str | None = None  # CA bundle (PEM) for TLS

    @property
    def grpc_target(self) -> str:
        u = urlsplit(self.endpoint if "://" in self.endpoint else "//" + self.endpoint)
        host = u.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{u.port or (443 if u.scheme == 'https' else 4317)}"


@dataclass(frozen=True)
class ExporterConfig:
    traces: OtlpTarget | None = None
    metrics: OtlpTarget | None = None
    console: bool = False
    output: str | None = None  # OTLP-JSON lines of spans
    metrics_output: str | None = None  # OTLP-JSON lines of metrics (embedded default)
    metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S
    resource: ResourceOverrides = field(default_factory=ResourceOverrides)
    notes: tuple[str, ...] = ()  # things worth one line at start-up (e.g. "metrics not exported: ...")


def parse_key_values(text: str, what: str) -> list[tuple[str, str]]:
    """W3C-baggage-like `k=v,k2=v2`, percent-decoded, as the OTLP exporter spec defines for headers and
    resource attributes."""
    pairs: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = unquote(key.strip())
        if not sep or not key:
            raise ConfigError(
                f"{what}: malformed entry {item!r}; expected comma-separated key=value pairs "
                f"(e.g. 'api-key=secret,x-team=ops', values percent-encoded)"
            )
        pairs.append((key, unquote(value.strip())))
    return pairs


def _parse_headers(text: str, what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in parse_key_values(text, what):
        # gRPC metadata keys must be lower case; HTTP header names are case-insensitive.
        key = k.lower()
        if any(c in key for c in " \t\r\n:") or any(c in v for c in "\r\n"):
            raise ConfigError(f"{what}: header {k!r} has characters a header cannot carry; fix its name/value")
        if not (key.isascii() and v.isascii()):
            # gRPC metadata (non -bin keys) and HTTP/1.1 header values are ASCII on the wire.
            raise ConfigError(f"{what}: header {k!r} is not ASCII after percent-decoding; "
                              f"encode binary credentials (e.g. base64) first")
        out.append((key, v))
    return tuple(out)


def _parse_bool(text: str, what: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"{what}={text!r}: expected true or false")


def _parse_timeout(text: str, what: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        raise ConfigError(f"{what}={text!r}: expected a number of milliseconds (e.g. 10000)") from None
    if ms <= 0:
        raise ConfigError(f"{what}={text!r}: the timeout must be positive (milliseconds)")
    return ms / 1000.0


def _validate_endpoint(url: str, what: str, protocol: str) -> str:
    url = url.strip()
    if not url:
        raise ConfigError(f"{what} is empty; give a URL such as http://localhost:4318")
    has_scheme = "://" in url
    if has_scheme:
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ConfigError(
                f"{what}={url!r}: unsupported scheme {scheme!r}; use http:// (plaintext) or https:// (TLS)"
            )
    elif protocol == "http/protobuf":
        raise ConfigError(f"{what}={url!r}: OTLP/HTTP needs a full URL; write http://{url} or https://{url}")
    try:
        u = urlsplit(url if has_scheme else "//" + url)
        port = u.port
    except ValueError as e:
        raise ConfigError(f"{what}={url!r}: malformed endpoint ({e}); expected e.g. http://localhost:4317") from None
    if not u.hostname:
        raise ConfigError(f"{what}={url!r}: no host; expected e.g. http://localhost:4317")
    if port == 0:
        raise ConfigError(f"{what}={url!r}: port 0 is not a valid collector port")
    return url


def _guess_protocol(endpoint: str) -> str:
    # Unset protocol: the collector's well-known ports decide (4317 gRPC, 4318 HTTP), as Grafana Beyla
    # does, because a user who gives only `--otlp-endpoint http://host:4317` means gRPC.
    try:
        port = urlsplit(endpoint if "://" in endpoint else "//" + endpoint).port
    except ValueError:
        port = None
    return "grpc" if port == 4317 else "http/protobuf"


def _signal_url(base: str, signal: str, protocol: str) -> str:
    if protocol != "http/protobuf":
        return base
    base = base.rstrip("/")
    # A base that already names a signal path is a common slip; do not produce /v1/traces/v1/traces.
    for suffix in ("/v1/traces", "/v1/metrics"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return f"{base}/v1/{signal}"


def _target(
    env: Mapping[str, str],
    signal: str,
    flag_endpoint: str | None,
    flag_protocol: str | None,
) -> OtlpTarget | None:
    sig = signal.upper()

    def pick(name: str) -> tuple[str | None, str]:
        specific = f"OTEL_EXPORTER_OTLP_{sig}_{name}"
        general = f"OTEL_EXPORTER_OTLP_{name}"
        if env.get(specific, "").strip():
            return env[specific].strip(), specific
        if env.get(general, "").strip():
            return env[general].strip(), general
        return None, general

    protocol, proto_src = (flag_protocol, "--otlp-protocol") if flag_protocol else pick("PROTOCOL")
    if protocol is not None:
        protocol = protocol.strip().lower()
        if protocol == "http":
            protocol = "http/protobuf"
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"{proto_src}={protocol!r}: unknown OTLP protocol; use 'grpc' or 'http/protobuf' "
                f"(http/json is not supported)"
            )

    specific_ep = env.get(f"OTEL_EXPORTER_OTLP_{sig}_ENDPOINT", "").strip()
    general_ep = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if flag_endpoint:
        endpoint, src, is_base = flag_endpoint.strip(), "--otlp-endpoint", True
    elif specific_ep:
        endpoint, src, is_base = specific_ep, f"OTEL_EXPORTER_OTLP_{sig}_ENDPOINT", False
    elif general_ep:
        endpoint, src, is_base = general_ep, "OTEL_EXPORTER_OTLP_ENDPOINT", True
    else:
        return None
    if protocol is None:
        protocol = _guess_protocol(endpoint)
    endpoint = _validate_endpoint(endpoint, src, protocol)
    if is_base:
        endpoint = _signal_url(endpoint, signal, protocol)

    headers_text, headers_src = pick("HEADERS")
    headers = _parse_headers(headers_text, headers_src) if headers_text else ()
    timeout_text, timeout_src = pick("TIMEOUT")
    timeout_s = _parse_timeout(timeout_text, timeout_src) if timeout_text else DEFAULT_TIMEOUT_S
    comp_text, comp_src = pick("COMPRESSION")
    compression = None
    if comp_text:
        c = comp_text.lower()
        if c not in ("gzip", "none"):
            raise ConfigError(f"{comp_src}={comp_text!r}: use 'gzip' or 'none'")
        compression = "gzip" if c == "gzip" else None
    cert, _ = pick("CERTIFICATE")
    if cert and not os.path.isfile(cert):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_CERTIFICATE={cert!r}: no such file; give a PEM CA bundle path")

    scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
    if scheme:
        # The spec: for gRPC the URL scheme decides TLS and takes precedence over OTEL_EXPORTER_OTLP_INSECURE.
        insecure = scheme == "http"
    else:
        ins_text, ins_src = pick("INSECURE")
        insecure = _parse_bool(ins_text, ins_src) if ins_text else False
    return OtlpTarget(
        signal=signal,
        endpoint=endpoint,
        protocol=protocol,
        headers=headers,
        timeout_s=timeout_s,
        insecure=insecure,
        compression=compression,
        certificate=cert,
    )


def _resource(env: Mapping[str, str]) -> ResourceOverrides:
    attrs: dict[str, AttrValue] = {}
    text = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if text.strip():
        attrs.update(parse_key_values(text, "OTEL_RESOURCE_ATTRIBUTES"))
    service = env.get("OTEL_SERVICE_NAME", "").strip() or None
    return ResourceOverrides(service_name=service, attributes=attrs)


def load_config(
    env: Mapping[str, str],
    endpoint: str | None = None,
    protocol: str | None = None,
    output: str | None = None,
    console: bool | None = None,
    metrics_output: str | None = None,
    metrics_interval_s: float | None = None,
) -> ExporterConfig:
    """Read the exporter configuration; raise ConfigError with what to fix.

    endpoint/protocol/output are the --otlp-endpoint/--otlp-protocol/--output flags (None: not given).
    console None means "the default": on when no OTLP endpoint is configured.
    """
    traces = _target(env, "traces", endpoint, protocol)
    metrics = _target(env, "metrics", endpoint, protocol)
    notes: list[str] = []
    embedded = traces is None
    out = output if output else (DEFAULT_OUTPUT if embedded else None)
    show_console = embedded if console is None else console
    m_out = metrics_output
    if metrics is None and m_out is None:
        if embedded:
            m_out = DEFAULT_METRICS_OUTPUT
        else:
            notes.append(
                "metrics are not exported: traces go to an OTLP endpoint but no metrics endpoint is set "
                "(set OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_METRICS_ENDPOINT)"
            )
    interval = DEFAULT_METRICS_INTERVAL_S
    if metrics_interval_s is not None:
        interval = metrics_interval_s
    elif env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip():
        interval = _parse_timeout(env["OTEL_METRIC_EXPORT_INTERVAL"], "OTEL_METRIC_EXPORT_INTERVAL")
    if interval <= 0:
        raise ConfigError(f"metrics interval {interval!r}: must be positive seconds")
    return ExporterConfig(
        traces=traces,
        metrics=metrics,
        console=show_console,
        output=out,
        metrics_output=m_out,
        metrics_interval_s=interval,
        resource=_resource(env),
        notes=tuple(notes),
    )


def describe(cfg: ExporterConfig) -> str:
    """One line for the start-up banner: where spans go."""
    parts = []
    if cfg.traces:
        parts.append(f"OTLP {cfg.traces.protocol} {cfg.traces.endpoint}")
    if cfg.console:
        parts.append("console")
    if cfg.output:
        parts.append(f"file {cfg.output}")
    return "spans -> " + (", ".join(parts) if parts else "nowhere")


def build_exporters(cfg: ExporterConfig) -> list[SpanExporter]:
    """The span exporters a configuration asks for; ConfigError when one cannot be set up (e.g. an
    --output path that cannot be written)."""
    # Imported here: the exporter modules import this one for OtlpTarget.
    from exporters.console import ConsoleSpanExporter
    from exporters.jsonfile import JsonFileSpanExporter

    out: list[SpanExporter] = []
    if cfg.traces is not None:
        if cfg.traces.protocol == "grpc":
            from exporters.otlp_grpc import OtlpGrpcSpanExporter

            out.append(OtlpGrpcSpanExporter(cfg.traces, cfg.resource))
        else:
            from exporters.otlp_http import OtlpHttpSpanExporter

            out.append(OtlpHttpSpanExporter(cfg.traces, cfg.resource))
    if cfg.console:
        out.append(ConsoleSpanExporter())
    if cfg.output:
        try:
            out.append(JsonFileSpanExporter(cfg.output, cfg.resource))
        except OSError as e:
            raise ConfigError(
                f"--output {cfg.output}: cannot open for writing ({e.strerror or e}); choose a writable path"
            ) from None
    return out
