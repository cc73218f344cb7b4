"""The `kspan` command: run, record, replay, doctor, topology."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

QUERY_MODES = ("keep", "redact", "drop")
BACKENDS = ("auto", "fentry", "kprobes", "tracepoints")
PROTOCOLS = ("grpc", "http/protobuf")
CONTEXT_PROPAGATION = ("tcp", "none")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"kspan: {message} (see `kspan {self.prog.split()[-1]} --help`)\n")


def _bounded_int(what: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None
        if v < lo or (hi is not None and v > hi):
            bound = f"outside {lo}-{hi}" if hi is not None else "must be positive"
            raise argparse.ArgumentTypeError(f"{what} {v} {bound}")
        return v

    return parse


_port = _bounded_int("port", 1, 65535)
_pid = _bounded_int("pid", 1)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be greater than 0")
    return v


def _add_capture_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to trace (default: every process on the host except kspan)")
    g.add_argument("--pid", type=_pid, action="append", default=[], help="trace this process (repeatable)")
    g.add_argument("--exe", action="append", default=[], metavar="NAME",
                   help="trace processes whose executable (or script) is NAME, running or started later (repeatable)")
    g.add_argument("--port", type=_port, action="append", default=[],
                   help="trace only connections with this local or remote port (repeatable)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="socket capture: fentry, else kprobes, else tracepoints, as the kernel allows (default: auto)")
    _add_btf_arg(g)
    g.add_argument("--no-tls", action="store_true", help="do not attach OpenSSL uprobes")
    g.add_argument("--no-go", action="store_true", help="do not attach Go uprobes")
    g.add_argument("--ringbuf-pages", type=int, default=4096,
                   help="ring buffer size in pages, a power of two (default 4096 = 16 MiB: ~1 s of 10k req/s)")
    g.add_argument("--max-connections", type=_bounded_int("--max-connections", 1024), default=16384,
                   help="connections tracked at once in the kernel (LRU; ~1.7 KB of kernel memory each)")
    g.add_argument("--duration", type=_positive, metavar="SECONDS", help="stop by itself after SECONDS")
    g = p.add_argument_group("head sampling (decided in the kernel at each trace's root; metrics count every request)")
    g.add_argument("--sampler", metavar="NAME",
                   help="always_on (default), always_off, traceidratio, parentbased_always_on, "
                   "parentbased_always_off or parentbased_traceidratio (overrides OTEL_TRACES_SAMPLER)")
    g.add_argument("--sampler-arg", metavar="RATIO",
                   help="the ratio of traces the *traceidratio samplers keep, 0 to 1 (default 1; overrides "
                   "OTEL_TRACES_SAMPLER_ARG)")
    g = p.add_argument_group("Kubernetes workload selection (enforced in the kernel, by cgroup)")
    g.add_argument("--include-namespace", action="append", default=[], metavar="GLOB",
                   help="trace pods only in namespaces matching GLOB (repeatable; default: all; "
                   "env KSPAN_INCLUDE_NAMESPACES, comma-separated)")
    g.add_argument("--exclude-namespace", action="append", default=[], metavar="GLOB",
                   help="never trace pods in namespaces matching GLOB (repeatable; replaces the default: "
                   "kube-system and kspan's own namespace; env KSPAN_EXCLUDE_NAMESPACES)")
    g.add_argument("--trace-opt-in", action="store_true",
                   help='trace only pods labelled or annotated kspan.io/trace: "true" (env KSPAN_TRACE_OPT_IN)')
    g.add_argument("--service-name-label", metavar="LABEL",
                   help="take service.name from this pod label, e.g. app.kubernetes.io/name "
                   "(env KSPAN_SERVICE_NAME_LABEL)")
    g.add_argument("--context-propagation", choices=CONTEXT_PROPAGATION, default="tcp",
                   help="carry each client request's trace context to the next host in a TCP header option "
                   "(kind 25), so spans across hosts join one trace; none: traces end at this host (default: tcp)")
    g.add_argument("--context-cgroup", metavar="DIR",
                   help="cgroup v2 directory whose sockets carry and read the context (default: the cgroup v2 "
                   "root, i.e. every socket on the host)")


def _add_btf_arg(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    g.add_argument("--btf", metavar="FILE",
                   help="the kernel's BTF for a kernel without /sys/kernel/btf/vmlinux (BTFHub format; "
                   "default: $KSPAN_BTF, else the kernel's own)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output (default with no endpoint: console tree + OTLP-JSON file)")
    g.add_argument("--otlp-endpoint", metavar="URL",
                   help="OTLP endpoint (overrides OTEL_EXPORTER_OTLP_ENDPOINT), e.g. http://localhost:4317")
    g.add_argument("--otlp-protocol", choices=PROTOCOLS, help="overrides OTEL_EXPORTER_OTLP_PROTOCOL")
    g.add_argument("--output", metavar="FILE", help="OTLP-JSON lines file (default kspan-traces.jsonl)")
    g.add_argument("--quiet", action="store_true", help="no console span tree")
    g.add_argument("--no-metrics", action="store_true", help="do not export metrics")
    g.add_argument("--metrics-interval", type=_positive, default=15.0, metavar="SECONDS")
    g.add_argument("--prometheus-port", type=_port, metavar="PORT",
                   help="serve /metrics for Prometheus to scrape on PORT (default: $KSPAN_PROMETHEUS_PORT, else off)")
    g.add_argument("--prometheus-address", metavar="ADDR",
                   help="address the /metrics endpoint binds (default: $KSPAN_PROMETHEUS_ADDRESS, else 127.0.0.1)")
    g = p.add_argument_group("correlation")
    g.add_argument("--query", choices=QUERY_MODES, default="redact",
                   help="url.query: keep, redact values of sensitive keys (default), or drop")
    g.add_argument("--route", action="append", default=[], metavar="TEMPLATE",
                   help="a route template such as /users/{id}; server spans matching it are named 'GET /users/{id}'")
    g.add_argument("--no-auto-routes", action="store_true",
                   help="no http.route for paths no --route template matches (default: made by a heuristic, "
                   "numeric, UUID, hex and random-looking segments as {id})")
    g.add_argument("--max-routes", type=_bounded_int("--max-routes", 1), default=100, metavar="N",
                   help="distinct heuristic routes per service (listening address and port); later ones are "
                   "named /{overflow} (default 100)")
    g.add_argument("--response-timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="a request with no response for this long ends as an error span")
    g.add_argument("--max-hold", type=_positive, default=30.0, metavar="SECONDS",
                   help="longest a span waits for its parent before it is exported as an orphan")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kspan", description="Zero-code OpenTelemetry tracing from the kernel (eBPF).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="trace and export spans and metrics until Ctrl-C")
    _add_capture_args(run)
    _add_output_args(run)
    rec = sub.add_parser("record", help="save the raw kernel records to FILE (replay them later)")
    rec.add_argument("file")
    _add_capture_args(rec)
    rep = sub.add_parser("replay", help="feed a recording through the correlator and exporters")
    rep.add_argument("file")
    _add_output_args(rep)
    doc = sub.add_parser("doctor", help="explain what this kernel offers and which backend `run` will use")
    _add_btf_arg(doc)
    topo = sub.add_parser("topology", help="print and draw the observed service graph")
    try:
        from exporters.topology import add_topology_arguments

        add_topology_arguments(topo)
    except ImportError:
        pass
    return parser


def _options(args: argparse.Namespace):  # -> RunOptions (imported lazily: keeps doctor cheap)
    from tracer.agent import RunOptions

    opts = RunOptions()
    for name, attr in (("pid", "pids"), ("exe", "exes"), ("port", "ports")):
        if hasattr(args, name):
            setattr(opts, attr, set(getattr(args, name)))
    for name, attr in (
        ("backend", "backend"), ("btf", "btf"), ("duration", "duration_s"), ("ringbuf_pages", "ringbuf_pages"),
        ("max_connections", "max_connections"), ("context_propagation", "context_propagation"),
        ("context_cgroup", "context_cgroup"),
        ("include_namespace", "include_namespaces"), ("exclude_namespace", "exclude_namespaces"),
        ("trace_opt_in", "trace_opt_in"), ("service_name_label", "service_name_label"),
        ("otlp_endpoint", "otlp_endpoint"), ("otlp_protocol", "otlp_protocol"), ("output", "output"),
        ("query", "query"), ("route", "routes"), ("max_routes", "max_routes"),
        ("response_timeout", "response_timeout_s"),
        ("max_hold", "max_hold_s"), ("metrics_interval", "metrics_interval_s"),
    ):
        if hasattr(args, name):
            setattr(opts, attr, getattr(args, name))
    opts.tls = not getattr(args, "no_tls", False)
    opts.auto_routes = not getattr(args, "no_auto_routes", False)
    opts.go = not getattr(args, "no_go", False)
    opts.console = not getattr(args, "quiet", False)
    opts.metrics = not getattr(args, "no_metrics", False)
    if hasattr(args, "prometheus_port"):
        _prometheus_options(args, opts, os.environ)
    pages = opts.ringbuf_pages
    if pages <= 0 or pages & (pages - 1):
        raise SystemExit(f"kspan: --ringbuf-pages {pages} must be a power of two (e.g. 1024, 2048)")
    if hasattr(args, "sampler"):
        from correlator.sampling import SamplingError, sampler_from

        try:
            opts.sampler, notes = sampler_from(os.environ, args.sampler, args.sampler_arg)
        except SamplingError as e:
            raise SystemExit(f"kspan: {e} (--sampler-arg / OTEL_TRACES_SAMPLER_ARG)") from None
        for note in notes:
            print(f"kspan: {note}", file=sys.stderr)
    return opts


def _prometheus_options(args: argparse.Namespace, opts, env: Mapping[str, str]) -> None:
    """--prometheus-port/--prometheus-address, else KSPAN_PROMETHEUS_PORT/KSPAN_PROMETHEUS_ADDRESS."""
    port = args.prometheus_port
    text = env.get("KSPAN_PROMETHEUS_PORT", "").strip()
    if port is None and text:
        try:
            port = _port(text)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"kspan: KSPAN_PROMETHEUS_PORT={text!r}: {e}") from None
    opts.prometheus_port = port
    address = args.prometheus_address or env.get("KSPAN_PROMETHEUS_ADDRESS", "").strip()
    if address:
        opts.prometheus_address = address.strip("[]")  # "[::1]" as well as "::1"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command == "doctor":
        from tracer.doctor import run_doctor

        return run_doctor(btf=args.btf)
    if args.command == "topology":
        from exporters.topology import run_topology

        return run_topology(args)
    if args.command in ("run", "record") and os.geteuid() != 0:
        print("kspan: must run as root (it loads eBPF programs); try `sudo kspan ...` or `kspan doctor`",
              file=sys.stderr)
        return 2
    from exporters.config import ConfigError

    opts = _options(args)
    try:
        if args.command == "run":
            from tracer.agent import Agent

            return Agent(opts).run()
        if args.command == "record":
            from tracer.agent import Agent

            return Agent(opts, record_to=args.file).run()
        if args.command == "replay":
            from tracer.agent import replay
            from tracer.recording import RecordingError

            try:
                return replay(args.file, opts)
            except (RecordingError, OSError) as e:
                print(f"kspan: cannot replay {args.file}: {e}", file=sys.stderr)
                return 2
    except ConfigError as e:
        print(f"kspan: configuration error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
