"""Parent/child linking across threads and processes, traceparent, held spans, orphans, caps."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.linker import make_linker
from correlator.records import Exchange, ExchangeId, ParentHint, ParentKind, Role
from correlator.spans import Span, SpanKind
from tests.support.exchanges import hint, make_chain, make_exchange, request_bytes, response_bytes

CLOCK = WallClock(1_600_000_000_000_000_000)
SALT = b"test-salt"
TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TP_TRACE}-{TP_PARENT}-01"


def new(**cfg: object) -> Correlator:
    cfg.setdefault("id_salt", SALT)
    return Correlator(CLOCK, CorrelatorConfig(**cfg))  # type: ignore[arg-type]


def sid(ex: Exchange) -> bytes:
    return make_linker(SALT, 30, 1, 1).span_id(ex.conn_id, ex.req_start_ns)


def by_pid_kind(spans: list[Span]) -> dict[tuple[int, SpanKind], Span]:
    out = {(s.pid, s.kind): s for s in spans}
    assert len(out) == len(spans)
    return out


def test_three_process_chain_out_of_order_is_one_trace() -> None:
    chain = make_chain(("A", "B"))
    ex = chain.by_name
    # The kernel's order: B-server, A-client, A-server, then the outer client.
    assert [e.role for e in chain.exchanges] == [Role.SERVER, Role.CLIENT, Role.SERVER, Role.CLIENT]
    c = new()
    released = [c.feed(e) for e in chain.exchanges]
    assert [len(r) for r in released] == [0, 0, 0, 4]  # held until the root arrives, then all at once
    spans = released[-1]
    assert len({s.trace_id for s in spans}) == 1
    m = by_pid_kind(spans)
    client = m[(ex["client"].pid, SpanKind.CLIENT)]
    a_srv = m[(ex["A.server"].pid, SpanKind.SERVER)]
    a_cli = m[(ex["A.client"].pid, SpanKind.CLIENT)]
    b_srv = m[(ex["B.server"].pid, SpanKind.SERVER)]
    assert client.parent_span_id is None
    assert a_srv.parent_span_id == client.span_id
    assert a_cli.parent_span_id == a_srv.span_id
    assert b_srv.parent_span_id == a_cli.span_id
    assert client.span_id == sid(ex["client"]) and b_srv.span_id == sid(ex["B.server"])
    # Peer pids: both ends of each local connection know each other.
    assert (client.peer_pid, a_srv.peer_pid) == (ex["A.server"].pid, ex["client"].pid)
    assert (a_cli.peer_pid, b_srv.peer_pid) == (ex["B.server"].pid, ex["A.client"].pid)
    assert c.stats.held == 0 and c.stats.orphaned_spans == 0


def test_four_process_chain_six_spans() -> None:
    chain = make_chain(("A", "B", "C"))
    c = new()
    spans = [s for e in chain.exchanges for s in c.feed(e)]
    assert len(spans) == 6 and len({s.trace_id for s in spans}) == 1
    ids = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_span_id is None]
    assert len(roots) == 1 and roots[0].kind == SpanKind.CLIENT
    # Walk from the deepest server span to the root: kinds alternate server/client.
    leaf = next(s for s in spans if s.pid == chain.by_name["C.server"].pid)
    kinds = [leaf.kind]
    while leaf.parent_span_id is not None:
        leaf = ids[leaf.parent_span_id]
        kinds.append(leaf.kind)
    assert kinds == [SpanKind.SERVER, SpanKind.CLIENT] * 3


def test_every_arrival_order_gives_the_same_tree() -> None:
    chain = make_chain(("A", "B"))
    reference = None
    for perm in itertools.permutations(chain.exchanges):
        c = new()
        spans = [s for e in perm for s in c.feed(e)] + c.flush()
        tree = sorted((s.span_id, s.parent_span_id, s.trace_id) for s in spans)
        assert len(spans) == 4 and c.stats.orphaned_spans == 0, perm
        if reference is None:
            reference = tree
        assert tree == reference


def test_incoming_traceparent_is_honoured() -> None:
    req = request_bytes("GET", "/", headers=[("traceparent", TRACEPARENT), ("tracestate", "vendor=abc,x=1")])
    c = new()
    (s,) = c.feed(make_exchange(req, response_bytes(200)))
    assert s.trace_id.hex() == TP_TRACE and s.parent_span_id is not None and s.parent_span_id.hex() == TP_PARENT
    assert s.trace_state == "vendor=abc,x=1"
    assert c.stats.traceparents == 1
    # the header itself never becomes an attribute; only how the parent was found does
    assert s.attributes["kspan.parent.source"] == "traceparent"
    assert "traceparent" not in str({k: v for k, v in s.attributes.items() if k != "kspan.parent.source"})
    assert TP_TRACE not in str(s.attributes)


@pytest.mark.parametrize(
    "value",
    [
        TRACEPARENT.upper(),
        f"00-{'0' * 32}-{TP_PARENT}-01",
        f"00-{TP_TRACE}-{'0' * 16}-01",
        f"ff-{TP_TRACE}-{TP_PARENT}-01",
        f"00-{TP_TRACE}-{TP_PARENT}-01-extra",
        f"00-{TP_TRACE[:-1]}-{TP_PARENT}-01",
        "garbage",
        f"00_{TP_TRACE}-{TP_PARENT}-01",
    ],
)
def test_invalid_traceparent_ignored(value: str) -> None:
    req = request_bytes("GET", "/", headers=[("traceparent", value)])
    c = new()
    (s,) = c.feed(make_exchange(req, response_bytes(200)))
    assert s.trace_id.hex() != TP_TRACE and s.parent_span_id is None and s.trace_state == ""
    assert c.stats.traceparents_invalid == 1


def test_future_traceparent_version_accepted() -> None:
    req = request_bytes("GET", "/", headers=[("traceparent", f"cc-{TP_TRACE}-{TP_PARENT}-01-what-ever")])
    (s,) = new().feed(make_exchange(req, response_bytes(200)))
    assert s.trace_id.hex() == TP_TRACE


def test_chain_with_incoming_traceparent_joins_that_trace() -> None:
    chain = make_chain(("A", "B"), client_headers=[("traceparent", TRACEPARENT)])
    c = new()
    spans = [s for e in chain.exchanges for s in c.feed(e)]
    assert len(spans) == 4 and {s.trace_id.hex() for s in spans} == {TP_TRACE}
    m = by_pid_kind(spans)
    client = m[(chain.by_name["client"].pid, SpanKind.CLIENT)]
    a_srv = m[(chain.by_name["A.server"].pid, SpanKind.SERVER)]
    # The outer client is an instrumented app: its kspan span hangs under the app's own span,
    # and A's server span under the client span kspan saw (PEER), not under the app's span.
    assert client.parent_span_id is not None and client.parent_span_id.hex() == TP_PARENT
    assert a_srv.parent_span_id == client.span_id


def test_instrumented_app_outgoing_traceparent_wins_for_its_tree() -> None:
    # A is instrumented: its outgoing call to B carries a traceparent it made; the outer client
    # sent none. The whole tree takes A's trace id so kspan's spans line up with A's own.
    chain = make_chain(("A", "B"))
    a_cli = chain.by_name["A.client"]
    tp_req = request_bytes("GET", "/chain/1", host="127.0.0.1:8001", headers=[("traceparent", TRACEPARENT)])
    a_cli2 = dataclasses.replace(a_cli, req_head=tp_req, req_bytes=len(tp_req))
    b_srv = chain.by_name["B.server"]
    b_srv2 = dataclasses.replace(b_srv, req_head=tp_req, req_bytes=len(tp_req))
    order = [b_srv2, a_cli2, chain.by_name["A.server"], chain.by_name["client"]]
    c = new()
    spans = [s for e in order for s in c.feed(e)]
    assert len(spans) == 4 and {s.trace_id.hex() for s in spans} == {TP_TRACE}
    m = by_pid_kind(spans)
    b = m[(b_srv.pid, SpanKind.SERVER)]
    a = m[(a_cli.pid, SpanKind.CLIENT)]
    assert b.parent_span_id == a.span_id  # the PEER link stays on the span kspan saw
    assert a.parent_span_id == m[(a_cli.pid, SpanKind.SERVER)].span_id
    assert m[(chain.by_name["client"].pid, SpanKind.CLIENT)].parent_span_id is None


def test_child_arriving_after_parent_still_links() -> None:
    parent = make_exchange(request_bytes("GET", "/p"), response_bytes(200), pid=10, conn_id=1)
    child = make_exchange(
        request_bytes("GET", "/c"), response_bytes(200), role=Role.CLIENT, pid=10, conn_id=2,
        req_start_ns=parent.req_start_ns + 1000, parent=hint(ParentKind.PROCESS, parent),
    )  # fmt: skip
    c = new()
    (p,) = c.feed(parent)
    (ch,) = c.feed(child)
    assert ch.trace_id == p.trace_id and ch.parent_span_id == p.span_id
    assert c.stats.late_links == 1


def test_orphan_released_after_max_hold() -> None:
    missing = ExchangeId(0xDEAD, 42)
    h = ParentHint(ParentKind.PEER, 999, missing)
    kids = [
        make_exchange(request_bytes("GET", f"/{i}"), response_bytes(200), conn_id=100 + i, parent=h) for i in range(3)
    ]
    c = new(max_hold_s=5.0)
    assert all(c.feed(k) == [] for k in kids)
    last = max(k.resp_end_ns for k in kids)
    assert c.advance(last + 4_000_000_000) == []
    assert c.stats.held == 3
    out = c.advance(last + 6_000_000_000)
    assert len(out) == 3 and c.stats.orphaned_spans == 3 and c.stats.held == 0
    expected_parent = make_linker(SALT, 30, 1, 1).span_id(0xDEAD, 42)
    assert all(s.parent_span_id == expected_parent for s in out)
    assert len({s.trace_id for s in out}) == 1  # siblings stay together
    assert all(s.peer_pid == 999 for s in out)
    # If the parent shows up later as a root it lands in the same trace.
    parent = make_exchange(request_bytes("GET", "/late"), response_bytes(200), role=Role.CLIENT,
                           conn_id=0xDEAD, req_start_ns=42)  # fmt: skip
    (p,) = c.feed(parent)
    assert p.span_id == expected_parent and p.trace_id == out[0].trace_id


def test_orphaned_chain_keeps_its_inner_links() -> None:
    chain = make_chain(("A", "B"))
    inner = chain.exchanges[:3]  # the outer client's record never comes
    c = new(max_hold_s=1.0)
    assert [s for e in inner for s in c.feed(e)] == []
    out = c.advance(max(e.resp_end_ns for e in inner) + 2_000_000_000)
    assert len(out) == 3 and len({s.trace_id for s in out}) == 1
    m = by_pid_kind(out)
    a_srv = m[(chain.by_name["A.server"].pid, SpanKind.SERVER)]
    a_cli = m[(chain.by_name["A.client"].pid, SpanKind.CLIENT)]
    b_srv = m[(chain.by_name["B.server"].pid, SpanKind.SERVER)]
    assert b_srv.parent_span_id == a_cli.span_id and a_cli.parent_span_id == a_srv.span_id
    assert a_srv.parent_span_id == sid(chain.by_name["client"])
    assert c.stats.orphaned_spans == 1  # only A's server span lost its parent


def test_held_spans_are_capped() -> None:
    c = new(max_held_spans=10)
    total = 0
    for i in range(25):
        h = ParentHint(ParentKind.THREAD, 1, ExchangeId(0xF000 + i, 1))
        total += len(c.feed(make_exchange(request_bytes("GET", "/"), response_bytes(200), conn_id=i + 1, parent=h)))
        assert c.stats.held <= 10
    assert total == 15 and c.stats.held_dropped == 15
    rest = c.flush()
    assert len(rest) == 10 and c.stats.held == 0 and c.stats.orphaned_spans == 10
    assert c.stats.spans == 25


def test_flush_releases_everything() -> None:
    chain = make_chain(("A", "B"))
    c = new()
    for e in chain.exchanges[:3]:
        c.feed(e)
    out = c.flush()
    assert len(out) == 3 and len({s.trace_id for s in out}) == 1
    assert c.flush() == []


def test_hint_to_unparsed_exchange_links_to_grandparent() -> None:
    root = make_exchange(request_bytes("GET", "/root"), response_bytes(200), role=Role.CLIENT, pid=1, conn_id=1,
                         req_start_ns=1_000)  # fmt: skip
    mid = make_exchange(b"\x16\x03\x01garbage-not-http", b"", pid=2, conn_id=2, req_start_ns=2_000,
                        parent=hint(ParentKind.PEER, root))  # fmt: skip
    leaf = make_exchange(request_bytes("GET", "/leaf"), response_bytes(200), role=Role.CLIENT, pid=2, conn_id=3,
                         req_start_ns=3_000, parent=hint(ParentKind.THREAD, mid))  # fmt: skip
    c = new()
    assert c.feed(leaf) == [] and c.feed(mid) == []
    r, lf = c.feed(root)
    assert lf.parent_span_id == r.span_id and lf.trace_id == r.trace_id
    assert c.stats.unparsed_exchanges == 1


def test_unparsed_root_still_releases_children() -> None:
    mid = make_exchange(b"\x00\x01binary", b"", pid=2, conn_id=2, req_start_ns=2_000)
    leaf = make_exchange(request_bytes("GET", "/leaf"), response_bytes(200), role=Role.CLIENT, pid=2, conn_id=3,
                         req_start_ns=3_000, parent=hint(ParentKind.THREAD, mid))  # fmt: skip
    c = new()
    assert c.feed(leaf) == []
    (lf,) = c.feed(mid)
    assert lf.parent_span_id is None and c.stats.held == 0


def test_self_hint_and_cycles_do_not_hang() -> None:
    a = make_exchange(request_bytes("GET", "/a"), response_bytes(200), conn_id=1, req_start_ns=10)
    a = dataclasses.replace(a, parent=hint(ParentKind.THREAD, a))
    c = new()
    (s,) = c.feed(a)
    assert s.parent_span_id is None and c.stats.self_hints == 1
    x = make_exchange(request_bytes("GET", "/x"), response_bytes(200), conn_id=2, req_start_ns=20)
    y = make_exchange(request_bytes("GET", "/y"), response_bytes(200), conn_id=3, req_start_ns=30)
    x = dataclasses.replace(x, parent=hint(ParentKind.THREAD, y))
    y = dataclasses.replace(y, parent=hint(ParentKind.THREAD, x))
    assert c.feed(x) == [] and c.feed(y) == []
    out = c.advance(y.resp_end_ns + 31_000_000_000)
    assert len(out) == 2 and c.stats.held == 0


def test_duplicate_identity_counted() -> None:
    ex = make_exchange(request_bytes("GET", "/"), response_bytes(200))
    c = new()
    (a,) = c.feed(ex)
    (b,) = c.feed(ex)
    assert c.stats.duplicate_ids == 1 and a.trace_id != b.trace_id


def test_pipelined_parent_links_children_to_first_request() -> None:
    req = request_bytes("GET", "/a") + request_bytes("GET", "/b")
    parent = make_exchange(req, response_bytes(200) + response_bytes(200), pid=5, conn_id=9)
    child = make_exchange(request_bytes("GET", "/down"), response_bytes(200), role=Role.CLIENT, pid=5, conn_id=10,
                          req_start_ns=parent.req_start_ns + 5, parent=hint(ParentKind.THREAD, parent))  # fmt: skip
    c = new()
    assert c.feed(child) == []
    out = c.feed(parent)
    assert len(out) == 3
    first = next(s for s in out if s.attributes.get("url.path") == "/a")
    down = next(s for s in out if s.kind == SpanKind.CLIENT)
    assert down.parent_span_id == first.span_id and len({s.trace_id for s in out}) == 1


def test_resolved_memory_is_bounded() -> None:
    c = new(max_resolved=50)
    for i in range(200):
        c.feed(make_exchange(request_bytes("GET", "/"), response_bytes(200), conn_id=i + 1))
    assert c.stats.resolved_remembered == 50
    c.advance(10**15)
    assert c.stats.resolved_remembered == 0


def test_orphaned_pass_through_counts_its_children() -> None:
    missing = ParentHint(ParentKind.PEER, 7, ExchangeId(0xBEEF, 1))
    mid = make_exchange(b"\x00not http", b"", pid=2, conn_id=2, req_start_ns=2_000, parent=missing)
    leaf = make_exchange(request_bytes("GET", "/leaf"), response_bytes(200), role=Role.CLIENT, pid=2, conn_id=3,
                         req_start_ns=3_000, parent=hint(ParentKind.THREAD, mid))  # fmt: skip
    c = new(max_hold_s=1.0)
    assert c.feed(leaf) == [] and c.feed(mid) == []
    (lf,) = c.advance(leaf.resp_end_ns + 2_000_000_000)
    assert lf.parent_span_id == make_linker(SALT, 30, 1, 1).span_id(0xBEEF, 1)
    assert c.stats.orphaned_spans == 1 and c.stats.held == 0


def test_parent_source_names_how_each_link_was_found() -> None:
    """Every span says how its parent was found: the kernel's hint kind, a traceparent, or none;
    a client call the kernel flagged as ambiguous has no parent and is counted."""
    c = new()
    ok = response_bytes(200)
    srv = make_exchange(request_bytes("GET", "/in"), ok, role=Role.SERVER, conn_id=1, req_start_ns=1000)
    cli = make_exchange(request_bytes("GET", "/out"), ok, role=Role.CLIENT, conn_id=2, req_start_ns=2000,
                        parent=ParentHint(ParentKind.THREAD, 1, ExchangeId(1, 1000)))
    amb = dataclasses.replace(
        make_exchange(request_bytes("GET", "/amb"), ok, role=Role.CLIENT, conn_id=3, req_start_ns=3000),
        parent_ambiguous=True)
    spans = c.feed(srv) + c.feed(cli) + c.feed(amb) + c.flush()
    by_path = {s.attributes.get("url.full", s.attributes.get("url.path")): s for s in spans}
    server = next(s for s in spans if s.attributes.get("url.path") == "/in")
    client = next(s for k, s in by_path.items() if str(k).endswith("/out"))
    ambiguous = next(s for k, s in by_path.items() if str(k).endswith("/amb"))
    assert server.attributes["kspan.parent.source"] == "none"
    assert client.attributes["kspan.parent.source"] == "thread" and client.parent_span_id == server.span_id
    assert ambiguous.attributes["kspan.parent.source"] == "none" and ambiguous.parent_span_id is None
    assert c.stats.ambiguous_parents == 1
