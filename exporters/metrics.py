"""Metrics from spans and TCP events: RED histograms, the service graph, network counters, self-health.

Aggregation is kspan's own (plain dicts and bucket arrays), exported as the OpenTelemetry SDK's
metric data model through the SDK's OTLP metric exporters (or as OTLP-JSON lines for the embedded
default). Why not the SDK's instruments: one Histogram.record() costs ~9 us here and every traced
request needs four or five of them; aggregating in place costs ~0.5 us per span and ~0.2-0.3 us per
unsampled exchange, which matters to an agent whose budget is about 10 us per request. What
makes it cheap: the per-record fold is C (exporters/_metrics.c: the streams, the series memo's
lookup, the service graph's pairing), a span's attribute values (or a RedFacts' memoised attribute
tuple) find all their streams in one dict lookup, and pids resolve once per batch. Whatever creates
or ages state (memo entries, streams and the cardinality limit, edges, pids' services, expiry) is
here, called back from the C.

Resources: RED metrics belong to the traced service (one resource per service, never per pid: the
pid, command line and executable are left out to bound cardinality). The service graph, network and
health metrics describe edges or kspan itself and carry kspan's own resource (service.name "kspan").
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from correlator.records import TcpEvent, TcpEventKind
from correlator.red import RedFacts
from correlator.spans import AttrValue, ProcessInfo, Span, SpanKind, StatusCode
from exporters._metrics import Counter as _Counter
from exporters._metrics import Edge as _Edge
from exporters._metrics import Hist as _Hist
from exporters._metrics import Series as _Series
from exporters._metrics import record_red as _record_red
from exporters._metrics import record_spans as _record_spans
from exporters.config import ConfigError, ExporterConfig, OtlpTarget
from exporters.otlp_proto import KSPAN_VERSION, SCOPE_NAME, SDK_ATTRIBUTES, ResourceOverrides, resource_attributes

log = logging.getLogger("kspan.exporters")

# Stable HTTP semantic conventions: http.*.request.duration buckets (seconds).
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# db.client.operation.duration's advised boundaries (database calls are often sub-millisecond).
DB_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
# Loopback and LAN round trips are micro- to milliseconds; the HTTP buckets would put them all in one.
RTT_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25, 0.5, 1.0)
# Streams per metric per resource, as the SDK's default cardinality limit; the excess folds into one
# stream marked otel.metric.overflow=true (the SDK's convention) instead of growing without bound.
CARDINALITY_LIMIT = 2000
_OVERFLOW_KEY: tuple[tuple[str, AttrValue], ...] = (("otel.metric.overflow", True),)

_KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"})
# Resource attributes that identify a process rather than a service: left out of metric resources.
_PER_PROCESS_KEYS = frozenset({"process.pid", "process.command_line", "process.executable.name",
                               "process.parent_pid", "process.executable.path"})
UNKNOWN_SERVICE = "unknown_service"


@dataclass(frozen=True, eq=False)  # identity hash: these are few, fixed, and hashed on every record
class MetricDef:
    name: str
    unit: str
    description: str
    kind: str  # "histogram" | "counter"
    bounds: tuple[float, ...] = ()


SERVER_DURATION = MetricDef("http.server.request.duration", "s", "Duration of HTTP server requests.",
                            "histogram", DURATION_BUCKETS)
CLIENT_DURATION = MetricDef("http.client.request.duration", "s", "Duration of HTTP client requests.",
                            "histogram", DURATION_BUCKETS)
# Database and RPC calls (the protocols beyond HTTP/1), by the semantic conventions: no query text,
# key or value is ever an attribute.
DB_CLIENT_DURATION = MetricDef("db.client.operation.duration", "s", "Duration of database client operations.",
                               "histogram", DB_BUCKETS)
RPC_SERVER_DURATION = MetricDef("rpc.server.call.duration", "s", "Duration of RPCs served.", "histogram",
                                DURATION_BUCKETS)
RPC_CLIENT_DURATION = MetricDef("rpc.client.call.duration", "s", "Duration of RPCs made.", "histogram",
                                DURATION_BUCKETS)
_DB_ATTRS = ("db.system.name", "db.namespace", "db.operation.name", "db.collection.name",
             "db.response.status_code", "error.type", "server.address", "server.port")
_RPC_ATTRS = ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code", "error.type")
SG_TOTAL = MetricDef("traces_service_graph_request_total", "{request}",
                     "Requests between two services, from the client/server span pairs kspan linked.", "counter")
SG_FAILED = MetricDef("traces_service_graph_request_failed_total", "{request}",
                      "Failed requests between two services (either side's span is an error).", "counter")
SG_SERVER = MetricDef("traces_service_graph_request_server_seconds", "s",
                      "Server-side duration of requests between two services.", "histogram", DURATION_BUCKETS)
SG_CLIENT = MetricDef("traces_service_graph_request_client_seconds", "s",
                      "Client-side duration of requests between two services.", "histogram", DURATION_BUCKETS)
TCP_RETRANSMITS = MetricDef("kspan.network.tcp.retransmits", "{segment}", "TCP segments retransmitted.", "counter")
TCP_RESETS = MetricDef("kspan.network.tcp.resets", "{reset}", "TCP resets sent or received.", "counter")
TCP_CONNECT_FAILURES = MetricDef("kspan.network.tcp.connect_failures", "{connection}",
                                 "TCP connection attempts that failed.", "counter")
TCP_RTT = MetricDef("kspan.network.tcp.rtt", "s", "Smoothed TCP round-trip time samples.", "histogram", RTT_BUCKETS)


AttrKey = tuple[tuple[str, AttrValue], ...]
ResourceKey = tuple[tuple[str, AttrValue], ...]


@dataclass
class _Health:
    name: str
    callback: Callable[[], float | int]
    unit: str
    description: str
    monotonic: bool
    start_ns: int


# A half of a service-graph edge waiting for its other half, as a plain tuple (a class instance
# costs several times more to build, and most requests make one):
# (client, server, seconds, failed, t, virtual). server None: a local client whose far end is not
# known yet; virtual: the far end's name if it turns out not to be traced.
_Pending = tuple[str, str | None, float, bool, float, str]


_MEMO_SIZE = 4096  # memoised attribute sets; the memo starts over when full
_SERVICE_CACHE_SIZE = 8192  # pids' resolved services; the cache starts over when full
# What exporters/_metrics.c compares spans' kinds and statuses with, and names an unknown caller.
_SPAN_CONSTS = (SpanKind.SERVER, SpanKind.CLIENT, StatusCode.ERROR, UNKNOWN_SERVICE)


class MetricsAggregator:
    """Cumulative aggregation of every kspan metric; pure (no I/O), thread-safe."""

    def __init__(self, overrides: ResourceOverrides | None = None, pair_timeout_s: float = 10.0,
                 max_pending: int = 10000) -> None:
        self._overrides = overrides or ResourceOverrides()
        self._lock = threading.Lock()
        # (resource, metric, attribute set) -> cumulative state. Resource keys are interned tuples, so
        # dict lookups mostly compare by identity.
        self._streams: dict[tuple[int, MetricDef, AttrKey], _Hist | _Counter] = {}
        self._stream_counts: dict[tuple[int, MetricDef], int] = {}
        self._resource_ids: dict[ResourceKey, int] = {}
        self._resources: list[ResourceKey] = []
        self._service_res: dict[int, tuple[ProcessInfo | None, int, str]] = {}
        # pid -> (resource, service) for the batch being recorded (its processes mapping), each entry
        # also in _service_res: a pid costs one lookup per batch, not two and a comparison per span.
        self._batch_services: dict[int, tuple[int, str]] = {}
        self._processes: Mapping[int, ProcessInfo] = {}
        self._now = 0.0
        self._now_ns = 0
        # (resource, kind, status, attribute values) -> _Series for HTTP spans; (resource, server,
        # id(attrs)) -> _Series for RedFacts, whose attribute tuples correlator/red.py memoises (the
        # entry holds the tuple, so its id is not reused while the entry lives).
        self._span_series: dict[tuple[Any, ...], _Series] = {}
        self._fact_series: dict[tuple[int, bool, int], _Series] = {}
        self._edges: dict[tuple[str, str, str], _Edge] = {}
        agent: dict[str, AttrValue] = {"service.name": "kspan", "service.version": KSPAN_VERSION,
                                       "host.name": socket.gethostname()}
        agent.update(SDK_ATTRIBUTES)
        # The user's resource attributes (environment, cluster...) describe kspan's host too; the
        # service name they gave names the traced services, not the agent.
        agent.update({k: v for k, v in self._overrides.attributes.items() if k != "service.name"})
        self.agent_resource_attributes: ResourceKey = tuple(sorted(agent.items()))
        self.agent_resource = self._resource_id(self.agent_resource_attributes)
        self._pending_clients: dict[bytes, _Pending] = {}
        self._pending_servers: dict[bytes, _Pending] = {}
        self._pair_timeout_s = pair_timeout_s
        self._max_pending = max_pending
        self._last_sweep = time.monotonic()
        # Where traced services listen, learned from spans, to name the far end of a TCP event.
        self._endpoint_service: dict[tuple[str, int], str] = {}
        self._listen_ports: dict[str, set[int]] = {}
        self._health: list[_Health] = []
        self.overflowed = 0
        self.health_errors = 0
        self.unpaired_edges = 0

    # --- resources ---

    def _resource_id(self, key: ResourceKey) -> int:
        # Streams are keyed by a small int, not the attribute tuple: tuples re-hash on every lookup.
        rid = self._resource_ids.get(key)
        if rid is None:
            rid = self._resource_ids[key] = len(self._resources)
            self._resources.append(key)
        return rid

    def _service(self, pid: int, info: ProcessInfo | None) -> tuple[int, str]:
        hit = self._service_res.get(pid)
        if hit is not None and hit[0] is info:
            return hit[1], hit[2]
        attrs = resource_attributes(pid, info, self._overrides)
        key = self._resource_id(tuple(sorted((k, v) for k, v in attrs.items() if k not in _PER_PROCESS_KEYS)))
        name = str(attrs.get("service.name", UNKNOWN_SERVICE))
        if len(self._service_res) >= _SERVICE_CACHE_SIZE:
            self._service_res.clear()
            self._batch_services.clear()
        self._service_res[pid] = (info, key, name)
        return key, name

    def _batch_service(self, pid: int) -> tuple[int, str]:
        svc = self._batch_services.get(pid)
        if svc is None:
            svc = self._batch_services[pid] = self._service(pid, self._processes.get(pid))
        return svc

    def _service_name(self, pid: int) -> str:
        if pid == 0:
            return UNKNOWN_SERVICE
        svc = self._batch_services.get(pid)
        if svc is not None:
            return svc[1]
        if self._processes.get(pid) is None and pid not in self._service_res:
            return UNKNOWN_SERVICE
        return self._batch_service(pid)[1]

    # --- recording primitives (lock held) ---

    def _state(self, res: int, m: MetricDef, attrs: AttrKey, now_ns: int) -> _Hist | _Counter:
        key = (res, m, attrs)
        st = self._streams.get(key)
        if st is None:
            n = self._stream_counts.get((res, m), 0)
            if n >= CARDINALITY_LIMIT:
                self.overflowed += 1
                key = (res, m, _OVERFLOW_KEY)
                st = self._streams.get(key)
            if st is None:
                st = _Hist(m.bounds, now_ns) if m.kind == "histogram" else _Counter(now_ns)
                self._streams[key] = st
                self._stream_counts[(res, m)] = n + 1
        return st

    def _observe(self, res: int, m: MetricDef, attrs: AttrKey, value: float, now_ns: int) -> _Hist | None:
        """Returns the stream when it is attrs' own (not the overflow stream), for memoising."""
        h = self._streams.get((res, m, attrs))
        if h is None:
            h = self._state(res, m, attrs, now_ns)
            h.add(value)  # type: ignore[union-attr]
            return h if self._streams.get((res, m, attrs)) is h else None  # type: ignore[return-value]
        h.add(value)  # type: ignore[union-attr]
        return h  # type: ignore[return-value]

    def _add(self, res: int, m: MetricDef, attrs: AttrKey, n: int, now_ns: int) -> None:
        c = self._streams.get((res, m, attrs))
        if c is None:
            c = self._state(res, m, attrs, now_ns)
        c.value += n  # type: ignore[union-attr]

    def _begin(self, processes: Mapping[int, ProcessInfo]) -> int:
        """A batch's context, kept on self (exporters/_metrics.c reads it there): its processes
        mapping (a batch's is its own: pids resolve afresh), the clocks. Returns the wall clock."""
        self._processes = processes
        self._now_ns = time.time_ns()
        self._now = time.monotonic()
        self._batch_services.clear()
        return self._now_ns

    def _end(self) -> None:
        now = self._now
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            self._expire(now - self._pair_timeout_s, self._now_ns)

    # --- spans ---

    @staticmethod
    def _red_attrs(span: Span) -> AttrKey:
        a = span.attributes
        out: list[tuple[str, AttrValue]] = []
        method = a.get("http.request.method")
        if method is not None:
            # Semconv: an unknown method is "_OTHER", so a fuzzer's verbs cannot explode cardinality.
            m = str(method)
            out.append(("http.request.method", m if m in _KNOWN_METHODS else "_OTHER"))
        status = a.get("http.response.status_code")
        if status is not None:
            out.append(("http.response.status_code", status))
        err = a.get("error.type")
        if err is None and isinstance(status, int):
            # Semconv: a failing status code is the error type (5xx on servers, 4xx and 5xx on clients).
            if status >= 500 or (status >= 400 and span.kind == SpanKind.CLIENT):
                err = str(status)
        if err is None and span.status == StatusCode.ERROR:
            err = "_OTHER"
        if err is not None:
            out.append(("error.type", err))
        if span.kind == SpanKind.SERVER:
            route = a.get("http.route")
            if route:
                out.append(("http.route", route))
        else:
            for k in ("server.address", "server.port"):
                v = a.get(k)
                if v is not None:
                    out.append((k, v))
        for k in ("url.scheme", "network.protocol.version"):
            v = a.get(k)
            if v is not None:
                out.append((k, v))
        # No sort needed: the order above is fixed, so equal attribute sets give equal tuples.
        return tuple(out)

    @staticmethod
    def _other_protocol(span: Span) -> tuple[MetricDef | None, AttrKey] | None:
        """A database or RPC span's duration metric and attributes; None for HTTP. A database's own
        server-side spans have no metric in the conventions (None, ())."""
        a = span.attributes
        if "db.system.name" in a:
            if span.kind != SpanKind.CLIENT:
                return None, ()
            return DB_CLIENT_DURATION, tuple((k, a[k]) for k in _DB_ATTRS if k in a)
        if "rpc.system" in a:
            m = RPC_SERVER_DURATION if span.kind == SpanKind.SERVER else RPC_CLIENT_DURATION
            return m, tuple((k, a[k]) for k in _RPC_ATTRS if k in a)
        return None

    def _series_of(self, s: Span, res: int, service: str) -> _Series:
        """A span's _Series, from the span itself: whatever record_spans' memo key holds of the span
        decides it (for an HTTP span; database and RPC spans are not memoised)."""
        other = self._other_protocol(s)
        if other is None:
            m: MetricDef | None = SERVER_DURATION if s.kind == SpanKind.SERVER else CLIENT_DURATION
            attrs = self._red_attrs(s)
        else:
            m, attrs = other
        e = _Series(m, attrs, self._streams.get((res, m, attrs)) if m is not None else None)
        a = s.attributes
        system = a.get("db.system.name")
        if system is not None:
            # A database or cache is a node of its own, named by its system (as Tempo's service
            # graph names database nodes); its server-side spans add no edge of their own.
            e.database = str(system)
        if s.kind == SpanKind.SERVER:
            port = a.get("server.port")
            if isinstance(port, int):
                ports = self._listen_ports.setdefault(service, set())
                if len(ports) < 64:
                    ports.add(port)
            return e
        addr = a.get("network.peer.address") or a.get("server.address")
        port = a.get("network.peer.port") or a.get("server.port")
        if isinstance(addr, str) and isinstance(port, int):
            e.endpoint = (addr, port)
        addr = a.get("network.peer.address")
        e.local = isinstance(addr, str) and (addr.startswith("127.") or addr == "::1")
        e.peer = str(a.get("server.address") or addr or UNKNOWN_SERVICE)
        return e

    def record_spans(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> None:
        """Each span's duration into its RED stream, the far end it teaches, and its half of a
        service-graph edge: exporters/_metrics.c's record_spans, which calls back the methods
        below (_span_series_miss, _series_of, _observe, _edge...) for what does not exist yet."""
        with self._lock:
            self._begin(processes)
            _record_spans(self, spans, _SPAN_CONSTS)
            self._end()

    def _span_series_miss(self, s: Span, res: int, service: str, key: tuple[Any, ...]) -> _Series:
        """An HTTP span whose memo key (built by exporters/_metrics.c from every attribute
        _series_of reads of it, its resource, kind and status) is not memoised yet."""
        memo = self._span_series
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        e = memo[key] = self._series_of(s, res, service)
        return e

    def record_red(self, facts: Sequence[RedFacts], processes: Mapping[int, ProcessInfo]) -> None:
        """Unsampled exchanges: the same RED and service-graph metrics a span would give, from
        correlator/red.py's facts (no span is built for them), by exporters/_metrics.c's record_red."""
        with self._lock:
            self._begin(processes)
            _record_red(self, facts)
            self._end()

    def _fact_series_miss(self, res: int, server: bool, attrs: AttrKey, key: tuple[int, bool, int]) -> _Series:
        """A RedFacts attribute tuple not memoised yet; key is (res, server, id(attrs))."""
        memo = self._fact_series
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        m = SERVER_DURATION if server else CLIENT_DURATION
        e = memo[key] = _Series(m, attrs, self._streams.get((res, m, attrs)))
        return e

    def _expire(self, older_than: float, now_ns: int) -> None:
        # The other half never came (dropped, or its process is not traced after all): count the edge
        # from the side that was seen, so no request disappears from the graph.
        for pending, is_client in ((self._pending_clients, True), (self._pending_servers, False)):
            for key in [k for k, p in pending.items() if p[4] <= older_than]:
                client, server, seconds, failed, _t, virtual = pending.pop(key)
                self.unpaired_edges += 1
                if is_client and server is None:
                    self.unpaired_edges -= 1  # not a lost half: the far end was never traced
                    self._edge(client, virtual, "virtual_node", failed, None, seconds, now_ns)
                elif is_client:
                    self._edge(client, server, "", failed, None, seconds, now_ns)  # type: ignore[arg-type]
                else:
                    self._edge(client, server, "", failed, seconds, None, now_ns)  # type: ignore[arg-type]

    def _edge(self, client: str, server: str, connection_type: str, failed: bool,
              server_s: float | None, client_s: float | None, now_ns: int) -> None:
        e = self._edges.get((client, server, connection_type))
        if e is not None and (server_s is None or e.server is not None) and (client_s is None or e.client is not None):
            # (exporters/_metrics.c counts an edge that exists in place; this is for _expire's)
            e.total.value += 1
            if failed:
                e.failed.value += 1
            if server_s is not None:
                e.server.add(server_s)  # type: ignore[union-attr]
            if client_s is not None:
                e.client.add(client_s)  # type: ignore[union-attr]
            return
        attrs: AttrKey = (("client", client), ("connection_type", connection_type), ("server", server))
        res = self.agent_resource
        self._add(res, SG_TOTAL, attrs, 1, now_ns)
        if failed:
            self._add(res, SG_FAILED, attrs, 1, now_ns)
        else:
            self._state(res, SG_FAILED, attrs, now_ns)  # a zero series, so failure ratios have a denominator
        if server_s is not None:
            self._observe(res, SG_SERVER, attrs, server_s, now_ns)
        if client_s is not None:
            self._observe(res, SG_CLIENT, attrs, client_s, now_ns)
        # Memoised once the counters are the edge's own; a duration stream that is missing (not
        # created yet, or overflowed) sends the edge's next use of it back here.
        streams = self._streams
        total, failures = streams.get((res, SG_TOTAL, attrs)), streams.get((res, SG_FAILED, attrs))
        if total is not None and failures is not None:
            self._edges[(client, server, connection_type)] = _Edge(
                total, failures, streams.get((res, SG_SERVER, attrs)), streams.get((res, SG_CLIENT, attrs)))  # type: ignore[arg-type]

    # --- TCP ---

    def _far_end(self, e: TcpEvent, service: str) -> str:
        known = self._endpoint_service.get((e.remote_addr, e.remote_port))
        if known is not None:
            return known
        if not e.remote_addr:
            return UNKNOWN_SERVICE
        if e.local_port in self._listen_ports.get(service, ()):
            # We are the server: the far end's port is ephemeral and would explode cardinality.
            return e.remote_addr
        return f"{e.remote_addr}:{e.remote_port}"

    def record_tcp(self, events: Iterable[TcpEvent], processes: Mapping[int, ProcessInfo]) -> None:
        res = self.agent_resource
        with self._lock:
            now_ns = self._begin(processes)
            for e in events:
                service = self._service_name(e.pid)
                attrs: AttrKey = (("destination", self._far_end(e, service)), ("source", service))
                k = e.kind
                if k == TcpEventKind.RETRANSMIT:
                    self._add(res, TCP_RETRANSMITS, attrs, 1, now_ns)
                elif k == TcpEventKind.RESET_SENT:
                    self._add(res, TCP_RESETS, (("direction", "sent"), *attrs), 1, now_ns)
                elif k == TcpEventKind.RESET_RECEIVED:
                    self._add(res, TCP_RESETS, (("direction", "received"), *attrs), 1, now_ns)
                elif k == TcpEventKind.CONNECT_FAILED:
                    self._add(res, TCP_CONNECT_FAILURES, attrs, 1, now_ns)
                elif k == TcpEventKind.RTT:
                    self._observe(res, TCP_RTT, attrs, e.value / 1e6, now_ns)

    # --- health ---

    def register_health(self, name: str, callback: Callable[[], float | int], unit: str = "1",
                        description: str = "", monotonic: bool = False) -> None:
        with self._lock:
            self._health = [h for h in self._health if h.name != name]
            self._health.append(_Health(name, callback, unit, description, monotonic, time.time_ns()))

    # --- collection ---

    def collect(self) -> MetricsData:
        """A cumulative snapshot in the SDK's data model (what its OTLP metric exporters take)."""
        now_ns = time.time_ns()
        with self._lock:
            grouped: dict[int, dict[MetricDef, list[tuple[AttrKey, _Hist | _Counter]]]] = {}
            for (res, m, attrs), st in self._streams.items():
                grouped.setdefault(res, {}).setdefault(m, []).append((attrs, st))
            snap: dict[int, list[Metric]] = {
                res: [_to_metric(m, streams, now_ns) for m, streams in by_metric.items()]
                for res, by_metric in grouped.items()
            }
            health = list(self._health)
        health_metrics: list[Metric] = []
        for h in health:
            try:
                value = h.callback()
            except Exception:  # a broken callback loses its own point, not the export
                self.health_errors += 1
                log.exception("kspan: health metric %s callback failed", h.name)
                continue
            point = NumberDataPoint(attributes={}, start_time_unix_nano=h.start_ns, time_unix_nano=now_ns,
                                    value=value)
            if h.monotonic:
                d: Sum | Gauge = Sum(data_points=[point], aggregation_temporality=AggregationTemporality.CUMULATIVE,
                                     is_monotonic=True)
            else:
                d = Gauge(data_points=[point])
            health_metrics.append(Metric(name=h.name, description=h.description, unit=h.unit, data=d))
        if health_metrics:
            snap.setdefault(self.agent_resource, []).extend(health_metrics)
        scope = InstrumentationScope(SCOPE_NAME, KSPAN_VERSION)
        return MetricsData(resource_metrics=[
            ResourceMetrics(resource=Resource(dict(self._resources[res])),
                            scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics, schema_url="")],
                            schema_url="")
            for res, metrics in snap.items() if metrics
        ])


def _to_metric(m: MetricDef, streams: list[tuple[AttrKey, _Hist | _Counter]], now_ns: int) -> Metric:
    if m.kind == "histogram":
        points = []
        for attrs, h in streams:
            assert isinstance(h, _Hist)
            points.append(HistogramDataPoint(
                attributes=dict(attrs), start_time_unix_nano=h.start_ns, time_unix_nano=now_ns,
                count=h.n, sum=h.total, bucket_counts=list(h.counts), explicit_bounds=list(m.bounds),
                min=h.lo if h.n else 0.0, max=h.hi if h.n else 0.0,
            ))
        return Metric(name=m.name, description=m.description, unit=m.unit,
                      data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE))
    cpoints = []
    for attrs, c in streams:
        assert isinstance(c, _Counter)
        cpoints.append(NumberDataPoint(attributes=dict(attrs), start_time_unix_nano=c.start_ns,
                                       time_unix_nano=now_ns, value=c.value))
    return Metric(name=m.name, description=m.description, unit=m.unit,
                  data=Sum(data_points=cpoints, aggregation_temporality=AggregationTemporality.CUMULATIVE,
                           is_monotonic=True))


class JsonLinesMetricExporter(MetricExporter):
    """The embedded default for metrics: one ExportMetricsServiceRequest per line in OTLP/JSON, the
    format the collector's otlpjsonfile receiver reads."""

    def __init__(self, path: str) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        from exporters.jsonfile import open_output

        self.path = path
        self._f: IO[str] | None = open_output(path)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

        if self._f is None:
            return MetricExportResult.FAILURE
        doc = MessageToDict(encode_metrics(metrics_data), use_integers_for_enums=True)
        try:
            self._f.write(json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n")
            self._f.flush()
        except OSError as e:
            log.warning("kspan: cannot write metrics to %s: %s", self.path, e)
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def otlp_metric_exporter(target: OtlpTarget) -> MetricExporter:
    """The SDK's OTLP metric exporter for a target, configured only from kspan's own configuration."""
    if target.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        creds = None
        if not target.insecure:
            root = None
            if target.certificate:
                with open(target.certificate, "rb") as f:
                    root = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
        return GrpcExporter(
            endpoint=target.endpoint if "://" in target.endpoint else target.grpc_target,
            insecure=target.insecure, credentials=creds, headers=tuple(target.headers) or None,
            timeout=target.timeout_s,
            compression=grpc.Compression.Gzip if target.compression == "gzip" else grpc.Compression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    session = None
    if target.certificate:
        import requests

        class _CaSession(requests.Session):
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment override a session's
            # own CA bundle (psf/requests#3829), which would silently ignore
            # OTEL_EXPORTER_OTLP_CERTIFICATE on hosts that set them; the configured CA must win.
            def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
                return super().merge_environment_settings(url, proxies, stream,
                                                          self.verify if verify is None else verify, cert)

        session = _CaSession()
    return HttpExporter(
        endpoint=target.endpoint, certificate_file=target.certificate, headers=dict(target.headers) or None,
        timeout=target.timeout_s, session=session,
        compression=Compression.Gzip if target.compression == "gzip" else Compression.NoCompression,
    )


_SDK_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)


class _LastMessage(logging.Filter):
    """Keeps the SDK exporters' per-attempt error lines out of the console (they repeat every interval
    during an outage) and remembers the last one, so kspan's single outage line can say why."""

    def __init__(self) -> None:
        super().__init__()
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.last = record.getMessage()[:300]
            return False
        return True


_SDK_ERRORS = _LastMessage()
for _name in _SDK_EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(_SDK_ERRORS)


_CUMULATIVE_WORDS = frozenset({"lost", "dropped", "unparsed", "exported", "failures", "errors", "evicted",
                               "retries", "rejected", "submitted", "received", "count"})


def _looks_cumulative(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last.endswith("_total") or last in _CUMULATIVE_WORDS


class MetricsRecorder:
    """Records spans and TCP events into metrics and exports them every interval_s on its own thread.

    record_spans()/record_tcp() are cheap and never raise (the capture path calls them)."""

    def __init__(self, cfg: ExporterConfig, interval_s: float | None = None,
                 exporter: MetricExporter | None = None, push: bool = True, scraped: bool = False) -> None:
        """push=False: no periodic export (OTLP or file) even when configured; scraped=True: record
        anyway, because something reads the aggregator on its own (the Prometheus endpoint)."""
        self.interval_s = interval_s if interval_s is not None else cfg.metrics_interval_s
        self.aggregator = MetricsAggregator(cfg.resource)
        self.destination = "nowhere"
        if exporter is None and push:
            if cfg.metrics is not None:
                exporter = otlp_metric_exporter(cfg.metrics)
                self.destination = f"OTLP {cfg.metrics.protocol} {cfg.metrics.endpoint}"
            elif cfg.metrics_output:
                try:
                    exporter = JsonLinesMetricExporter(cfg.metrics_output)
                except OSError as e:
                    raise ConfigError(f"metrics file {cfg.metrics_output}: cannot open for writing "
                                      f"({e.strerror or e}); choose a writable path") from None
                self.destination = f"file {cfg.metrics_output}"
        self._exporter = exporter
        self._recording = exporter is not None or scraped
        self.exports = 0
        self.export_failures = 0
        self.record_errors = 0
        self._failing = False
        self._stop = threading.Event()
        self._export_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if exporter is not None:
            self._thread = threading.Thread(target=self._run, name="kspan-metrics", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        """False when metrics go nowhere (traces to OTLP, no metrics endpoint, no scrape endpoint):
        recording is skipped."""
        return self._recording

    def record_spans(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> None:
        if not self._recording:
            return
        try:
            self.aggregator.record_spans(spans, processes)
        except Exception:
            self.record_errors += 1
            log.exception("kspan: bug: recording metrics for %d spans failed", len(spans))

    def record_red(self, facts: Sequence[RedFacts], processes: Mapping[int, ProcessInfo]) -> None:
        if self._exporter is None or not facts:
            return
        try:
            self.aggregator.record_red(facts, processes)
        except Exception:
            self.record_errors += 1
            log.exception("kspan: bug: recording metrics for %d unsampled exchanges failed", len(facts))

    def record_tcp(self, events: Iterable[TcpEvent], processes: Mapping[int, ProcessInfo]) -> None:
        if not self._recording:
            return
        try:
            self.aggregator.record_tcp(events, processes)
        except Exception:
            self.record_errors += 1
            log.exception("kspan: bug: recording TCP metrics failed")

    def register_health(self, name: str, callback: Callable[[], float | int], unit: str = "1",
                        description: str = "", monotonic: bool | None = None) -> None:
        """A self-health metric read at each export: monotonic=True for running totals (records lost,
        spans dropped: a cumulative Sum, so backends can take rates), False for current values (probes
        attached, traced processes: a Gauge). None infers it from the name: a last component such as
        lost, dropped, unparsed, exported, failures, errors or *_total means a running total."""
        if monotonic is None:
            monotonic = _looks_cumulative(name)
        self.aggregator.register_health(name, callback, unit, description, monotonic)

    def export_now(self, timeout_s: float = 10.0) -> bool:
        if self._exporter is None:
            return False
        with self._export_lock:
            data = self.aggregator.collect()
            if not data.resource_metrics:
                return True
            try:
                result = self._exporter.export(data, timeout_millis=timeout_s * 1000)
            except Exception as e:
                result = MetricExportResult.FAILURE
                log.debug("kspan: metric export raised %r", e)
            ok = result == MetricExportResult.SUCCESS
            if ok:
                self.exports += 1
                if self._failing:
                    log.warning("kspan: metric export to %s resumed", self.destination)
                self._failing = False
            else:
                self.export_failures += 1
                if not self._failing:
                    # Cumulative metrics lose nothing while the endpoint is down: the next export
                    # carries the totals.
                    log.warning("kspan: cannot export metrics to %s: %s; will retry every %.3g s, totals "
                                "are kept (check --otlp-endpoint / that the collector is running)",
                                self.destination, _SDK_ERRORS.last or "export failed", self.interval_s)
                self._failing = True
            return ok

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.export_now(timeout_s=max(1.0, min(10.0, self.interval_s)))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export once more (the last interval's data), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._exporter is not None:
            self.export_now(timeout_s=timeout_s)
            try:
                self._exporter.shutdown(timeout_millis=timeout_s * 1000)
            except Exception:
                log.exception("kspan: metric exporter failed to shut down cleanly")


def register_pipeline_health(recorder: MetricsRecorder, pipeline: Any) -> None:
    """kspan.export.* health metrics from an ExportPipeline's counters."""
    def stat(key: str) -> Callable[[], int]:
        return lambda: int(pipeline.stats()[key])

    recorder.register_health("kspan.export.spans.exported", stat("exported"), "{span}",
                             "Spans delivered to exporters.", monotonic=True)
    recorder.register_health("kspan.export.spans.dropped", stat("dropped"), "{span}",
                             "Spans dropped on export (queue full, rejected, or left at shutdown).",
                             monotonic=True)
    recorder.register_health("kspan.export.spans.queued", stat("queued"), "{span}",
                             "Spans waiting in the export queue.")
