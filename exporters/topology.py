"""`kspan topology`: the observed service graph, as a table and as an SVG/PNG picture.

Input: kspan's OTLP-JSON lines file (exporters/jsonfile.py: one ExportTraceServiceRequest per
line, hex ids, the service in the resource attribute `service.name`), a list of span dicts, or the
correlator's own spans.

Nodes are services; an edge is a call: a CLIENT span and the SERVER span that is its child in
another service. A client span with no server child (a database, an external API, a service
kspan does not see) is an edge to a virtual node named `server.address:server.port`. A SERVER span
with no parent at all was called from outside: an edge from the virtual node `user` (the name
Tempo's and the collector's service graphs use). Each edge carries its request rate, error rate,
average and p95 latency (measured by the caller: what it waited). A node's figures are those of
the requests it served. Rules colour a node or an edge red (error rate over --error-rate percent)
or yellow (average latency over --latency-ms), so a failing or slow dependency stands out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from correlator.spans import ProcessInfo, Span

log = logging.getLogger("kspan.topology")

SERVER, CLIENT = 2, 3
STATUS_ERROR = 2
USER_NODE = "user"
UNKNOWN_SERVICE = "unknown_service"

RED = "#d62728"
YELLOW = "#f2b701"
OK = "#2ca02c"
NEUTRAL = "#7f7f7f"

_KIND_NAMES = {"SERVER": SERVER, "SPAN_KIND_SERVER": SERVER, "CLIENT": CLIENT, "SPAN_KIND_CLIENT": CLIENT}
_STATUS_NAMES = {"ERROR": STATUS_ERROR, "STATUS_CODE_ERROR": STATUS_ERROR}


# ---------------------------------------------------------------------------------------- input


@dataclass(slots=True)
class TopoSpan:
    """The few span fields a service graph needs."""

    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    error: bool
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


@dataclass(slots=True)
class LoadStats:
    lines: int = 0
    spans: int = 0
    bad_lines: int = 0
    bad_spans: int = 0


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return str(value or "").lower()


def _kind(value: Any) -> int:
    if isinstance(value, str):
        return _KIND_NAMES.get(value.upper(), 0)
    return int(value or 0)


def _is_error(status: Any) -> bool:
    if isinstance(status, Mapping):
        status = status.get("code", 0)
    if isinstance(status, str):
        return _STATUS_NAMES.get(status.upper(), 0) == STATUS_ERROR
    return int(status or 0) == STATUS_ERROR


def span_from_dict(d: Mapping[str, Any]) -> TopoSpan:
    """A span dict with keys trace_id, span_id, parent_span_id (hex str or bytes), service, kind
    (2/3 or "SERVER"/"CLIENT"), start_ns, end_ns, status (2 or "ERROR" for an error) and
    attributes. Raises KeyError/ValueError/TypeError on a malformed dict."""
    return TopoSpan(
        trace_id=_hex(d["trace_id"]),
        span_id=_hex(d["span_id"]),
        parent_span_id=_hex(d.get("parent_span_id")),
        service=str(d.get("service") or UNKNOWN_SERVICE),
        kind=_kind(d.get("kind")),
        start_ns=int(d["start_ns"]),
        end_ns=int(d["end_ns"]),
        error=_is_error(d.get("status")),
        attributes=dict(d.get("attributes") or {}),
    )


def spans_from_kspan(spans: Iterable[Span], processes: Mapping[int, ProcessInfo]) -> list[TopoSpan]:
    """The correlator's spans, named by their process's service (tests and in-process callers)."""
    out = []
    for s in spans:
        info = processes.get(s.pid)
        out.append(TopoSpan(
            trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
            parent_span_id=s.parent_span_id.hex() if s.parent_span_id else "",
            service=info.service_name if info is not None else UNKNOWN_SERVICE,
            kind=int(s.kind), start_ns=s.start_ns, end_ns=s.end_ns,
            error=int(s.status) == STATUS_ERROR, attributes=dict(s.attributes),
        ))
    return out


def _json_value(value: Mapping[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    return None


def _json_attributes(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {kv["key"]: _json_value(kv.get("value") or {}) for kv in items or () if "key" in kv}


def spans_from_otlp_json(request: Mapping[str, Any], stats: LoadStats | None = None) -> list[TopoSpan]:
    """The spans of one OTLP/JSON ExportTraceServiceRequest (or TracesData)."""
    stats = stats if stats is not None else LoadStats()
    out: list[TopoSpan] = []
    for resource_spans in request.get("resourceSpans") or ():
        resource = _json_attributes((resource_spans.get("resource") or {}).get("attributes"))
        service = str(resource.get("service.name") or UNKNOWN_SERVICE)
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for s in scope_spans.get("spans") or ():
                try:
                    out.append(TopoSpan(
                        trace_id=str(s["traceId"]).lower(), span_id=str(s["spanId"]).lower(),
                        parent_span_id=str(s.get("parentSpanId") or "").lower(), service=service,
                        kind=_kind(s.get("kind")), start_ns=int(s["startTimeUnixNano"]),
                        end_ns=int(s["endTimeUnixNano"]), error=_is_error(s.get("status") or {}),
                        attributes=_json_attributes(s.get("attributes")),
                    ))
                except (KeyError, TypeError, ValueError):
                    stats.bad_spans += 1
    stats.spans += len(out)
    return out


def load_jsonl(stream: IO[str], stats: LoadStats | None = None) -> list[TopoSpan]:
    """Every span of an OTLP-JSON lines stream. A malformed line (a write cut short by a full disk,
    a foreign line) is counted in `stats.bad_lines` and skipped, never fatal."""
    stats = stats if stats is not None else LoadStats()
    spans: list[TopoSpan] = []
    for line in stream:
        line = line.strip()
        if not line:
            continue
        stats.lines += 1
        try:
            request = json.loads(line)
        except ValueError:
            stats.bad_lines += 1
            continue
        if not isinstance(request, dict):
            stats.bad_lines += 1
            continue
        spans.extend(spans_from_otlp_json(request, stats))
    return spans


# ---------------------------------------------------------------------------------------- graph


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really observed."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class CallStats:
    requests: int = 0
    errors: int = 0
    durations_ms: list[float] = field(default_factory=list)

    def add(self, duration_ms: float, error: bool) -> None:
        self.requests += 1
        self.errors += int(error)
        self.durations_ms.append(duration_ms)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def avg_ms(self) -> float:
        return sum(self.durations_ms) / len(self.durations_ms) if self.durations_ms else 0.0

    @property
    def p95_ms(self) -> float:
        return percentile(self.durations_ms, 95)


@dataclass(slots=True)
class Node:
    name: str
    virtual: bool = False  # not a traced service: `user` or a server.address:port peer
    served: CallStats = field(default_factory=CallStats)


@dataclass(slots=True)
class Edge:
    client: str
    server: str
    stats: CallStats = field(default_factory=CallStats)


@dataclass(slots=True)
class ServiceGraph:
    nodes: dict[str, Node]
    edges: dict[tuple[str, str], Edge]
    window_s: float  # the time the spans cover, for rates

    def rate(self, stats: CallStats) -> float:
        return stats.requests / self.window_s if self.window_s > 0 else float(stats.requests)


@dataclass(frozen=True, slots=True)
class Rules:
    """Colour rules: red above `error_rate` (a fraction), yellow above `latency_ms` average."""

    error_rate: float = 0.10
    latency_ms: float = 500.0

    def colour(self, stats: CallStats) -> str:
        if stats.requests == 0:
            return NEUTRAL
        if stats.error_rate > self.error_rate:
            return RED
        if stats.avg_ms > self.latency_ms:
            return YELLOW
        return OK


def _peer_name(attributes: Mapping[str, Any]) -> str:
    system = attributes.get("db.system.name")
    if system:
        # a database or cache: named by its system, then where it listens
        where = _address(attributes)
        return f"{system} {where}" if where != "unknown peer" else str(system)
    return _address(attributes)


def _address(attributes: Mapping[str, Any]) -> str:
    host = attributes.get("server.address") or attributes.get("network.peer.address")
    port = attributes.get("server.port") or attributes.get("network.peer.port")
    if not host:
        return "unknown peer"
    host = str(host)
    if ":" in host and not host.startswith("["):  # an IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def build_graph(spans: Iterable[TopoSpan | Mapping[str, Any]]) -> ServiceGraph:
    """The service graph of a set of spans (TopoSpan or span dicts, see span_from_dict)."""
    items = [s if isinstance(s, TopoSpan) else span_from_dict(s) for s in spans]
    by_id: dict[tuple[str, str], TopoSpan] = {}
    children: dict[tuple[str, str], list[TopoSpan]] = defaultdict(list)
    for s in items:
        by_id[(s.trace_id, s.span_id)] = s
        if s.parent_span_id:
            children[(s.trace_id, s.parent_span_id)].append(s)
    nodes: dict[str, Node] = {}
    edges: dict[tuple[str, str], Edge] = {}

    def node(name: str, virtual: bool = False) -> Node:
        if name not in nodes:
            nodes[name] = Node(name, virtual)
        return nodes[name]

    def edge(client: str, server: str) -> Edge:
        key = (client, server)
        if key not in edges:
            edges[key] = Edge(client, server)
        return edges[key]

    for s in items:
        if s.kind == SERVER and "db.system.name" in s.attributes:
            continue  # a database's own spans: its node is drawn by the calls its clients make
        if s.kind == SERVER:
            node(s.service).served.add(s.duration_ms, s.error)
            if not s.parent_span_id:
                caller = USER_NODE
            elif (s.trace_id, s.parent_span_id) not in by_id:
                # The caller's span is not in this data (another host's agent, or an untraced
                # client that sent a traceparent): name the caller by its address.
                caller = str(s.attributes.get("client.address") or s.attributes.get("network.peer.address")
                             or USER_NODE)
            else:
                continue  # the caller's CLIENT span draws this edge
            node(caller, virtual=True)
            # Called from outside: the server's own duration is all that was measured.
            edge(caller, s.service).stats.add(s.duration_ms, s.error)
        elif s.kind == CLIENT:
            node(s.service)
            servers = [c for c in children.get((s.trace_id, s.span_id), ()) if c.kind == SERVER]
            remote = [c for c in servers if c.service != s.service]
            if remote:
                server = remote[0]
                edge(s.service, server.service).stats.add(s.duration_ms, s.error or server.error)
            elif not servers:
                peer = _peer_name(s.attributes)
                node(peer, virtual=True).served.add(s.duration_ms, s.error)
                edge(s.service, peer).stats.add(s.duration_ms, s.error)
            # A client whose server child is in its own service is a call to itself: no edge.
    starts = [s.start_ns for s in items]
    ends = [s.end_ns for s in items]
    window_s = (max(ends) - min(starts)) / 1e9 if items else 0.0
    return ServiceGraph(nodes=nodes, edges=edges, window_s=max(window_s, 1.0) if items else 0.0)


# ---------------------------------------------------------------------------------------- table


def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def _verdict(colour: str) -> str:
    return {RED: "RED", YELLOW: "YELLOW", OK: "ok", NEUTRAL: "-"}[colour]


def render_table(graph: ServiceGraph, rules: Rules) -> str:
    """The graph as two plain-text tables: edges (calls) and nodes (services)."""
    lines = [f"service graph over {graph.window_s:.1f} s: {len(graph.nodes)} nodes, {len(graph.edges)} edges "
             f"(red: error rate > {rules.error_rate * 100:g}%, yellow: average latency > {rules.latency_ms:g} ms)",
             ""]
    edge_rows = [("CLIENT", "SERVER", "REQUESTS", "REQ/S", "ERRORS", "ERR %", "AVG MS", "P95 MS", "STATUS")]
    for e in sorted(graph.edges.values(), key=lambda e: (e.client, e.server)):
        st = e.stats
        edge_rows.append((e.client, e.server, str(st.requests), f"{graph.rate(st):.2f}", str(st.errors),
                          f"{st.error_rate * 100:.1f}", _fmt_ms(st.avg_ms), _fmt_ms(st.p95_ms),
                          _verdict(rules.colour(st))))
    node_rows = [("SERVICE", "KIND", "SERVED", "REQ/S", "ERRORS", "ERR %", "AVG MS", "P95 MS", "STATUS")]
    for n in sorted(graph.nodes.values(), key=lambda n: (n.virtual, n.name)):
        st = n.served
        node_rows.append((n.name, "virtual" if n.virtual else "service", str(st.requests),
                          f"{graph.rate(st):.2f}", str(st.errors), f"{st.error_rate * 100:.1f}",
                          _fmt_ms(st.avg_ms), _fmt_ms(st.p95_ms), _verdict(rules.colour(st))))
    for title, rows in (("CALLS", edge_rows), ("SERVICES", node_rows)):
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append(title)
        for row in rows:
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- layout


def layered_layout(graph: ServiceGraph) -> dict[str, tuple[int, float]]:
    """(layer, row) per node for a left-to-right picture: a node's layer is the longest call path
    leading to it (cycles broken where a depth-first walk meets them), rows ordered by the mean row
    of the callers so that edges cross as little as a simple sweep can manage."""
    succ: dict[str, list[str]] = defaultdict(list)
    for client, server in sorted(graph.edges):
        if client != server:
            succ[client].append(server)
    names = sorted(graph.nodes)
    # Break cycles: drop the edges a DFS finds going back to a node on its stack.
    state: dict[str, int] = {}
    acyclic: dict[str, list[str]] = defaultdict(list)

    def visit(start: str) -> None:
        stack = [(start, iter(succ.get(start, ())))]
        state[start] = 1
        while stack:
            current, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[current] = 2
                stack.pop()
                continue
            if state.get(nxt) == 1:
                continue  # back edge
            acyclic[current].append(nxt)
            if nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(succ.get(nxt, ()))))

    indegree = {n: 0 for n in names}
    for targets in succ.values():
        for t in targets:
            indegree[t] += 1
    for n in sorted(names, key=lambda n: (indegree[n] > 0, n)):
        if n not in state:
            visit(n)
    # Longest path layering on the acyclic graph (Kahn order).
    incoming = {n: 0 for n in names}
    for targets in acyclic.values():
        for t in targets:
            incoming[t] += 1
    layer = {n: 0 for n in names}
    ready = [n for n in names if incoming[n] == 0]
    while ready:
        n = ready.pop()
        for t in acyclic.get(n, ()):
            layer[t] = max(layer[t], layer[n] + 1)
            incoming[t] -= 1
            if incoming[t] == 0:
                ready.append(t)
    layers: dict[int, list[str]] = defaultdict(list)
    for n in names:
        layers[layer[n]].append(n)
    preds: dict[str, list[str]] = defaultdict(list)
    for client, targets in acyclic.items():
        for t in targets:
            preds[t].append(client)
    row: dict[str, float] = {}
    for depth in sorted(layers):
        members = layers[depth]

        def barycentre(n: str) -> tuple[float, str]:
            rows = [row[p] for p in preds.get(n, ()) if p in row]
            return (sum(rows) / len(rows) if rows else 0.0, n)

        members.sort(key=barycentre)
        offset = (len(members) - 1) / 2
        for i, n in enumerate(members):
            row[n] = i - offset
    return {n: (layer[n], row[n]) for n in names}


# ---------------------------------------------------------------------------------------- drawing


def _short(name: str, limit: int = 25) -> str:
    """A name that fits its box: long host names keep their start and their port (the table below
    the picture has them in full)."""
    if len(name) <= limit:
        return name
    tail = max(6, min(10, len(name) - name.rfind(":"))) if ":" in name else 8
    return name[: limit - tail - 1] + "…" + name[-tail:]


def _node_label(node: Node, graph: ServiceGraph) -> str:
    st = node.served
    name = _short(node.name)
    if st.requests == 0:
        return name
    return (f"{name}\n{st.requests} req · {st.error_rate * 100:.0f}% err\n"
            f"avg {_fmt_ms(st.avg_ms)} ms · p95 {_fmt_ms(st.p95_ms)} ms")


def _edge_label(edge: Edge, graph: ServiceGraph) -> str:
    st = edge.stats
    return (f"{graph.rate(st):.2f} req/s · {st.error_rate * 100:.0f}% err\n"
            f"avg {_fmt_ms(st.avg_ms)} · p95 {_fmt_ms(st.p95_ms)} ms")


def draw(graph: ServiceGraph, rules: Rules, svg_path: str | None = None, png_path: str | None = None,
         title: str = "kspan service graph") -> None:
    """Write the graph as SVG and/or PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    positions = layered_layout(graph)
    x_gap, y_gap = 4.9, 1.9
    box_w, box_h = 2.5, 1.15
    centre_rows = [row for _, row in positions.values()] or [0.0]
    n_layers = max((layer for layer, _ in positions.values()), default=0) + 1
    span_x = (n_layers - 1) * x_gap + 2 * box_w
    span_y = (max(centre_rows) - min(centre_rows)) * y_gap + box_h + 2.2
    # One data unit = 0.8 inch both ways: boxes keep their shape (no forced aspect ratio) and fit
    # their labels at the font sizes below.
    fig, ax = plt.subplots(figsize=(max(6.0, span_x * 0.8), max(3.5, span_y * 0.8)))
    ax.set_axis_off()
    centre = {n: (layer * x_gap, -row * y_gap) for n, (layer, row) in positions.items()}

    for edge in sorted(graph.edges.values(), key=lambda e: (e.client, e.server)):
        if edge.client == edge.server:
            continue
        (x1, y1), (x2, y2) = centre[edge.client], centre[edge.server]
        colour = rules.colour(edge.stats)
        backwards = x2 <= x1
        start = (x1 + box_w / 2, y1) if not backwards else (x1, y1 - box_h / 2)
        end = (x2 - box_w / 2, y2) if not backwards else (x2, y2 - box_h / 2)
        arrow = FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.2 + 2.0 * (colour != OK),
            color=colour, connectionstyle="arc3,rad=-0.35" if backwards else "arc3,rad=0.0", zorder=1,
        )
        ax.add_patch(arrow)
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + (-0.9 if backwards else 0.0)
        ax.text(mx, my, _edge_label(edge, graph), ha="center", va="center", fontsize=7.5, color="#222222",
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": colour, "linewidth": 0.8},
                zorder=3)

    for name, (x, y) in centre.items():
        node = graph.nodes[name]
        colour = rules.colour(node.served)
        box = FancyBboxPatch(
            (x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.05,rounding_size=0.18",
            facecolor=colour if colour in (RED, YELLOW) else ("#e8f4ea" if colour == OK else "#f0f0f0"),
            edgecolor=colour if colour != NEUTRAL else "#555555", linewidth=2.0,
            linestyle="--" if node.virtual else "-", zorder=2,
        )
        ax.add_patch(box)
        text_colour = "white" if colour == RED else "#111111"
        ax.text(x, y, _node_label(node, graph), ha="center", va="center", fontsize=8.5, color=text_colour,
                fontweight="bold" if not node.virtual else "normal", zorder=4, linespacing=1.35)

    xs = [c[0] for c in centre.values()] or [0.0]
    ys = [c[1] for c in centre.values()] or [0.0]
    ax.set_xlim(min(xs) - box_w, max(xs) + box_w)
    ax.set_ylim(min(ys) - box_h / 2 - 1.4, max(ys) + box_h / 2 + 0.8)
    legend = [
        Line2D([0], [0], color=OK, lw=3, label="ok"),
        Line2D([0], [0], color=YELLOW, lw=3, label=f"avg latency > {rules.latency_ms:g} ms"),
        Line2D([0], [0], color=RED, lw=3, label=f"error rate > {rules.error_rate * 100:g}%"),
        Line2D([0], [0], color="#555555", lw=1.5, ls="--", label="not a traced service"),
    ]
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncol=4, fontsize=8, frameon=False)
    ax.set_title(f"{title} ({graph.window_s:.0f} s of spans)", fontsize=11)
    fig.tight_layout()
    try:
        if svg_path:
            # Text as <text> elements, not glyph outlines: a smaller file whose service names can be
            # searched and copied.
            with matplotlib.rc_context({"svg.fonttype": "none"}):
                fig.savefig(svg_path, format="svg")
        if png_path:
            fig.savefig(png_path, format="png", dpi=150)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage between 0 and 100")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", default="kspan-traces.jsonl", metavar="FILE",
                        help="kspan's OTLP-JSON lines file (`kspan run --output`), or - for stdin "
                             "(default: kspan-traces.jsonl)")
    parser.add_argument("--svg", default="kspan-topology.svg", metavar="PATH",
                        help="write the picture as SVG (default: kspan-topology.svg; '' to skip)")
    parser.add_argument("--png", default="kspan-topology.png", metavar="PATH",
                        help="write the picture as PNG (default: kspan-topology.png; '' to skip)")
    parser.add_argument("--error-rate", type=_percent, default=10.0, metavar="PERCENT",
                        help="colour red a node or edge whose error rate is above PERCENT (default: 10)")
    parser.add_argument("--latency-ms", type=_non_negative, default=500.0, metavar="MS",
                        help="colour yellow a node or edge whose average latency is above MS (default: 500)")


def run_topology(args: argparse.Namespace) -> int:
    """`kspan topology`: 0 when a graph was printed and drawn, 1 when there was nothing to draw or
    the input or outputs could not be used (with a message saying what to do)."""
    path = getattr(args, "input", "kspan-traces.jsonl")
    rules = Rules(error_rate=getattr(args, "error_rate", 10.0) / 100.0,
                  latency_ms=getattr(args, "latency_ms", 500.0))
    stats = LoadStats()
    try:
        if path == "-":
            spans = load_jsonl(sys.stdin, stats)
        else:
            with open(path, encoding="utf-8", errors="replace") as stream:
                spans = load_jsonl(stream, stats)
    except OSError as e:
        print(f"kspan topology: cannot read {path}: {e.strerror or e}; write spans there first with "
              f"`kspan run --output {path}` (or pass --input FILE)", file=sys.stderr)
        return 1
    if stats.bad_lines or stats.bad_spans:
        print(f"kspan topology: skipped {stats.bad_lines} malformed line(s) and {stats.bad_spans} malformed "
              f"span(s) of {path}", file=sys.stderr)
    graph = build_graph(spans)
    if not graph.edges:
        print(f"kspan topology: no calls found in {path} ({stats.spans} spans in {stats.lines} lines): "
              f"trace some traffic with `kspan run` first", file=sys.stderr)
        return 1
    print(render_table(graph, rules))
    svg, png = getattr(args, "svg", None) or None, getattr(args, "png", None) or None
    if svg or png:
        try:
            draw(graph, rules, svg_path=svg, png_path=png)
        except OSError as e:
            print(f"kspan topology: cannot write the picture: {e}", file=sys.stderr)
            return 1
        for p in (svg, png):
            if p:
                print(f"wrote {p}")
    return 0
