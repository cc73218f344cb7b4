"""`kspan topology` on a synthetic chain client -> frontend -> orders -> inventory -> postgres, with
a failing edge (orders -> payments, 30% errors) and a slow one (frontend -> recommendations)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest

from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode
from exporters.jsonfile import JsonFileSpanExporter
from exporters.topology import (
    NEUTRAL,
    OK,
    RED,
    YELLOW,
    Rules,
    add_topology_arguments,
    build_graph,
    layered_layout,
    render_table,
    run_topology,
    spans_from_kspan,
)

PIDS = {"client": 100, "frontend": 101, "orders": 102, "inventory": 103, "payments": 104, "recommendations": 105}
PROCESSES = {pid: ProcessInfo(pid=pid, service_name=name, executable_name=name, command_line=f"/srv/{name}")
             for name, pid in PIDS.items()}
T0 = 1_763_800_000_000_000_000
MS = 1_000_000
CHAIN_TRACES = 20
FAILING = 6  # of CHAIN_TRACES: orders -> payments answers 503
SLOW_TRACES = 5  # user -> frontend -> recommendations, 800 ms


def _id(*parts: object, n: int = 8) -> bytes:
    return hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:n]


class TraceBuilder:
    def __init__(self, key: str) -> None:
        self.key = key
        self.trace_id = _id(key, n=16)
        self.spans: list[Span] = []

    def span(self, service: str, kind: SpanKind, parent: Span | None, start_ms: float, dur_ms: float,
             error: bool = False, **attributes: object) -> Span:
        s = Span(
            trace_id=self.trace_id, span_id=_id(self.key, len(self.spans)),
            parent_span_id=parent.span_id if parent else None, name="GET" if kind == SpanKind.SERVER else "GET",
            kind=kind, start_ns=T0 + int(start_ms * MS), end_ns=T0 + int((start_ms + dur_ms) * MS),
            pid=PIDS[service], attributes=dict(attributes),  # type: ignore[arg-type]
            status=StatusCode.ERROR if error else StatusCode.UNSET,
        )
        self.spans.append(s)
        return s

    def call(self, client: str, server: str, parent: Span | None, start_ms: float, dur_ms: float,
             error: bool = False) -> Span:
        """A traced call: the client span and its server child (1 ms of network each way)."""
        c = self.span(client, SpanKind.CLIENT, parent, start_ms, dur_ms, error, **{"server.address": server,
                                                                                   "server.port": 8080})
        return self.span(server, SpanKind.SERVER, c, start_ms + 1, dur_ms - 2, error)


def chain_spans() -> list[Span]:
    spans: list[Span] = []
    for i in range(CHAIN_TRACES):
        t = TraceBuilder(f"chain{i}")
        start = i * 1000.0
        front = t.call("client", "frontend", None, start, 120)
        orders = t.call("frontend", "orders", front, start + 5, 100)
        inventory = t.call("orders", "inventory", orders, start + 10, 40)
        t.span("inventory", SpanKind.CLIENT, inventory, start + 12, 20,
               **{"server.address": "postgres", "server.port": 5432})  # no server child: virtual node
        t.call("orders", "payments", orders, start + 55, 40, error=i < FAILING)
        spans.extend(t.spans)
    for i in range(SLOW_TRACES):
        t = TraceBuilder(f"slow{i}")
        start = i * 1000.0 + 300
        # No parent: called by an untraced user.
        front = t.span("frontend", SpanKind.SERVER, None, start, 820, **{"client.address": "203.0.113.9"})
        t.call("frontend", "recommendations", front, start + 5, 800)
        spans.extend(t.spans)
    return spans


@pytest.fixture(scope="module")
def graph():  # type: ignore[no-untyped-def]
    return build_graph(spans_from_kspan(chain_spans(), PROCESSES))


def test_nodes_and_edges(graph) -> None:  # type: ignore[no-untyped-def]
    assert set(graph.nodes) == {"client", "frontend", "orders", "inventory", "payments", "recommendations",
                                "postgres:5432", "user"}
    assert {n for n, node in graph.nodes.items() if node.virtual} == {"postgres:5432", "user"}
    counts = {k: (e.stats.requests, e.stats.errors) for k, e in graph.edges.items()}
    assert counts == {
        ("client", "frontend"): (CHAIN_TRACES, 0),
        ("frontend", "orders"): (CHAIN_TRACES, 0),
        ("orders", "inventory"): (CHAIN_TRACES, 0),
        ("inventory", "postgres:5432"): (CHAIN_TRACES, 0),
        ("orders", "payments"): (CHAIN_TRACES, FAILING),
        ("user", "frontend"): (SLOW_TRACES, 0),
        ("frontend", "recommendations"): (SLOW_TRACES, 0),
    }
    # Latency is the caller's: the client span's duration.
    assert graph.edges[("frontend", "orders")].stats.avg_ms == pytest.approx(100)
    assert graph.edges[("frontend", "recommendations")].stats.p95_ms == pytest.approx(800)
    # Node figures are what each service served.
    assert graph.nodes["frontend"].served.requests == CHAIN_TRACES + SLOW_TRACES
    assert graph.nodes["payments"].served.error_rate == pytest.approx(FAILING / CHAIN_TRACES)
    assert graph.nodes["client"].served.requests == 0
    # The spans cover ~20 s: rates are per second of that window.
    assert graph.rate(graph.edges[("client", "frontend")].stats) == pytest.approx(CHAIN_TRACES / 19.12, rel=0.01)


def test_colours_by_default_rules(graph) -> None:  # type: ignore[no-untyped-def]
    rules = Rules()
    edge_colours = {k: rules.colour(e.stats) for k, e in graph.edges.items()}
    assert edge_colours[("orders", "payments")] == RED
    assert edge_colours[("frontend", "recommendations")] == YELLOW
    assert edge_colours[("user", "frontend")] == YELLOW  # the slow call shows upstream too
    assert {k for k, c in edge_colours.items() if c == OK} == {
        ("client", "frontend"), ("frontend", "orders"), ("orders", "inventory"), ("inventory", "postgres:5432")}
    node_colours = {n: rules.colour(node.served) for n, node in graph.nodes.items()}
    assert node_colours["payments"] == RED
    assert node_colours["recommendations"] == YELLOW
    assert node_colours["frontend"] == OK  # 5 slow of 25: the average stays under 500 ms
    assert node_colours["client"] == NEUTRAL and node_colours["user"] == NEUTRAL


def test_colour_rules_are_configurable(graph) -> None:  # type: ignore[no-untyped-def]
    strict = Rules(error_rate=0.5, latency_ms=50)
    assert strict.colour(graph.edges[("orders", "payments")].stats) == OK  # 30% is under 50%
    assert strict.colour(graph.edges[("frontend", "orders")].stats) == YELLOW  # 100 ms > 50 ms
    assert strict.colour(graph.edges[("inventory", "postgres:5432")].stats) == OK  # 20 ms


def test_layout_is_layered_left_to_right(graph) -> None:  # type: ignore[no-untyped-def]
    layers = {n: layer for n, (layer, _) in layered_layout(graph).items()}
    assert layers == {"client": 0, "user": 0, "frontend": 1, "orders": 2, "recommendations": 2,
                      "inventory": 3, "payments": 3, "postgres:5432": 4}


def test_layout_survives_a_cycle() -> None:
    spans = []
    for i, (a, b) in enumerate((("a", "b"), ("b", "a"), ("b", "c"))):
        trace = f"{i:032x}"
        spans.append({"trace_id": trace, "span_id": f"{i:08x}c", "service": a, "kind": "CLIENT",
                      "start_ns": T0, "end_ns": T0 + 10 * MS})
        spans.append({"trace_id": trace, "span_id": f"{i:08x}s", "parent_span_id": f"{i:08x}c", "service": b,
                      "kind": "SERVER", "start_ns": T0 + MS, "end_ns": T0 + 9 * MS, "status": "ERROR"})
    graph = build_graph(spans)
    assert set(graph.edges) == {("a", "b"), ("b", "a"), ("b", "c")}
    assert graph.edges[("a", "b")].stats.errors == 1  # a server error fails the call
    layout = layered_layout(graph)
    assert set(layout) == {"a", "b", "c"}
    assert layout["a"][0] < layout["b"][0] < layout["c"][0]


def test_same_service_call_and_orphan_server(graph) -> None:  # type: ignore[no-untyped-def]
    spans = [
        {"trace_id": "t1", "span_id": "c1", "service": "a", "kind": 3, "start_ns": 0, "end_ns": 5 * MS},
        {"trace_id": "t1", "span_id": "s1", "parent_span_id": "c1", "service": "a", "kind": 2,
         "start_ns": MS, "end_ns": 4 * MS},
        # Its caller's span is not in the data (another host): named by the peer address.
        {"trace_id": "t2", "span_id": "s2", "parent_span_id": "elsewhere", "service": "a", "kind": 2,
         "start_ns": 0, "end_ns": 2 * MS, "attributes": {"client.address": "10.1.2.3"}},
    ]
    assert set(build_graph(spans).edges) == {("10.1.2.3", "a")}


def test_table(graph) -> None:  # type: ignore[no-untyped-def]
    table = render_table(graph, Rules())
    lines = table.splitlines()
    payments = next(line for line in lines if line.startswith("orders") and "payments" in line)
    assert payments.split()[-1] == "RED" and "30.0" in payments.split()
    slow = next(line for line in lines if line.startswith("frontend") and "recommendations" in line)
    assert slow.split()[-1] == "YELLOW"
    assert "SERVICES" in lines and "CALLS" in lines


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kspan topology")
    add_topology_arguments(parser)
    return parser.parse_args(argv)


def test_cli_from_kspan_jsonl_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = tmp_path / "kspan-traces.jsonl"
    exporter = JsonFileSpanExporter(str(jsonl))
    spans = chain_spans()
    for i in range(0, len(spans), 17):  # several batches, several lines, as the agent writes them
        assert exporter.export(spans[i:i + 17], PROCESSES)
    exporter.shutdown()
    with open(jsonl, "a") as f:
        f.write('{"resourceSpans": [\n')  # a line cut short by a full disk
    svg, png = tmp_path / "map.svg", tmp_path / "map.png"
    code = run_topology(_args(["--input", str(jsonl), "--svg", str(svg), "--png", str(png)]))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "skipped 1 malformed line" in err
    assert any(line.startswith("orders") and "payments" in line and line.endswith("RED") for line in out.splitlines())
    assert svg.stat().st_size > 1000 and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert RED.lower() in text.lower() and YELLOW.lower() in text.lower()
    for name in [*PIDS, "postgres:5432", "user"]:  # labels stay text, not glyph outlines
        assert f">{name}<" in text, name


def test_cli_thresholds_change_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = tmp_path / "t.jsonl"
    exporter = JsonFileSpanExporter(str(jsonl))
    exporter.export(chain_spans(), PROCESSES)
    exporter.shutdown()
    assert run_topology(_args(["-i", str(jsonl), "--svg", "", "--png", "", "--error-rate", "40",
                               "--latency-ms", "1000"])) == 0
    out = capsys.readouterr().out
    assert "RED" not in out and "YELLOW" not in out
    assert not list(tmp_path.glob("*.png"))


def test_cli_missing_or_empty_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_topology(_args(["--input", str(tmp_path / "nope.jsonl")])) == 1
    assert "kspan run --output" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    assert run_topology(_args(["--input", str(empty)])) == 1
    assert "no calls found" in capsys.readouterr().err


def test_cli_rejects_a_bad_threshold() -> None:
    with pytest.raises(SystemExit):
        _args(["--error-rate", "150"])


def test_long_names_are_shortened_in_the_picture_only(tmp_path: Path) -> None:
    long_host = "ip-10-0-1-17.eu-west-1.compute.internal"
    spans = [{"trace_id": "t", "span_id": "c", "service": "api", "kind": "CLIENT", "start_ns": 0, "end_ns": MS,
              "attributes": {"server.address": long_host, "server.port": 443}}]
    graph = build_graph(spans)
    assert f"{long_host}:443" in graph.nodes  # the table keeps the full name
    assert f"{long_host}:443" in render_table(graph, Rules())
    svg = tmp_path / "g.svg"
    from exporters.topology import draw

    draw(graph, Rules(), svg_path=str(svg))
    text = svg.read_text()
    assert f">{long_host}:443<" not in text and ":443<" in text and ">ip-10-0-1-17" in text


def test_databases_are_nodes_named_by_their_system() -> None:
    """A database call draws an edge to a node named by the database's system and address; the
    database's own server-side spans add no `user` edge."""
    t = TraceBuilder("db")
    front = t.span("frontend", SpanKind.SERVER, None, 0, 20)
    t.span("frontend", SpanKind.CLIENT, front, 1, 3, **{"db.system.name": "postgresql", "server.address": "10.0.0.5",
                                                         "server.port": 5432, "db.operation.name": "SELECT"})
    t.span("frontend", SpanKind.CLIENT, front, 5, 1, True, **{"db.system.name": "redis", "server.address": "10.0.0.6",
                                                               "server.port": 6379})
    t.span("orders", SpanKind.SERVER, None, 2, 1, **{"db.system.name": "postgresql"})  # the database's own
    graph = build_graph(spans_from_kspan(t.spans, PROCESSES))
    assert {"postgresql 10.0.0.5:5432", "redis 10.0.0.6:6379"} <= set(graph.nodes)
    assert graph.nodes["redis 10.0.0.6:6379"].virtual
    assert graph.edges[("frontend", "redis 10.0.0.6:6379")].stats.errors == 1
    assert ("user", "orders") not in graph.edges and "orders" not in graph.nodes
