"""The agent's main loop: capture -> decode -> correlate -> export, plus record and replay.

Data flows one way; this module only wires the stages and owns time (the correlator never reads
a clock itself, so a recording replays to the same spans).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.records import MetricExchange, TcpEvent
from correlator.red import RedFacts
from correlator.sampling import SamplerConfig
from correlator.segments import SegmentRecord
from correlator.spans import ProcessInfo, Span
from tracer import records
from tracer.processes import ProcessTable
from tracer.recording import RecordingMeta, RecordingWriter, read_recording

log = logging.getLogger("kspan")

SWEEP_INTERVAL_S = 1.0
STATS_INTERVAL_S = 60.0


@dataclass
class RunOptions:
    backend: str = "auto"
    btf: str | None = None  # --btf: external BTF (else KSPAN_BTF, else the kernel's)
    pids: set[int] = field(default_factory=set)
    exes: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    duration_s: float | None = None
    response_timeout_s: float = 30.0
    max_hold_s: float = 30.0
    query: str = "redact"
    routes: list[str] = field(default_factory=list)
    auto_routes: bool = True  # the route heuristic (correlator/routes.py) where no template matches
    max_routes: int = 100  # its cap per service
    ringbuf_pages: int = 4096
    max_connections: int = 16384
    otlp_endpoint: str | None = None
    otlp_protocol: str | None = None
    output: str | None = None
    console: bool = True
    metrics: bool = True
    metrics_interval_s: float = 15.0
    prometheus_port: int | None = None  # --prometheus-port: serve /metrics (off: no port is opened)
    prometheus_address: str = "127.0.0.1"
    tls: bool = True
    go: bool = True
    network_events: bool = True
    kubernetes: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # OTEL_TRACES_SAMPLER[_ARG], --sampler[-arg]
    # Workload selection on Kubernetes (tracer/workloads.py); None: the environment's, else defaults.
    include_namespaces: list[str] = field(default_factory=list)
    exclude_namespaces: list[str] = field(default_factory=list)
    trace_opt_in: bool = False
    service_name_label: str | None = None
    context_propagation: str = "tcp"  # --context-propagation: tcp | none
    context_cgroup: str | None = None  # --context-cgroup: the cgroup v2 directory it covers (None: the root)


def host_id_salt() -> bytes:
    """Span ids are hashes of kernel socket addresses, which repeat across hosts: salt them with
    this boot's id so two hosts never mint the same ids, while one host stays deterministic."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname().encode()


class _Stopper:
    def __init__(self) -> None:
        self.stop = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.stop = True


def _correlator_config(opts: RunOptions, salt: bytes) -> CorrelatorConfig:
    # 20k held spans (~1.2 KB each) keep a burst of orphans inside the agent's memory budget.
    return CorrelatorConfig(id_salt=salt, max_hold_s=opts.max_hold_s, query=opts.query, routes=list(opts.routes),
                            auto_routes=opts.auto_routes, max_routes=opts.max_routes,
                            max_held_spans=20_000, sampler=opts.sampler)


_SPAN_PID, _SPAN_PEER, _SPAN_SAMPLED = attrgetter("pid"), attrgetter("peer_pid"), attrgetter("sampled")


class SpanOutput:
    """Correlated spans and TCP events out: the export pipeline and the metrics recorder."""

    def __init__(self, opts: RunOptions, processes: ProcessTable, env: dict[str, str]) -> None:
        from exporters.config import build_exporters, describe, load_config
        from exporters.pipeline import ExportPipeline

        self.cfg = load_config(
            env,
            endpoint=opts.otlp_endpoint,
            protocol=opts.otlp_protocol,
            output=opts.output,
            console=False if not opts.console else None,
            metrics_interval_s=opts.metrics_interval_s,
        )
        print(f"kspan: {describe(self.cfg)}", file=sys.stderr)
        for note in self.cfg.notes:
            print(f"kspan: {note}", file=sys.stderr)
        self.pipeline = ExportPipeline(build_exporters(self.cfg))
        self.processes = processes
        self.metrics = None
        self.prometheus = None
        scraped = opts.prometheus_port is not None
        if opts.metrics or scraped:
            from exporters.metrics import MetricsRecorder

            # --no-metrics stops the push (OTLP or file); a scrape endpoint asked for still serves.
            self.metrics = MetricsRecorder(self.cfg, interval_s=opts.metrics_interval_s, push=opts.metrics,
                                           scraped=scraped)
        if scraped and self.metrics is not None:
            from exporters.prometheus import PrometheusEndpoint

            try:
                self.prometheus = PrometheusEndpoint(self.metrics.aggregator.collect, opts.prometheus_address,
                                                     opts.prometheus_port)
            except Exception:
                self.pipeline.shutdown(1.0)
                self.metrics.shutdown(1.0)
                raise
            print(f"kspan: metrics -> Prometheus scrape endpoint {self.prometheus.url}", file=sys.stderr)

    def spans(self, spans: list[Span]) -> None:
        """Spans out; an unsampled one (head sampling dropped its trace) only counts in metrics."""
        if not spans:
            return
        # map() over attrgetters runs the per-span loop in C: this runs on every poll.
        pids = set(map(_SPAN_PID, spans))
        peers = set(map(_SPAN_PEER, spans))
        peers.discard(0)
        procs = self.processes.snapshot(pids | peers)
        kept = spans if all(map(_SPAN_SAMPLED, spans)) else [s for s in spans if s.sampled]
        if kept:
            self.pipeline.submit(kept, procs)
        if self.metrics is not None:
            self.metrics.record_spans(spans, procs)

    def red(self, facts: list[RedFacts]) -> None:
        """Unsampled exchanges the kernel sent as metric records: metrics only, no span."""
        if facts and self.metrics is not None:
            pids = {f.pid for f in facts} | {f.peer_pid for f in facts if f.peer_pid}
            self.metrics.record_red(facts, self.processes.snapshot(pids))

    def tcp(self, events: list[TcpEvent]) -> None:
        if self.metrics is not None and events:
            procs = self.processes.snapshot({e.pid for e in events if e.pid})
            self.metrics.record_tcp(events, procs)

    def register_health(self, name: str, cb: Callable[[], int], monotonic: bool, unit: str = "1") -> None:
        if self.metrics is not None:
            self.metrics.register_health(name, cb, unit=unit, monotonic=monotonic)

    def register_pipeline_health(self) -> None:
        if self.metrics is not None:
            from exporters.metrics import register_pipeline_health

            register_pipeline_health(self.metrics, self.pipeline)

    def stats(self) -> dict[str, Any]:
        return dict(self.pipeline.stats())

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.pipeline.shutdown(timeout_s)
        if self.prometheus is not None:
            self.prometheus.close()
        if self.metrics is not None:
            self.metrics.shutdown()


def _kubernetes_metadata(opts: RunOptions) -> Any:
    """The started KubernetesMetadata in a cluster, else None."""
    if not opts.kubernetes:
        return None
    try:
        from tracer.kubernetes import KubernetesMetadata
        from tracer.workloads import WorkloadSelection
    except ImportError:
        return None
    selection = WorkloadSelection.from_settings(opts.include_namespaces, opts.exclude_namespaces,
                                                opts.trace_opt_in, opts.service_name_label)
    meta = KubernetesMetadata.from_environment(selection=selection)
    if meta is None or not meta.enabled:
        if opts.include_namespaces or opts.exclude_namespaces or opts.trace_opt_in or opts.service_name_label:
            log.warning("kspan: not in Kubernetes (no KUBERNETES_SERVICE_HOST or KSPAN_KUBERNETES_API): "
                        "the namespace, opt-in and service-name-label options have no effect")
        return None
    meta.start()
    return meta


def _kubernetes_provider(meta: Any) -> Callable[[int], tuple[str | None, dict[str, Any]]] | None:
    if meta is None:
        return None
    return lambda pid: (meta.service_name_for_pid(pid), meta.attributes_for_pid(pid))


@dataclass
class _Session:
    """What one live run wires together; correlator/out for `run`, writer for `record`."""

    capture: Any
    processes: ProcessTable
    correlator: Correlator | None
    out: SpanOutput | None
    writer: RecordingWriter | None
    attachers: list[Any]
    dispatch: RecordDispatch | None = None


# The cyclic GC's thresholds while the agent runs (see Agent.run); bench/hotpath.py uses the same.
GC_THRESHOLDS = (20_000, 50, 100)
# The record type is a little-endian u32: comparing its bytes skips a call per record.
_PROC_TYPE = records.REC_PROC.to_bytes(4, "little")
_PID = attrgetter("pid")
# The loop's housekeeping tick (the sweep, rescans of new processes, hold timeouts, the stop flag):
# shorter than the reader's longest drain interval, and it does not make a drain due.
_POLL_TIMEOUT_MS = 250
_TCP_TYPE = records.REC_TCP.to_bytes(4, "little")


class RecordDispatch:
    """Exchange, metric, segment and TCP records into the correlator, a poll's batch at a time: the
    agent's per-record hot path (bench/hotpath.py measures exactly this). The records come decoded
    by tracer/_records.c (straight from the ring buffer's mapping, or from bytes: decode()) in
    stream order: a list per run of consecutive exchange records and one per run of metric records,
    each run one correlator call; a segment record each (metric records take the span path's route
    cap and segment() runs between exchanges as the stream orders them, so every run keeps its
    place); proc and tcp records as bytes."""

    def __init__(self, correlator: Correlator, processes: ProcessTable) -> None:
        self.correlator = correlator
        self.processes = processes
        self.undecodable = 0  # records that did not decode (foreign, short, unknown type): skipped

    def decode(self, batch: Iterable[bytes], out: list[Any]) -> None:
        """Raw records (the timeout sweep's, a recording's) decoded into `out` as the ring's are."""
        self.undecodable += records.decode_batch(batch, out)

    def feed(self, batch: Iterable[bytes]) -> tuple[list[Span], list[RedFacts], list[TcpEvent]]:
        spans: list[Span] = []
        facts: list[RedFacts] = []
        tcp: list[TcpEvent] = []
        self.feed_into(batch, spans, facts, tcp)
        return spans, facts, tcp

    def feed_into(self, batch: Iterable[bytes], spans: list[Span], facts: list[RedFacts],
                  tcp: list[TcpEvent]) -> None:
        decoded: list[Any] = []
        self.decode(batch, decoded)
        self.feed_decoded(decoded, spans, facts, tcp)

    def feed_decoded(self, decoded: Iterable[Any], spans: list[Span], facts: list[RedFacts],
                     tcp: list[TcpEvent]) -> None:
        """Decoded records (see the class) into the correlator; proc records are the agent's."""
        correlator, get = self.correlator, self.processes.get
        feed_batch, metric_batch = correlator.feed_batch, correlator.metric_batch
        for item in decoded:
            t = type(item)
            if t is list:
                # read /proc while the process is alive: once per process in the run (a run's
                # records come from a handful of processes; a call per record cost ~500
                # instructions)
                for pid in set(map(_PID, item)):
                    get(pid)
                if type(item[0]) is MetricExchange:
                    metric_batch(item, facts)
                else:
                    feed_batch(item, spans)
            elif t is SegmentRecord:
                get(item.seg.pid)
                spans.extend(correlator.segment(item))
            elif item[:4] == _TCP_TYPE:
                try:
                    tcp.append(records.decode_tcp(item))
                except ValueError as e:
                    log.debug("kspan: undecodable tcp record: %s", e)
                    self.undecodable += 1


class Agent:
    """`kspan run` and `kspan record`: the live loop on the real kernel."""

    @property
    def undecodable(self) -> int:
        """Records that did not decode (foreign, short, an unknown type): counted, skipped."""
        d = self._record_dispatch
        return d.undecodable if d is not None else 0

    def __init__(self, opts: RunOptions, env: dict[str, str] | None = None, record_to: str | None = None) -> None:
        self.opts = opts
        self.env = dict(os.environ if env is None else env)
        self.record_to = record_to
        self.stopper = _Stopper()
        self._record_dispatch: RecordDispatch | None = None

    def run(self) -> int:
        from tracer.capabilities import probe
        from tracer.capture import Capture, CaptureConfig, CaptureError

        opts = self.opts
        self.stopper.install()
        caps = probe(btf=opts.btf)
        if not caps.btf:
            print(f"kspan: no kernel BTF: {caps.btf_detail}. The probes are CO-RE objects relocated against "
                  "it: pass --btf FILE (or KSPAN_BTF) with this kernel's BTF (BTFHub has them)", file=sys.stderr)
            return 2
        k8s = _kubernetes_metadata(opts)
        processes = ProcessTable(
            service_name_override=self.env.get("OTEL_SERVICE_NAME") or None,
            extra=_kubernetes_provider(k8s),
        )
        cfg = CaptureConfig(
            backend=opts.backend,
            pids=set(opts.pids),
            exe_names=set(opts.exes),
            ports=set(opts.ports),
            self_pid=os.getpid(),
            ringbuf_pages=opts.ringbuf_pages,
            max_connections=opts.max_connections,
            response_timeout_s=opts.response_timeout_s,
            families=self._families(),
            network_events=opts.network_events,
            btf_path=caps.btf_path if caps.btf_path != "/sys/kernel/btf/vmlinux" else None,
            sampler=opts.sampler.code,
            sample_threshold=opts.sampler.threshold,
            cgroup_filter=k8s is not None and k8s.kernel_filter,
            cgroup_default_trace=k8s is None or k8s.selection.default_trace,
            context_propagation=opts.context_propagation,
            context_cgroup=opts.context_cgroup,
        )
        capture = Capture(cfg, caps)
        try:
            capture.start()
        except CaptureError as e:
            print(f"kspan: {e}", file=sys.stderr)
            print("kspan: run `kspan doctor` to see what this kernel offers", file=sys.stderr)
            if k8s is not None:
                k8s.stop()
            return 2
        if k8s is not None:
            k8s.attach_capture(capture)
        attachers = self._start_attachers(capture)
        salt = host_id_salt()
        clock = WallClock.now()
        writer: RecordingWriter | None = None
        out: SpanOutput | None = None
        correlator: Correlator | None = None
        record_file = None
        try:
            if self.record_to:
                record_file = open(self.record_to, "wb")  # noqa: SIM115 - closed in finally
                writer = RecordingWriter(
                    record_file,
                    RecordingMeta(clock.offset_ns, salt.hex(), socket.gethostname(), records.EXCHANGE_SIZE,
                                  sampler=opts.sampler.describe()),
                )
            else:
                # Exporters start after the probes are attached, so the kernel sees the agent's
                # own export connections being made and can exclude them at both ends.
                out = SpanOutput(opts, processes, self.env)
                if out.prometheus is not None:
                    capture.add_self_endpoint(opts.prometheus_address, out.prometheus.port)
                correlator = Correlator(clock, _correlator_config(opts, salt))
                self._register_health(out, capture, correlator, processes)
            # Everything allocated so far (grpc, protobuf, parsed ELF/DWARF) lives as long as the
            # agent: keep the cyclic GC from rescanning it on every collection of per-request garbage.
            gc.collect()
            gc.freeze()
            # Spans, their attribute dicts and the poll's records are containers that live until
            # their batch is exported, then die by reference counting, never in cycles: at the
            # default 700 allocations a poll of 1,024 records ran some 15 young collections that
            # each rescanned what the last one kept (about 0.5 us per record, bench.hotpath).
            gc.set_threshold(*GC_THRESHOLDS)
            if opts.sampler.code:
                print(f"kspan: head sampling {opts.sampler.describe()}, decided in the kernel at each trace's root; "
                      "metrics count every request", file=sys.stderr)
            print(f"kspan: ready ({capture.probes_attached} probes, {capture.backend} backend)", file=sys.stderr)
            sys.stderr.flush()
            if correlator is not None:
                self._record_dispatch = RecordDispatch(correlator, processes)
            self._loop(_Session(capture, processes, correlator, out, writer, attachers, self._record_dispatch))
        finally:
            for a in attachers:
                close = getattr(a, "close", None)
                if close is not None:
                    close()
            # Read the kernel's counters and tables while its maps still exist.
            kernel = self._kernel_summary(capture)
            if k8s is not None:
                k8s.stop()  # its verdict thread writes to the capture's maps
            capture.close()
            if correlator is not None and out is not None:
                out.spans(correlator.flush())
                out.shutdown()
                self._print_summary(kernel, correlator, out, processes)
            if writer is not None and record_file is not None:
                writer.flush()
                record_file.close()
                print(f"kspan: recorded {writer.records} records to {self.record_to}", file=sys.stderr)
        return 0

    def _families(self) -> list[str]:
        families: list[str] = []
        if self.opts.tls:
            families.append("openssl")
        if self.opts.go:
            families += ["go_tls", "go_http"]  # crypto/tls plaintext; goroutine parentage
        return families

    def _start_attachers(self, capture: Any) -> list[Any]:
        attachers: list[Any] = []
        pids: Any = self.opts.pids or None
        if pids is None and getattr(capture, "trace_gate", None) is not None:
            # Workload selection: never read the binaries of processes in excluded pods.
            pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and capture.is_traced(int(d))]
        if "openssl" in capture.config.families:
            from tracer.ssl_libs import SslAttacher

            attachers.append(SslAttacher(capture))
        if "go_tls" in capture.config.families:
            from tracer.uprobes import GoAttacher

            attachers.append(GoAttacher(capture, inspect_in_child=True))
        for a in attachers:
            try:
                a.scan_existing(pids)
            except Exception as e:  # noqa: BLE001 - a library we cannot probe must not stop the agent
                log.warning("kspan: %s could not scan running processes: %s", type(a).__name__, e)
        return attachers

    def _register_health(self, out: SpanOutput, capture: Any, correlator: Correlator, processes: ProcessTable) -> None:
        kernel = capture.counters
        # Units are UCUM annotations: a count's unit is "{thing}", never "1", which Prometheus would
        # read as a ratio (kspan_probes_attached_ratio).
        out.register_health("kspan.probes.attached", lambda: int(capture.probes_attached), monotonic=False,
                            unit="{probe}")
        out.register_health("kspan.records.lost", lambda: int(kernel().get("ringbuf_lost", 0)), monotonic=True,
                            unit="{record}")
        out.register_health("kspan.bytes.unparsed", lambda: int(kernel().get("unparsed_bytes", 0))
                            + int(correlator.stats.as_dict().get("unparsed_bytes", 0)), monotonic=True, unit="By")
        out.register_health("kspan.spans.orphaned", lambda: int(correlator.stats.as_dict().get("orphaned_spans", 0)),
                            monotonic=True, unit="{span}")
        out.register_health("kspan.parents.ambiguous",
                            lambda: int(correlator.stats.as_dict().get("ambiguous_parents", 0)), monotonic=True,
                            unit="{span}")
        out.register_health("kspan.processes.traced", lambda: processes.traced, monotonic=False, unit="{process}")
        out.register_health("kspan.exchanges.sampled", lambda: _sampling_counts(correlator)[0], monotonic=True,
                            unit="{exchange}")
        out.register_health("kspan.exchanges.unsampled", lambda: _sampling_counts(correlator)[1], monotonic=True,
                            unit="{exchange}")
        out.register_pipeline_health()

    def _loop(self, ses: _Session) -> None:
        capture, correlator, out = ses.capture, ses.correlator, ses.out
        deadline = None if self.opts.duration_s is None else time.monotonic() + self.opts.duration_s
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        while not self.stopper.stop:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            polled = self._poll(ses, _POLL_TIMEOUT_MS)
            if now >= next_sweep:
                swept = capture.sweep(time.monotonic_ns())
                if ses.dispatch is not None:
                    ses.dispatch.decode(swept, polled)
                else:
                    polled.extend(swept)
                next_sweep = now + SWEEP_INTERVAL_S
            self._dispatch(polled, ses)
            for a in ses.attachers:
                # A process loads libssl when it first needs it (Python on `import ssl`), after its
                # exec: the attacher looks again at recently started processes.
                rescan = getattr(a, "rescan_pending", None)
                if rescan is not None:
                    try:
                        rescan()
                    except Exception as e:  # noqa: BLE001 - keep tracing the rest of the host
                        log.warning("kspan: %s rescan failed: %s", type(a).__name__, e)
            if correlator is not None and out is not None:
                out.spans(correlator.advance(time.monotonic_ns()))
        # Records the kernel emitted before the stop are still in the ring buffer: drain them so a
        # request answered just before SIGTERM still becomes a span.
        for _ in range(100):
            polled = self._poll(ses, 0)
            if not polled:
                break
            self._dispatch(polled, ses)

    @staticmethod
    def _poll(ses: _Session, timeout_ms: int) -> list[Any]:
        """A poll's records: decoded from the ring's memory for the correlator (`kspan run`), or the
        raw bytes the recording keeps (`kspan record`)."""
        if ses.dispatch is None:
            return ses.capture.poll(timeout_ms)
        polled: list[Any] = []
        ses.dispatch.undecodable += ses.capture.poll_decoded(timeout_ms, polled)
        return polled

    def _dispatch(self, polled: Iterable[Any], ses: _Session) -> None:
        processes, out, writer, dispatch = ses.processes, ses.out, ses.writer, ses.dispatch
        spans: list[Span] = []
        facts: list[RedFacts] = []
        tcp: list[Any] = []
        run: list[Any] = []  # the decoded records up to the next proc record, fed as one batch
        for item in polled:
            if type(item) is not bytes or item[:4] != _PROC_TYPE:
                if writer is not None:
                    kind = records.record_type(item)
                    if kind == records.REC_EXCHANGE or kind == records.REC_METRIC:
                        writer.process(processes.get(int.from_bytes(item[4:8], "little")))
                    writer.record(item)
                else:
                    run.append(item)
                continue
            # Exchanges before an exec are fed before its hooks run, as the kernel ordered them.
            if run and dispatch is not None:
                dispatch.feed_decoded(run, spans, facts, tcp)
            run = []
            self._proc(item, ses)
            if writer is not None:
                writer.record(item)
        if run and dispatch is not None:
            dispatch.feed_decoded(run, spans, facts, tcp)
        if out is not None:
            out.spans(spans)
            out.red(facts)
            out.tcp(tcp)

    @staticmethod
    def _proc(data: bytes, ses: _Session) -> None:
        try:
            proc = records.decode_proc(data)
        except ValueError:
            if ses.dispatch is not None:
                ses.dispatch.undecodable += 1
            return
        if proc.event == records.PROC_EXEC:
            ses.processes.note_exec(proc.pid, proc.comm)
        # Reading a binary's symbols and DWARF costs up to seconds: only for processes the
        # filters let through (exits are cheap and clean up state).
        exec_traced = proc.event == records.PROC_EXEC and ses.capture.is_traced(proc.pid)
        for a in ses.attachers:
            if proc.event == records.PROC_EXEC and not exec_traced:
                break
            hook = getattr(a, "on_exec" if proc.event == records.PROC_EXEC else "on_exit", None)
            if hook is None:
                continue
            try:
                hook(proc.pid)
            except Exception as e:  # noqa: BLE001 - keep tracing the rest of the host
                log.warning("kspan: %s pid %d: %s", type(a).__name__, proc.pid, e)

    @staticmethod
    def _kernel_summary(capture: Any) -> dict[str, int]:
        try:
            counts = dict(capture.counters())
        except Exception:  # noqa: BLE001 - a diagnostic, never worth failing the shutdown for
            counts = {}
        # State left behind, so an operator (and the churn test) can see nothing grows unbounded.
        counts["live_kernel_connections"] = _table_size(capture, "conns")
        counts["live_kernel_tuples"] = _table_size(capture, "tuples")
        return counts

    def _print_summary(self, kernel: dict[str, int], correlator: Correlator, out: SpanOutput,
                       processes: ProcessTable) -> None:
        stats = correlator.stats.as_dict()
        counts = {k: v for k, v in {**kernel, **stats, **out.stats()}.items() if isinstance(v, int) and v}
        # both count unparsed bytes (the kernel's that never began a request, the correlator's of
        # exchanges it could not parse), as kspan.bytes.unparsed does: the correlator's alone hid the kernel's
        unparsed = int(kernel.get("unparsed_bytes", 0)) + int(stats.get("unparsed_bytes", 0))
        counts.pop("unparsed_bytes", None)
        if unparsed:
            counts["unparsed_bytes"] = unparsed
        counts["live_kernel_connections"] = kernel.get("live_kernel_connections", -1)
        counts["live_processes"] = processes.traced
        counts["exchanges_sampled"], counts["exchanges_unsampled"] = _sampling_counts(correlator)
        counts.update({k: v for k, v in correlator.protocols.counters.items() if v})
        if self.undecodable:
            counts["undecodable_records"] = self.undecodable
        print("kspan: stopped; " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), file=sys.stderr)


def _sampling_counts(correlator: Correlator) -> tuple[int, int]:
    """(sampled, unsampled) exchanges: full records by head sampling's decision, plus the metric
    records the kernel sends for unsampled ones."""
    st = correlator.stats
    return st.sampled_exchanges, st.unsampled_exchanges + st.metric_records - st.metric_unparsed


def _table_size(capture: Any, name: str) -> int:
    """Entries in one of the kernel's maps (read at stop, before the maps go away); -1 if unknown."""
    try:
        return sum(1 for _ in capture.table_keys(name))
    except Exception:  # noqa: BLE001 - a diagnostic, never worth failing the shutdown for
        return -1


def replay(path: str, opts: RunOptions, env: dict[str, str] | None = None) -> int:
    """Feed a recording through the correlator and exporters. Stream time (the records' own
    timestamps) drives the correlator's timeouts, so a replay gives the same spans every time."""
    env = dict(os.environ if env is None else env)
    processes = ProcessTable(service_name_override=env.get("OTEL_SERVICE_NAME") or None)
    with open(path, "rb") as f:
        meta, frames = read_recording(f)
        if meta.exchange_size not in (records.EXCHANGE_SIZE, records.LEGACY_EXCHANGE_SIZE):
            print(
                f"kspan: recording has {meta.exchange_size}-byte exchange records, this kspan reads "
                f"{records.EXCHANGE_SIZE} (or {records.LEGACY_EXCHANGE_SIZE} from version 1 recordings): "
                "record it again with this version",
                file=sys.stderr,
            )
            return 2
        # Version 1 recordings predate kernel-fixed ids: the correlator links and samples them.
        legacy = meta.exchange_size == records.LEGACY_EXCHANGE_SIZE
        out = SpanOutput(opts, processes, env)
        correlator = Correlator(WallClock(meta.clock_offset_ns), _correlator_config(opts, bytes.fromhex(meta.id_salt)))
        stream_now = 0
        undecodable = 0
        for kind, payload in frames:
            if kind == "process":
                assert isinstance(payload, ProcessInfo)
                processes.put(payload)
                continue
            assert isinstance(payload, bytes)
            rtype = records.record_type(payload)
            if rtype == records.REC_EXCHANGE:
                try:
                    ex = records.decode_exchange(payload, legacy=legacy)
                except ValueError:
                    undecodable += 1
                    continue
                stream_now = max(stream_now, ex.resp_end_ns, ex.req_end_ns)
                out.spans(correlator.feed(ex))
                out.spans(correlator.advance(stream_now))
            elif rtype == records.REC_METRIC:
                try:
                    mx = records.decode_metric(payload)
                except ValueError:
                    undecodable += 1
                    continue
                fact = correlator.metric(mx)
                if fact is not None:
                    out.red([fact])
            elif rtype == records.REC_SEGMENT:
                try:
                    seg = records.decode_segment(payload)
                except ValueError:
                    undecodable += 1
                    continue
                out.spans(correlator.segment(seg))
            elif rtype == records.REC_TCP:
                out.tcp([records.decode_tcp(payload)])
        out.spans(correlator.flush())
        out.shutdown()
    stats = correlator.stats.as_dict()
    print(
        f"kspan: replayed {stats.get('exchanges', 0)} exchanges into {stats.get('spans', 0)} spans"
        + (f", {stats['metric_records']} unsampled exchanges into metrics" if stats.get("metric_records") else "")
        + (f"; {undecodable} undecodable records skipped" if undecodable else ""),
        file=sys.stderr,
    )
    return 0
