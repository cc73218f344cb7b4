"""The console span tree of the embedded default."""

from __future__ import annotations

import io

from correlator.spans import Span, SpanKind, StatusCode
from exporters.console import ConsoleSpanExporter
from tests.support.sample_spans import chain_trace, processes


def test_trace_renders_as_an_indented_tree_in_causal_order() -> None:
    buf = io.StringIO()
    exp = ConsoleSpanExporter(stream=buf)
    spans = chain_trace()  # arrives children first, as the correlator may emit them
    assert exp.export(spans, processes())
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"trace {spans[0].trace_id.hex()} · 3 spans"
    assert lines[1] == "  frontend SERVER GET /api 200 10.0 ms"
    assert lines[2] == "  └─ frontend CLIENT GET http://127.0.0.1:8081/items/42 200 7.0 ms"
    assert lines[3] == "     └─ backend SERVER GET /items /items/42 200 5.0 ms"
    assert "\x1b[" not in buf.getvalue()  # not a tty: no colour


def test_errors_are_marked_and_counted() -> None:
    buf = io.StringIO()
    ConsoleSpanExporter(stream=buf).export(chain_trace(status=502), processes())
    out = buf.getvalue()
    assert "3 errors" in out.splitlines()[0]
    assert out.count("✗") == 3


def test_siblings_and_orphans() -> None:
    root, client, server = chain_trace()[2], chain_trace()[1], chain_trace()[0]
    sibling = Span(trace_id=root.trace_id, span_id=b"\x09" * 8, parent_span_id=root.span_id, name="POST",
                   kind=SpanKind.CLIENT, start_ns=root.start_ns + 9_000_000, end_ns=root.start_ns + 9_500_000,
                   pid=101, attributes={"server.address": "db", "server.port": 5000, "url.path": "/q",
                                        "error.type": "ConnectionReset"},
                   status=StatusCode.ERROR)
    orphan = Span(trace_id=b"\x07" * 16, span_id=b"\x08" * 8, parent_span_id=b"\x06" * 8, name="GET",
                  kind=SpanKind.SERVER, start_ns=1, end_ns=2_000_001, pid=999, attributes={})
    buf = io.StringIO()
    ConsoleSpanExporter(stream=buf).export([sibling, server, orphan, client, root], processes())
    lines = buf.getvalue().splitlines()
    assert lines[2].startswith("  ├─ frontend CLIENT GET ")
    assert lines[3].startswith("  │  └─ backend SERVER GET /items")
    assert lines[4] == "  └─ frontend CLIENT POST db:5000/q ConnectionReset 0.5 ms ✗ ConnectionReset"
    assert lines[5] == f"trace {'07' * 16} · 1 span"
    assert lines[6] == f"  pid 999 SERVER GET 2.0 ms (parent {'06' * 8} not in this batch)"


def test_colour_only_when_asked_or_on_a_tty() -> None:
    buf = io.StringIO()
    ConsoleSpanExporter(stream=buf, colour=True).export(chain_trace(status=500), processes())
    assert "\x1b[31m" in buf.getvalue()


def test_closed_stream_is_reported_not_raised() -> None:
    buf = io.StringIO()
    exp = ConsoleSpanExporter(stream=buf)
    buf.close()
    assert exp.export(chain_trace(), processes()) is False
    assert "console" in exp.last_error
