"""The 4-tuple fallback: a server exchange from a local peer, with no kernel PEER hint, is linked
to the client exchange at the other end of the same connection (correlator/peers.py)."""

from __future__ import annotations

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.records import Role
from correlator.spans import SpanKind
from tests.support.exchanges import make_exchange, request_bytes, response_bytes

CLOCK = WallClock(0)
SRV = ("127.0.0.1", 8443)
CLI = ("127.0.0.1", 51000)
MS = 1_000_000


def _client(start: int, conn: int = 0xC1, cli: tuple[str, int] = CLI):
    return make_exchange(request_bytes("GET", "/x"), response_bytes(200), role=Role.CLIENT, pid=10, conn_id=conn,
                         req_start_ns=start, latency_ns=3 * MS, local=cli, remote=SRV)


def _server(start: int, conn: int = 0x51, cli: tuple[str, int] = CLI):
    return make_exchange(request_bytes("GET", "/x"), response_bytes(200), role=Role.SERVER, pid=20, conn_id=conn,
                         req_start_ns=start, latency_ns=1 * MS, local=SRV, remote=cli)


def test_server_first_waits_for_its_client_and_links() -> None:
    c = Correlator(CLOCK, CorrelatorConfig(peer_wait_s=1.0))
    assert c.feed(_server(1_000 * MS + 100)) == [], "a local peer's server end waits for its client"
    assert c.stats.peer_waiting == 1
    spans = c.feed(_client(1_000 * MS))
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert server.parent_span_id == client.span_id and server.trace_id == client.trace_id
    assert c.stats.peer_links_by_tuple == 1 and c.stats.peer_waiting == 0


def test_client_first_links_at_once() -> None:
    c = Correlator(CLOCK, CorrelatorConfig())
    (client,) = c.feed(_client(1_000 * MS))
    (server,) = c.feed(_server(1_000 * MS + 100))
    assert server.parent_span_id == client.span_id and server.trace_id == client.trace_id


def test_keep_alive_picks_the_request_that_began_before_the_server_read() -> None:
    c = Correlator(CLOCK, CorrelatorConfig())
    (first,) = c.feed(_client(1_000 * MS, conn=0xC1))
    (second,) = c.feed(_client(1_010 * MS, conn=0xC1))
    (server,) = c.feed(_server(1_010 * MS + 50, conn=0x51))
    assert server.parent_span_id == second.span_id != first.span_id


def test_untraced_local_client_leaves_a_root_after_the_wait() -> None:
    c = Correlator(CLOCK, CorrelatorConfig(peer_wait_s=1.0))
    assert c.feed(_server(1_000 * MS)) == []
    assert c.advance(1_500 * MS) == []
    (server,) = c.advance(2_100 * MS)
    assert server.parent_span_id is None
    assert c.stats.peer_links_by_tuple == 0


def test_other_connections_and_remote_peers_do_not_wait_or_link() -> None:
    c = Correlator(CLOCK, CorrelatorConfig())
    (remote,) = c.feed(make_exchange(request_bytes("GET", "/x"), response_bytes(200), conn_id=0x99,
                                     local=("192.0.2.1", 80), remote=("192.0.2.10", 5000)))
    assert remote.parent_span_id is None, "a peer on another host is a root at once"
    assert c.feed(_server(1_000 * MS, cli=("127.0.0.1", 52000))) == []
    (client,) = c.feed(_client(999 * MS))  # same ports but another client port: not its peer
    assert client.kind == SpanKind.CLIENT
    assert c.stats.peer_waiting == 1
    (server,) = c.flush()
    assert server.parent_span_id is None
