"""Unsampled exchanges in metrics (correlator/red.py, MetricsAggregator.record_red): the same RED
series a span of the exchange would give, and service-graph edges, without building spans."""

from __future__ import annotations

import socket
import struct
from dataclasses import replace

import pytest

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.records import EndReason, Exchange, MetricExchange, ParentKind, Role, TcpEvent, TcpEventKind
from correlator.spans import ProcessInfo
from exporters.metrics import MetricsAggregator
from tests.support.exchanges import hint, make_exchange, request_bytes, response_bytes


def _metric(ex: Exchange, span_id: bytes = b"", parent_span_id: bytes = b"") -> MetricExchange:
    """The metric record the kernel would send for ex had its trace been dropped."""
    fam = socket.AF_INET6 if ":" in ex.local_addr else socket.AF_INET

    def raw(a: str) -> bytes:
        return socket.inet_pton(fam, a).ljust(16, b"\0") if a else b"\0" * 16

    p = ex.parent
    return MetricExchange(
        ex.pid, int(ex.role), int(ex.end), ex.tls, ex.status, ex.resp_start_ns != 0, ex.req_start_ns,
        max(ex.resp_end_ns, ex.resp_start_ns, ex.req_end_ns, ex.req_start_ns), ex.family if ex.local_addr else 0,
        raw(ex.local_addr), ex.local_port, raw(ex.remote_addr), ex.remote_port, int(p.kind) if p else 0,
        p.pid if p else 0, span_id, parent_span_id, ex.req_head[:128],
    )


CASES = [
    ("server 200", make_exchange(request_bytes("GET", "/users/7?q=1"), response_bytes(200))),
    ("server 503", make_exchange(request_bytes("POST", "/x", body=b"{}"), response_bytes(503))),
    ("server 404", make_exchange(request_bytes("GET", "/nope"), response_bytes(404))),
    ("client 404", make_exchange(request_bytes("GET", "/nope", host="api:9000"), response_bytes(404),
                                 role=Role.CLIENT)),
    ("client no host", make_exchange(request_bytes("GET", "/", host=None), response_bytes(200), role=Role.CLIENT)),
    ("client https", make_exchange(request_bytes("GET", "/", host="api"), response_bytes(200), role=Role.CLIENT,
                                   tls=True)),
    ("odd method", make_exchange(request_bytes("BREW", "/pot"), response_bytes(418))),
    ("timeout", make_exchange(request_bytes("GET", "/slow"), None, end=EndReason.TIMEOUT)),
    ("closed", make_exchange(request_bytes("GET", "/c"), None, end=EndReason.CLOSED, role=Role.CLIENT)),
    ("http/1.0", make_exchange(request_bytes("GET", "/old", version="HTTP/1.0"),
                               response_bytes(200, version="HTTP/1.0"))),
]


@pytest.mark.parametrize(("name", "ex"), CASES, ids=[c[0] for c in CASES])
def test_unsampled_exchange_lands_in_the_series_its_span_would(name: str, ex: Exchange) -> None:
    corr = Correlator(WallClock(0), CorrelatorConfig(routes=["/users/{id}"]))
    (span,) = corr.feed(ex)
    facts = corr.metric(_metric(ex))
    assert facts is not None
    assert facts.attrs == MetricsAggregator._red_attrs(span)
    assert facts.server == (ex.role == Role.SERVER)
    assert facts.seconds == pytest.approx((span.end_ns - span.start_ns) / 1e9)
    assert facts.failed == (span.status == 2)


def test_route_and_not_http() -> None:
    corr = Correlator(WallClock(0), CorrelatorConfig(routes=["/users/{id}"]))
    f = corr.metric(_metric(make_exchange(request_bytes("GET", "/users/42"), response_bytes(200))))
    assert f is not None and ("http.route", "/users/{id}") in f.attrs
    assert corr.metric(_metric(make_exchange(b"\x16\x03\x01 not http", response_bytes(200)))) is None
    st = corr.stats
    assert st.metric_records == 2 and st.metric_unparsed == 1


def test_a_run_of_metric_records_gives_each_records_facts_and_counts_the_one_that_raises() -> None:
    """metric_batch (the agent's call per run of metric records) is metric() record by record: the
    same facts in order, none for a head that is not HTTP/1.x, and a record that raises counted
    as an internal error (last_error says why) while the rest of the run goes on."""
    exs = [ex for _, ex in CASES]
    mxs = [_metric(ex) for ex in exs]
    one = Correlator(WallClock(0), CorrelatorConfig(routes=["/users/{id}"]))
    want = [one.metric(mx) for mx in mxs]
    bad = mxs[0]._replace(req_head="not bytes")
    not_http = _metric(make_exchange(b"\x16\x03\x01 not http", response_bytes(200)))
    run = Correlator(WallClock(0), CorrelatorConfig(routes=["/users/{id}"]))
    got: list = []
    run.metric_batch([*mxs[:3], bad, not_http, *mxs[3:]], got)
    assert got == [f for f in want if f is not None] and len(got) == len(mxs)
    st = run.stats
    assert st.internal_errors == 1 and run.last_error == "TypeError: req_head must be bytes"
    assert st.metric_records == len(mxs) + 2 and st.metric_unparsed == 1


def _hist(agg: MetricsAggregator, name: str) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    for rm in agg.collect().resource_metrics:
        svc = rm.resource.attributes.get("service.name")
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.data.data_points:
                        v = p.count if hasattr(p, "count") else p.value
                        out[(svc, tuple(sorted(p.attributes.items())))] = v
    return out


PROCS = {
    10: ProcessInfo(10, "front", "front", "front"),
    20: ProcessInfo(20, "back", "back", "back"),
}


def test_unsampled_and_sampled_requests_count_in_one_series() -> None:
    corr = Correlator(WallClock(0), CorrelatorConfig())
    agg = MetricsAggregator()
    ex = make_exchange(request_bytes("GET", "/a"), response_bytes(200), pid=20)
    agg.record_spans(corr.feed(ex), PROCS)
    for i in range(9):
        f = corr.metric(_metric(replace(ex, req_start_ns=ex.req_start_ns + i + 1)))
        assert f is not None
        agg.record_red([f], PROCS)
    counts = _hist(agg, "http.server.request.duration")
    assert len(counts) == 1 and list(counts.values()) == [10]


def test_service_graph_pairs_unsampled_halves_by_kernel_span_ids() -> None:
    """client (front) -> server (back) on this host, both unsampled: one edge with both durations,
    in either arrival order; a local client whose server is not traced becomes a virtual node."""
    client = make_exchange(request_bytes("GET", "/b", host="127.0.0.1:8000"), response_bytes(200), pid=10,
                           role=Role.CLIENT, local=("127.0.0.1", 40000), remote=("127.0.0.1", 8000))
    server = make_exchange(request_bytes("GET", "/b", host="127.0.0.1:8000"), response_bytes(200), pid=20,
                           local=("127.0.0.1", 8000), remote=("127.0.0.1", 40000), parent=hint(ParentKind.PEER, client))
    cid, sid = struct.pack(">Q", 5), struct.pack(">Q", 6)
    corr = Correlator(WallClock(0), CorrelatorConfig())
    for order in ((server, client), (client, server)):
        agg = MetricsAggregator()
        for ex in order:
            f = corr.metric(_metric(ex, cid if ex is client else sid, b"" if ex is client else cid))
            assert f is not None
            agg.record_red([f], PROCS)
        edges = _hist(agg, "traces_service_graph_request_total")
        assert edges == {("kspan", (("client", "front"), ("connection_type", ""), ("server", "back"))): 1}
        assert list(_hist(agg, "traces_service_graph_request_server_seconds").values()) == [1]
        assert list(_hist(agg, "traces_service_graph_request_client_seconds").values()) == [1]
    # A local client alone: virtual node once the pairing window passes.
    agg = MetricsAggregator(pair_timeout_s=0.0)
    f = corr.metric(_metric(client, struct.pack(">Q", 9)))
    assert f is not None
    agg.record_red([f], PROCS)
    agg._expire(float("inf"), 0)
    edges = _hist(agg, "traces_service_graph_request_total")
    assert edges == {("kspan", (("client", "front"), ("connection_type", "virtual_node"),
                                ("server", "127.0.0.1"))): 1}
    assert agg.unpaired_edges == 0


def test_unsampled_servers_teach_the_network_metrics_their_listening_port() -> None:
    """A TCP event on the port a server's unsampled requests arrived at is the server's: its far end
    is named by address alone (the client's port is ephemeral)."""
    server = make_exchange(request_bytes("GET", "/b"), response_bytes(200), pid=20,
                           local=("127.0.0.1", 8000), remote=("127.0.0.1", 40000))
    f = Correlator(WallClock(0), CorrelatorConfig()).metric(_metric(server))
    assert f is not None and f.local_port == 8000
    agg = MetricsAggregator()
    agg.record_red([f, f], PROCS)
    agg.record_tcp([TcpEvent(TcpEventKind.RESET_SENT, 20, 1, 7, socket.AF_INET, "127.0.0.1", 8000, "10.1.1.1", 40000,
                             0)], PROCS)
    assert _hist(agg, "kspan.network.tcp.resets") == {
        ("kspan", (("destination", "10.1.1.1"), ("direction", "sent"), ("source", "back"))): 1}


# Heads that share everything but their target, and targets the memo by head shape must not
# take (absolute-form, asterisk, a space or control byte in the target, no version).
_TARGETS = ["/users/7", "/users/8?q=1", "/users/9/orders/12", "/items/abc-12345", "/", "/a%20b/3",
            "/users/7?x=/y z", "/static/app.3f9a8b7c.js", "/v2/things/", "//double", "/x?"]


@pytest.mark.parametrize("routes", [[], ["/users/{id}"]], ids=["auto routes", "templates"])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT], ids=["server", "client"])
def test_metric_memo_by_head_shape_matches_the_span_path(routes: list[str], role: Role) -> None:
    """A warm correlator (head shapes memoised) gives every metric record the attributes its span
    would have, for each target behind the same method, version and headers."""
    warm = Correlator(WallClock(0), CorrelatorConfig(routes=routes, max_routes=5))
    spans = Correlator(WallClock(0), CorrelatorConfig(routes=routes, max_routes=5))
    heads = [request_bytes(m, t, host=h) for m in ("GET", "POST") for h in ("api:9000", None) for t in _TARGETS]
    heads += [b"GET http://api/users/7 HTTP/1.1\r\nHost: api\r\n\r\n", b"OPTIONS * HTTP/1.1\r\nHost: api\r\n\r\n",
              b"GET /users/7 HTTP/1.1\r\nHost: api\r\n\r\n", b"GET /a\x01b HTTP/1.1\r\nHost: api\r\n\r\n",
              b"GET /users/7 HTTP/2.0\r\nHost: api\r\n\r\n", b"GET /users/7\r\nHost: api\r\n\r\n"]
    seen = 0
    for rep in range(2):  # the second round hits every memo
        for i, head in enumerate(heads):
            ex = make_exchange(head, response_bytes(200 if i % 3 else 503), role=role, conn_id=1000 * rep + i + 1)
            out = spans.feed(ex)
            facts = warm.metric(_metric(ex))
            if not out:
                assert facts is None
                continue
            assert facts is not None, head
            assert facts.attrs == MetricsAggregator._red_attrs(out[0]), head
            seen += 1
    assert seen >= len(heads)
    assert warm.stats.metric_unparsed == spans.stats.unparsed_exchanges
    assert warm.stats.routes_overflowed == spans.stats.routes_overflowed


# What correlator/_red.c handles beyond the cases above --------------------------------------------


def test_metric_memos_start_over_when_full_and_agree_with_the_span_path() -> None:
    """More distinct head shapes, exact heads and outcomes than the memos hold (1,024 each): every
    record still gets the attributes its span would, and the facts of a repeated set share one
    attribute tuple (exporters/metrics.py keys its series by the tuple's identity)."""
    warm = Correlator(WallClock(0), CorrelatorConfig(max_routes=5000))
    spans = Correlator(WallClock(0), CorrelatorConfig(max_routes=5000))
    for i in range(3000):
        # a new shape (user agent) and an absolute-form target (memoised whole) every time
        head = request_bytes("GET", f"/users/{i}/p{i % 7}", host="api:9000") if i % 2 else (
            f"GET http://api/users/{i} HTTP/1.1\r\nHost: api\r\nUser-Agent: ua{i}\r\n\r\n".encode())
        ex = make_exchange(head, response_bytes(200 + i % 300), role=Role.SERVER if i % 3 else Role.CLIENT,
                           conn_id=i + 1)
        (span,) = spans.feed(ex)
        f = warm.metric(_metric(ex))
        assert f is not None and f.attrs == MetricsAggregator._red_attrs(span), head
    ex = make_exchange(request_bytes("GET", "/users/1", host="new"), response_bytes(200))
    a = warm.metric(_metric(ex))
    b = warm.metric(_metric(replace(ex, req_head=request_bytes("GET", "/users/2", host="new"))))
    assert a is not None and b is not None and a.attrs is b.attrs  # the first of its shape too


@pytest.mark.parametrize(("local", "remote", "local_peer", "peer"), [
    (("::1", 8080), ("::1", 40000), True, "::1"),
    (("::ffff:10.0.0.5", 8080), ("::ffff:10.0.0.9", 40000), False, "10.0.0.9"),  # dual-stack: the IPv4 text
    (("2001:db8::5", 8080), ("2001:db8::5", 40000), True, "2001:db8::5"),  # this host's own address
    (("10.0.0.5", 8080), ("127.0.0.2", 40000), True, "127.0.0.2"),
], ids=["loopback6", "dual-stack", "own address", "loopback4"])  # fmt: skip
def test_peer_addresses(local: tuple[str, int], remote: tuple[str, int], local_peer: bool, peer: str) -> None:
    corr = Correlator(WallClock(0), CorrelatorConfig())
    ex = make_exchange(request_bytes("GET", "/a"), response_bytes(200), family=socket.AF_INET6 if ":" in local[0]
                       else socket.AF_INET, local=local, remote=remote)
    f = corr.metric(_metric(ex))
    assert f is not None and (f.local_peer, f.peer, f.local_port) == (local_peer, peer, 8080)
    client = corr.metric(_metric(replace(ex, role=Role.CLIENT, req_head=request_bytes("GET", "/a", host=None))))
    assert client is not None and client.peer == peer  # no Host: the far end is named by its address
    assert ("server.address", peer) in client.attrs


def test_odd_metric_records() -> None:
    corr = Correlator(WallClock(0), CorrelatorConfig())
    ex = make_exchange(request_bytes("GET", "/a"), response_bytes(200))
    mx = _metric(ex)
    backwards = corr.metric(mx._replace(end_ns=mx.start_ns - 5))
    assert backwards is not None and backwards.seconds == 0.0
    huge = corr.metric(mx._replace(start_ns=0, end_ns=2**70))
    assert huge is not None and huge.seconds == 2**70 / 1e9
    odd = corr.metric(mx._replace(status=1000))  # not a status code: as if no status line was parsed
    assert odd is not None and all(k != "http.response.status_code" for k, _ in odd.attrs)
    assert corr.metric(mx._replace(req_head=b"")) is None
    assert corr.stats.internal_errors == 0
    assert corr.metric(mx._replace(req_head="GET / HTTP/1.1\r\n\r\n")) is None  # type: ignore[arg-type]
    assert corr.metric(("not", "a", "record")) is None  # type: ignore[arg-type]
    st = corr.stats
    assert st.internal_errors == 2 and corr.last_error
    assert st.metric_records == 6 and st.metric_unparsed == 1


def test_origin_line_finds_only_plain_origin_form_targets() -> None:
    from correlator import _red

    assert _red.origin_line(b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n") == (3, 8)
    assert _red.origin_line(b"GET /a b HTTP/1.1\r\n\r\n") is None  # a space inside the target
    assert _red.origin_line(b"GET /a\x01b HTTP/1.1\r\n\r\n") is None  # control byte in the target
    assert _red.origin_line(b"GET http://x/ HTTP/1.1\r\n\r\n") is None  # absolute form
    assert _red.origin_line(b"GET /a HTTP/1.1") is None  # no line end
    assert _red.origin_line(b" /a HTTP/1.1\r\n\r\n") is None  # no method
    assert _red.origin_line(b"GET /a\r\n\r\n") is None  # one space: no version
    assert _red.origin_line(b"") is None
