"""correlator/_spans.c: each branch of HTTP/1 span assembly, attribute by attribute and in order.

Exporters write attributes in dict order, so every expectation is the exact item list, written
out by hand. The records come from tests/support/exchanges.py: a server at 192.0.2.1:8080, its
client at 192.0.2.10:40000 unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from correlator import _spans
from correlator.clock import WallClock
from correlator.correlator import Correlator
from correlator.records import EndReason, Exchange, ParentKind, Role
from correlator.spans import Span, SpanKind, StatusCode
from tests.support.exchanges import chunk, hint, make_exchange, request_bytes, response_bytes
from tests.unit.test_correlator import OFFSET, feed_all

GET_A = request_bytes("GET", "/a", host=None, user_agent=None)

# GET /a without Host at the server: the server's address comes from the socket, after the
# request attributes.
SERVER_A = [
    ("http.request.method", "GET"), ("url.scheme", "http"), ("url.path", "/a"), ("http.route", "/a"),
    ("network.protocol.version", "1.1"), ("server.address", "192.0.2.1"), ("server.port", 8080),
    ("client.address", "192.0.2.10"), ("network.peer.address", "192.0.2.10"), ("network.peer.port", 40000),
]  # fmt: skip
# The same request at the client: the server is the peer, and url.full is made from it.
CLIENT_A = [
    ("http.request.method", "GET"), ("network.protocol.version", "1.1"), ("server.address", "192.0.2.10"),
    ("server.port", 40000), ("url.full", "http://192.0.2.10:40000/a"), ("network.peer.address", "192.0.2.10"),
    ("network.peer.port", 40000),
]  # fmt: skip
SOURCE = ("kspan.parent.source", "none")


def feed(*exs: Exchange, **cfg: object) -> tuple[list[Span], Correlator]:
    return feed_all(list(exs), **cfg)


def one(ex: Exchange, **cfg: object) -> tuple[Span, Correlator]:
    spans, c = feed_all([ex], **cfg)
    assert len(spans) == 1
    return spans[0], c


def items(s: Span) -> list[tuple[str, object]]:
    return list(s.attributes.items())


# status codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "status", "body", "tail", "code"),
    [
        (Role.SERVER, 101, b"", [("http.response.status_code", 101)], StatusCode.UNSET),
        (Role.SERVER, 200, b"hello", [("http.response.status_code", 200), ("http.response.body.size", 5)],
         StatusCode.UNSET),
        (Role.SERVER, 204, b"", [("http.response.status_code", 204)], StatusCode.UNSET),
        (Role.SERVER, 304, b"", [("http.response.status_code", 304)], StatusCode.UNSET),
        (Role.SERVER, 302, b"", [("http.response.status_code", 302), ("http.response.body.size", 0)],
         StatusCode.UNSET),
        # 4xx is the client's error, not the server's (semantic conventions)
        (Role.SERVER, 404, b"nf", [("http.response.status_code", 404), ("http.response.body.size", 2)],
         StatusCode.UNSET),
        (Role.SERVER, 500, b"", [("http.response.status_code", 500), ("error.type", "500"),
                                 ("http.response.body.size", 0)], StatusCode.ERROR),
        (Role.CLIENT, 200, b"ok", [("http.response.status_code", 200), ("http.response.body.size", 2)],
         StatusCode.UNSET),
        (Role.CLIENT, 404, b"", [("http.response.status_code", 404), ("error.type", "404"),
                                 ("http.response.body.size", 0)], StatusCode.ERROR),
        (Role.CLIENT, 503, b"down", [("http.response.status_code", 503), ("error.type", "503"),
                                     ("http.response.body.size", 4)], StatusCode.ERROR),
    ],
)  # fmt: skip
def test_status_codes(role: Role, status: int, body: bytes, tail: list, code: StatusCode) -> None:
    ex = make_exchange(GET_A, response_bytes(status, body=body), role=role)
    s, _ = one(ex)
    assert items(s) == (SERVER_A if role == Role.SERVER else CLIENT_A) + tail + [SOURCE]
    assert s.status is code and s.status_message == ""
    assert s.kind is (SpanKind.SERVER if role == Role.SERVER else SpanKind.CLIENT)
    assert s.name == ("GET /a" if role == Role.SERVER else "GET")
    assert (s.start_ns, s.end_ns, s.pid) == (ex.req_start_ns + OFFSET, ex.resp_end_ns + OFFSET, 1000)
    assert (s.peer_pid, s.sampled, s.trace_state) == (0, True, "")


# aborted ends ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("end", "err", "message", "counter"),
    [
        (EndReason.CLOSED, "connection_closed", "connection closed before a response", "closed_no_response"),
        (EndReason.TIMEOUT, "timeout", "no complete response before the timeout", "timeouts"),
        (EndReason.EVICTED, "evicted", "exchange state evicted before the response completed", "evicted"),
    ],
)
def test_aborted_without_response(end: EndReason, err: str, message: str, counter: str) -> None:
    s, c = one(make_exchange(GET_A, None, end=end))
    assert items(s) == SERVER_A + [("error.type", err), SOURCE]
    assert s.status is StatusCode.ERROR and s.status_message == message
    assert getattr(c.stats, counter) == 1 and c.stats.no_response == 0


@pytest.mark.parametrize("end", [EndReason.COMPLETE, EndReason.NEXT_REQUEST])
def test_no_response_is_no_error(end: EndReason) -> None:
    s, c = one(make_exchange(GET_A, None, end=end))
    assert items(s) == SERVER_A + [SOURCE]
    assert s.status is StatusCode.UNSET and s.status_message == ""
    assert c.stats.no_response == 1
    assert s.end_ns == s.start_ns + 20_000  # the request's end: no response time


def test_closed_mid_response_is_incomplete() -> None:
    resp = response_bytes(200, body=b"0123456789")
    s, c = one(make_exchange(GET_A, resp, end=EndReason.CLOSED, delivered=len(resp) - 6))
    assert items(s) == SERVER_A + [
        ("http.response.status_code", 200), ("error.type", "response_incomplete"), ("http.response.body.size", 4),
        SOURCE,
    ]  # fmt: skip
    assert s.status is StatusCode.ERROR
    assert s.status_message == "connection closed before the response was complete"
    assert c.stats.responses_incomplete == 1


@pytest.mark.parametrize(
    ("end", "resp", "size"),
    [
        (EndReason.CLOSED, response_bytes(200, body=b"abc"), 3),
        # without Content-Length the size is the bytes after the head, chunk framing included
        (EndReason.TIMEOUT, response_bytes(200, body=b"abc", chunked=True), 13),
        (EndReason.EVICTED, response_bytes(200, body=b"xy"), 2),
    ],
)
def test_aborted_after_a_complete_response_is_no_error(end: EndReason, resp: bytes, size: int) -> None:
    s, c = one(make_exchange(GET_A, resp, end=end))
    assert items(s) == SERVER_A + [("http.response.status_code", 200), ("http.response.body.size", size), SOURCE]
    assert s.status is StatusCode.UNSET and s.status_message == ""
    assert c.stats.responses_incomplete == 0 and c.stats.closed_no_response == 0


@pytest.mark.parametrize(("status", "err"), [(200, "timeout"), (502, "502")])
def test_timeout_with_a_response_delimited_by_close(status: int, err: str) -> None:
    # No Content-Length, not chunked: whether it was complete is unknown, so the timeout stands
    # (and explains a 5xx, which names the error).
    resp = response_bytes(status, body=b"abc", content_length=False)
    s, c = one(make_exchange(GET_A, resp, end=EndReason.TIMEOUT))
    assert items(s) == SERVER_A + [
        ("http.response.status_code", status), ("error.type", err), ("http.response.body.size", 3), SOURCE,
    ]  # fmt: skip
    assert s.status is StatusCode.ERROR and s.status_message == "no complete response before the timeout"
    assert c.stats.timeouts == 1


# responses without a status line: the kernel's status ---------------------------------------


@pytest.mark.parametrize(
    ("status", "end", "tail", "message"),
    [
        (200, EndReason.COMPLETE, [("http.response.status_code", 200)], ""),
        (0, EndReason.CLOSED, [("error.type", "response_incomplete")],
         "connection closed before the response was complete"),
        (503, EndReason.CLOSED, [("http.response.status_code", 503), ("error.type", "503")], ""),
        (600, EndReason.TIMEOUT, [("error.type", "timeout")], "no complete response before the timeout"),
        (99, EndReason.COMPLETE, [], ""),
        (200, EndReason.EVICTED, [("http.response.status_code", 200), ("error.type", "evicted")],
         "exchange state evicted before the response completed"),
    ],
)  # fmt: skip
def test_unparsed_response_falls_back_to_the_kernel_status(status: int, end: EndReason, tail: list,
                                                           message: str) -> None:
    s, c = one(make_exchange(GET_A, b"garbage bytes", end=end, status=status))
    assert items(s) == SERVER_A + tail + [SOURCE]
    assert s.status is (StatusCode.ERROR if message or status >= 500 else StatusCode.UNSET)
    assert s.status_message == message
    assert c.stats.unparsed_responses == 1


def test_request_without_a_version_takes_the_response_version() -> None:
    s, _ = one(make_exchange(b"GET /a", response_bytes(200, version="HTTP/1.0"), role=Role.CLIENT))
    assert items(s) == [
        ("http.request.method", "GET"), ("server.address", "192.0.2.10"), ("server.port", 40000),
        ("url.full", "http://192.0.2.10:40000/a"), ("network.peer.address", "192.0.2.10"),
        ("network.peer.port", 40000), ("network.protocol.version", "1.0"), ("http.response.status_code", 200),
        ("http.response.body.size", 0), SOURCE,
    ]  # fmt: skip


# pipelining -----------------------------------------------------------------------------------


def test_pipelined_requests_take_sizes_from_content_length_only() -> None:
    req = GET_A + request_bytes("POST", "/b", host=None, user_agent=None, body=b"12")
    resp = response_bytes(200, body=b"x") + response_bytes(201, body=b"yy")
    (a, b), c = feed(make_exchange(req, resp + b"extra"))
    assert items(a) == SERVER_A + [("http.response.status_code", 200), ("http.response.body.size", 1), SOURCE]
    assert items(b) == [
        ("http.request.method", "POST"), ("url.scheme", "http"), ("url.path", "/b"), ("http.route", "/b"),
        ("network.protocol.version", "1.1"), ("http.request.body.size", 2), ("server.address", "192.0.2.1"),
        ("server.port", 8080), ("client.address", "192.0.2.10"), ("network.peer.address", "192.0.2.10"),
        ("network.peer.port", 40000), ("http.response.status_code", 201), ("http.response.body.size", 2), SOURCE,
    ]  # fmt: skip
    assert (a.name, b.name) == ("GET /a", "POST /b")
    assert a.span_id != b.span_id and len(b.span_id) == 8 and a.trace_id == b.trace_id
    assert c.stats.pipelined_splits == 1


def test_pipelined_request_without_its_response() -> None:
    req = GET_A + request_bytes("GET", "/b", host=None, user_agent=None)
    (a, b), c = feed(make_exchange(req, response_bytes(200, body=b"x"), end=EndReason.CLOSED))
    # Only the last request with the last response is checked for framing; the second request's
    # response never came, but response bytes did (the first's): no error is claimed for it.
    assert items(a) == SERVER_A + [("http.response.status_code", 200), ("http.response.body.size", 1), SOURCE]
    assert items(b) == [
        ("http.request.method", "GET"), ("url.scheme", "http"), ("url.path", "/b"), ("http.route", "/b"),
        ("network.protocol.version", "1.1"), ("server.address", "192.0.2.1"), ("server.port", 8080),
        ("client.address", "192.0.2.10"), ("network.peer.address", "192.0.2.10"), ("network.peer.port", 40000),
        SOURCE,
    ]  # fmt: skip
    assert a.status is b.status is StatusCode.UNSET
    assert c.stats.closed_no_response == 0 and c.stats.no_response == 0


# Host, addresses ------------------------------------------------------------------------------


def test_server_host_without_port_takes_the_scheme_default() -> None:
    req = request_bytes("GET", "/a?x=1", host="shop.local", user_agent="ua/1")
    s, _ = one(make_exchange(req, response_bytes(200), tls=True))
    assert items(s) == [
        ("http.request.method", "GET"), ("url.scheme", "https"), ("url.path", "/a"), ("http.route", "/a"),
        ("url.query", "x=1"), ("server.address", "shop.local"), ("server.port", 443),
        ("network.protocol.version", "1.1"), ("user_agent.original", "ua/1"), ("client.address", "192.0.2.10"),
        ("network.peer.address", "192.0.2.10"), ("network.peer.port", 40000), ("http.response.status_code", 200),
        ("http.response.body.size", 0), SOURCE,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("family", "remote", "tls", "address", "url"),
    [
        (10, ("2001:db8::1", 80), False, "2001:db8::1", "http://[2001:db8::1]/a"),
        (2, ("192.0.2.10", 443), True, "192.0.2.10", "https://192.0.2.10/a"),
        (2, ("192.0.2.10", 443), False, "192.0.2.10", "http://192.0.2.10:443/a"),
        (10, ("::ffff:10.0.0.2", 8080), False, "10.0.0.2", "http://10.0.0.2:8080/a"),
        (2, ("192.0.2.10", 0), False, "192.0.2.10", "http://192.0.2.10:0/a"),
    ],
)
def test_client_without_host_names_the_peer(family: int, remote: tuple[str, int], tls: bool, address: str,
                                            url: str) -> None:
    ex = make_exchange(GET_A, response_bytes(204), role=Role.CLIENT, family=family, remote=remote, tls=tls)
    s, _ = one(ex)
    assert items(s) == [
        ("http.request.method", "GET"), ("network.protocol.version", "1.1"), ("server.address", address),
        ("server.port", remote[1]), ("url.full", url), ("network.peer.address", address),
        ("network.peer.port", remote[1]), ("http.response.status_code", 204), SOURCE,
    ]  # fmt: skip


def test_ipv4_mapped_addresses_are_ipv4_at_the_server() -> None:
    ex = make_exchange(GET_A, response_bytes(204), family=10, local=("::ffff:10.0.0.1", 8080),
                       remote=("::ffff:abcd", 5000))  # fmt: skip
    s, _ = one(ex)
    assert items(s) == [
        ("http.request.method", "GET"), ("url.scheme", "http"), ("url.path", "/a"), ("http.route", "/a"),
        ("network.protocol.version", "1.1"), ("server.address", "10.0.0.1"), ("server.port", 8080),
        ("client.address", "::ffff:abcd"), ("network.peer.address", "::ffff:abcd"), ("network.peer.port", 5000),
        ("http.response.status_code", 204), SOURCE,
    ]  # fmt: skip


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_family_zero_has_no_addresses(role: Role) -> None:
    s, _ = one(make_exchange(GET_A, response_bytes(204), role=role, family=0))
    if role == Role.SERVER:
        assert items(s) == [
            ("http.request.method", "GET"), ("url.scheme", "http"), ("url.path", "/a"), ("http.route", "/a"),
            ("network.protocol.version", "1.1"), ("http.response.status_code", 204), SOURCE,
        ]  # fmt: skip
    else:
        assert items(s) == [("http.request.method", "GET"), ("network.protocol.version", "1.1"),
                            ("http.response.status_code", 204), SOURCE]  # fmt: skip


def test_server_without_local_address_names_no_server() -> None:
    s, _ = one(make_exchange(GET_A, response_bytes(204), local=("", 8080)))
    assert items(s) == [
        ("http.request.method", "GET"), ("url.scheme", "http"), ("url.path", "/a"), ("http.route", "/a"),
        ("network.protocol.version", "1.1"), ("client.address", "192.0.2.10"), ("network.peer.address", "192.0.2.10"),
        ("network.peer.port", 40000), ("http.response.status_code", 204), SOURCE,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "host", "address", "port", "url"),
    [
        ("/a", "[::1]:9000", "::1", 9000, "http://[::1]:9000/a"),
        # an absolute-form target names the server, not Host; userinfo is a credential
        ("http://u:pw@proxy.example:3128/p?token=abc&x=1", "ignored", "proxy.example", 3128,
         "http://proxy.example:3128/p?token=REDACTED&x=1"),
    ],
)  # fmt: skip
def test_client_request_names_the_server(target: str, host: str, address: str, port: int, url: str) -> None:
    req = request_bytes("GET", target, host=host, user_agent=None)
    s, _ = one(make_exchange(req, response_bytes(200), role=Role.CLIENT))
    assert items(s) == [
        ("http.request.method", "GET"), ("server.address", address), ("server.port", port), ("url.full", url),
        ("network.protocol.version", "1.1"), ("network.peer.address", "192.0.2.10"), ("network.peer.port", 40000),
        ("http.response.status_code", 200), ("http.response.body.size", 0), SOURCE,
    ]  # fmt: skip


def test_connect_and_asterisk_targets() -> None:
    req = request_bytes("CONNECT", "db.example:5432", host=None, user_agent=None)
    s, _ = one(make_exchange(req, response_bytes(200, body=b"tunnel"), role=Role.CLIENT))
    # CONNECT's 2xx has no body (RFC 9112 6.3); url.full has no path
    assert items(s) == [
        ("http.request.method", "CONNECT"), ("server.address", "db.example"), ("server.port", 5432),
        ("url.full", "http://db.example:5432"), ("network.protocol.version", "1.1"),
        ("network.peer.address", "192.0.2.10"), ("network.peer.port", 40000), ("http.response.status_code", 200),
        SOURCE,
    ]  # fmt: skip
    req = request_bytes("OPTIONS", "*", host=None, user_agent=None)
    s, _ = one(make_exchange(req, response_bytes(204)))
    assert s.name == "OPTIONS"
    assert items(s) == [
        ("http.request.method", "OPTIONS"), ("url.scheme", "http"), ("url.path", "*"),
        ("network.protocol.version", "1.1"), ("server.address", "192.0.2.1"), ("server.port", 8080),
        ("client.address", "192.0.2.10"), ("network.peer.address", "192.0.2.10"), ("network.peer.port", 40000),
        ("http.response.status_code", 204), SOURCE,
    ]  # fmt: skip


def test_unknown_method() -> None:
    req = request_bytes("PURGE", "/a", host=None, user_agent=None)
    s, _ = one(make_exchange(req, response_bytes(204)))
    assert s.name == "HTTP /a"
    assert items(s)[:2] == [("http.request.method", "_OTHER"), ("http.request.method_original", "PURGE")]


# bodies ---------------------------------------------------------------------------------------


def test_chunked_request_body_size_from_byte_counts() -> None:
    req = request_bytes("POST", "/a", host=None, user_agent=None, body=b"hello", chunked=True)
    assert len(chunk(b"hello")) == 15
    s, _ = one(make_exchange(req, response_bytes(201), role=Role.CLIENT))
    assert items(s) == [
        ("http.request.method", "POST"), ("network.protocol.version", "1.1"), ("server.address", "192.0.2.10"),
        ("server.port", 40000), ("url.full", "http://192.0.2.10:40000/a"), ("network.peer.address", "192.0.2.10"),
        ("network.peer.port", 40000), ("http.response.status_code", 201), ("http.request.body.size", 15),
        ("http.response.body.size", 0), SOURCE,
    ]  # fmt: skip


def test_chunked_request_with_a_cut_head_has_no_body_size() -> None:
    req = request_bytes("POST", "/a", host=None, user_agent=None, body=b"hello", chunked=True)
    head = req[: req.index(b"\r\n\r\n")]  # the capture ended inside the headers
    ex = dataclasses.replace(make_exchange(req, response_bytes(201), role=Role.CLIENT), req_head=head)
    s, c = one(ex)
    assert "http.request.body.size" not in s.attributes and c.stats.truncated_heads == 1


@pytest.mark.parametrize(
    ("resp_bytes_delta", "size"),
    [(0, 10), (5, 10), (-6, 4)],  # all of it; more bytes than Content-Length; fewer (cut)
)
def test_response_body_size_is_content_length_capped_by_bytes(resp_bytes_delta: int, size: int) -> None:
    resp = response_bytes(200, body=b"0123456789")
    ex = make_exchange(GET_A, resp, role=Role.CLIENT)
    ex = dataclasses.replace(ex, resp_bytes=ex.resp_bytes + resp_bytes_delta)
    s, _ = one(ex)
    assert items(s) == CLIENT_A + [("http.response.status_code", 200), ("http.response.body.size", size), SOURCE]


def test_head_request_has_no_response_body_size() -> None:
    req = request_bytes("HEAD", "/a", host=None, user_agent=None)
    s, _ = one(make_exchange(req, response_bytes(200, body=b"0123456789", head_only=True), role=Role.CLIENT))
    assert items(s)[-2:] == [("http.response.status_code", 200), SOURCE]


def test_response_head_cut_before_its_end_takes_content_length() -> None:
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n1234567"
    s, c = one(make_exchange(GET_A, resp, role=Role.CLIENT))
    assert items(s) == CLIENT_A + [("http.response.status_code", 200), ("http.response.body.size", 7), SOURCE]
    assert c.stats.truncated_heads == 1


# routes ---------------------------------------------------------------------------------------


def test_route_cap_overflow_renames_the_span() -> None:
    a = make_exchange(GET_A, response_bytes(204), conn_id=1)
    b = make_exchange(request_bytes("GET", "/b/7", host=None, user_agent=None), response_bytes(204), conn_id=2)
    (sa, sb), c = feed(a, b, max_routes=1)
    assert (sa.name, sb.name) == ("GET /a", "GET /{overflow}")
    assert items(sb)[:4] == [("http.request.method", "GET"), ("url.scheme", "http"), ("url.path", "/b/7"),
                             ("http.route", "/{overflow}")]  # fmt: skip
    assert c.stats.routes_overflowed == 1


def test_configured_route_is_not_capped() -> None:
    b = make_exchange(request_bytes("GET", "/b/7", host=None, user_agent=None), response_bytes(204), conn_id=2)
    (s,), c = feed(b, max_routes=1, routes=["/b/{n}"])
    assert s.name == "GET /b/{n}" and s.attributes["http.route"] == "/b/{n}"


# kernel ids -----------------------------------------------------------------------------------


def test_kernel_identified_span_takes_ids_sampling_and_source_last() -> None:
    client = make_exchange(GET_A, response_bytes(204), role=Role.CLIENT, pid=77, conn_id=5)
    ex = make_exchange(GET_A, response_bytes(204), parent=hint(ParentKind.PEER, client), conn_id=6)
    ex = dataclasses.replace(ex, kernel_ids=True, trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                             parent_span_id=b"\x03" * 8, sampled=False)  # fmt: skip
    s, c = one(ex)
    assert (s.trace_id, s.span_id, s.parent_span_id, s.sampled, s.peer_pid) == (
        b"\x01" * 16, b"\x02" * 8, b"\x03" * 8, False, 77)
    assert items(s) == SERVER_A + [("http.response.status_code", 204), ("kspan.parent.source", "peer")]
    assert c.stats.kernel_identified == 1 and c.stats.unsampled_exchanges == 1


# odd input ------------------------------------------------------------------------------------


def test_odd_records_are_counted_not_crashed() -> None:
    c = Correlator(WallClock(OFFSET))
    base = make_exchange(GET_A, response_bytes(200, body=b"x"))
    unparsed = make_exchange(GET_A, b"garbage")
    bad = [dataclasses.replace(base, remote_addr=b"1.2.3.4"), dataclasses.replace(base, family=10, remote_addr=None),
           dataclasses.replace(base, resp_bytes=None), dataclasses.replace(unparsed, status=None)]  # fmt: skip
    for i, ex in enumerate(bad):
        assert c.feed(dataclasses.replace(ex, conn_id=i)) == []
    assert c.stats.internal_errors == 4
    # No local address is no server.address; an unknown role is a client, an unknown end no
    # failure, a None head no parsed response (the kernel's status stands).
    (s,) = c.feed(dataclasses.replace(base, conn_id=8, local_addr=None))
    assert "server.address" not in s.attributes
    (s,) = c.feed(dataclasses.replace(base, conn_id=9, role=7, end=99, resp_head=None))
    assert s.kind is SpanKind.CLIENT and s.status is StatusCode.UNSET
    assert items(s)[-2:] == [("http.response.status_code", 200), SOURCE]
    (s,) = c.feed(dataclasses.replace(base, conn_id=10, end=99, resp_head=b"", resp_start_ns=0))
    assert s.status is StatusCode.UNSET and items(s) == SERVER_A + [SOURCE]
    assert c.stats.internal_errors == 4 and c.stats.no_response == 1


def test_has_no_body() -> None:
    # RFC 9112 6.3
    assert _spans.has_no_body(b"HEAD", 200) and _spans.has_no_body(b"GET", 204) and _spans.has_no_body(b"GET", 304)
    assert _spans.has_no_body(b"GET", 100) and _spans.has_no_body(b"GET", 199)
    assert _spans.has_no_body(b"CONNECT", 200) and _spans.has_no_body(b"CONNECT", 299)
    assert not _spans.has_no_body(b"CONNECT", 300) and not _spans.has_no_body(b"GET", 200)
    assert not _spans.has_no_body(b"GET", 99) and not _spans.has_no_body(b"GET", 2**80)
    with pytest.raises(TypeError):
        _spans.has_no_body(b"GET", None)


def test_retarget_copies_the_head_with_its_length_moved() -> None:
    c = Correlator(WallClock(OFFSET))
    head = request_bytes("GET", "/users/1", host="h", user_agent="ua")
    base = c._parsed(head)
    p = _spans.retarget(base, b"/users/12345")
    (r0,), (r,) = base.reqs, p.reqs
    assert r.target == b"/users/12345" and r.head_len == r0.head_len + 4
    assert [getattr(r, n) for n in r.__slots__ if n not in ("target", "head_len")] == [
        getattr(r0, n) for n in r0.__slots__ if n not in ("target", "head_len")]
    assert p.heads is base.heads and p.memo == {} and p.memo is not base.memo
    assert (p.tp, p.tp_raw, p.tp_sampled, p.trace_state) == (base.tp, base.tp_raw, base.tp_sampled, base.trace_state)


def test_a_span_field_the_extension_does_not_set_fails_the_import() -> None:
    code = (
        "import dataclasses, correlator.spans as s\n"
        "@dataclasses.dataclass(slots=True)\n"
        "class Span(s.Span):\n"
        "    extra: int = 0\n"
        "s.Span = Span\n"
        "import correlator.correlator\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Span has 15 fields, correlator/_spans.c sets 14" in r.stderr
