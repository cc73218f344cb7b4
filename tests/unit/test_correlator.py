"""correlator/correlator.py: spans from exchanges (semantic conventions, framing, status, secrets)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig, CorrelatorStats
from correlator.records import EndReason, Exchange, Role
from correlator.spans import Span, SpanKind, StatusCode
from tests.support.exchanges import make_exchange, request_bytes, response_bytes

OFFSET = 1_700_000_000_000_000_000
CLOCK = WallClock(OFFSET)


def feed_all(exs: list[Exchange], **cfg: object) -> tuple[list[Span], Correlator]:
    c = Correlator(CLOCK, CorrelatorConfig(**cfg))  # type: ignore[arg-type]
    out: list[Span] = []
    for ex in exs:
        out += c.feed(ex)
    out += c.flush()
    assert c.stats.internal_errors == 0, c.last_error
    return out, c


def one(ex: Exchange, **cfg: object) -> Span:
    spans, _ = feed_all([ex], **cfg)
    assert len(spans) == 1
    return spans[0]


def test_wall_clock() -> None:
    c = WallClock.now()
    assert abs(c.to_wall(time.monotonic_ns()) - time.time_ns()) < 50_000_000
    assert WallClock(10).to_wall(5) == 15


def test_server_span_semconv() -> None:
    ex = make_exchange(
        request_bytes("GET", "/users/42?page=2", host="shop.local:8080", user_agent="curl/8.5.0"),
        response_bytes(200, body=b"hello"),
        role=Role.SERVER, pid=321, local=("127.0.0.1", 8080), remote=("127.0.0.1", 51000),
    )  # fmt: skip
    s = one(ex)
    assert s.kind == SpanKind.SERVER and s.name == "GET /users/{id}" and s.pid == 321
    assert s.attributes == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": "/users/42",
        "http.route": "/users/{id}",  # no --route given: correlator/routes.py's heuristic
        "url.query": "page=2",
        "server.address": "shop.local",
        "server.port": 8080,
        "client.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 51000,
        "network.protocol.version": "1.1",
        "user_agent.original": "curl/8.5.0",
        "http.response.status_code": 200,
        "http.response.body.size": 5,
        "kspan.parent.source": "none",
    }
    assert s.status == StatusCode.UNSET and s.status_message == ""
    assert s.start_ns == ex.req_start_ns + OFFSET and s.end_ns == ex.resp_end_ns + OFFSET
    assert len(s.trace_id) == 16 and len(s.span_id) == 8 and s.parent_span_id is None


def test_client_span_semconv() -> None:
    ex = make_exchange(
        request_bytes("POST", "/api/v1/items?x=1", host="127.0.0.1:9000", body=b'{"a":1}'),
        response_bytes(201, body=b"{}"),
        role=Role.CLIENT, local=("127.0.0.1", 41000), remote=("127.0.0.1", 9000),
    )  # fmt: skip
    s = one(ex)
    assert s.kind == SpanKind.CLIENT and s.name == "POST"
    assert s.attributes == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": 9000,
        "url.full": "http://127.0.0.1:9000/api/v1/items?x=1",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 9000,
        "network.protocol.version": "1.1",
        "user_agent.original": "test-client/1.0",
        "http.response.status_code": 201,
        "http.request.body.size": 7,
        "http.response.body.size": 2,
        "kspan.parent.source": "none",
    }


def test_client_url_full_default_port_and_tls() -> None:
    s = one(
        make_exchange(request_bytes("GET", "/", host="example.com"), response_bytes(200), role=Role.CLIENT, tls=True)
    )
    assert s.attributes["url.full"] == "https://example.com/"
    assert s.attributes["server.port"] == 443
    s = one(make_exchange(request_bytes("GET", "/x", host="h:80"), response_bytes(200), role=Role.CLIENT))
    assert s.attributes["url.full"] == "http://h/x"


def test_client_without_host_uses_peer_address_ipv6() -> None:
    ex = make_exchange(
        request_bytes("GET", "/v6", host=None), response_bytes(200), role=Role.CLIENT, family=10,
        local=("::1", 40000), remote=("::1", 8080),
    )  # fmt: skip
    s = one(ex)
    assert s.attributes["url.full"] == "http://[::1]:8080/v6"
    assert s.attributes["server.address"] == "::1" and s.attributes["server.port"] == 8080


def test_ipv6_host_header_and_v4_mapped_peer() -> None:
    ex = make_exchange(
        request_bytes("GET", "/", host="[::1]:8443"), response_bytes(200), family=10,
        local=("::ffff:127.0.0.1", 8443), remote=("::ffff:127.0.0.1", 50123),
    )  # fmt: skip
    s = one(ex)
    assert s.attributes["server.address"] == "::1" and s.attributes["server.port"] == 8443
    assert s.attributes["client.address"] == "127.0.0.1"
    assert s.attributes["network.peer.address"] == "127.0.0.1"


def test_server_without_host_uses_local_address_and_unknown_tuple() -> None:
    s = one(
        make_exchange(request_bytes("GET", "/", host=None, version="HTTP/1.0"), response_bytes(200, version="HTTP/1.0"))
    )
    assert s.attributes["server.address"] == "192.0.2.1" and s.attributes["server.port"] == 8080
    assert s.attributes["network.protocol.version"] == "1.0"
    s = one(make_exchange(request_bytes("GET", "/", host=None), response_bytes(200), family=0))
    for k in ("server.address", "client.address", "network.peer.address", "network.peer.port"):
        assert k not in s.attributes


def test_routes_name_server_spans_only() -> None:
    req = request_bytes("GET", "/users/42/orders/7?full=1")
    cfg = {"routes": ["/health", "/users/{id}", "/users/{id}/orders/{order}", "/static/*"]}
    s = one(make_exchange(req, response_bytes(200)), **cfg)
    assert s.name == "GET /users/{id}/orders/{order}"
    assert s.attributes["http.route"] == "/users/{id}/orders/{order}"
    assert s.attributes["url.path"] == "/users/42/orders/7"
    c = one(make_exchange(req, response_bytes(200), role=Role.CLIENT), **cfg)
    assert c.name == "GET" and "http.route" not in c.attributes
    s = one(make_exchange(request_bytes("GET", "/static/css/a.css"), response_bytes(200)), **cfg)
    assert s.name == "GET /static/*"
    # No template matches: the heuristic names it; with the heuristic off, nothing does.
    s = one(make_exchange(request_bytes("GET", "/nomatch/42"), response_bytes(404)), **cfg)
    assert s.name == "GET /nomatch/{id}" and s.attributes["http.route"] == "/nomatch/{id}"
    s = one(make_exchange(request_bytes("GET", "/nomatch/42"), response_bytes(404)), **cfg, auto_routes=False)
    assert s.name == "GET" and "http.route" not in s.attributes


def test_raw_path_never_in_name() -> None:
    s = one(make_exchange(request_bytes("DELETE", "/users/99"), response_bytes(204)))
    assert s.name == "DELETE /users/{id}"
    s = one(make_exchange(request_bytes("DELETE", "/users/99"), response_bytes(204)), auto_routes=False)
    assert s.name == "DELETE"


def test_unknown_method() -> None:
    s = one(make_exchange(request_bytes("PROPFIND", "/dav"), response_bytes(207)))
    assert s.name == "HTTP /dav"
    assert s.attributes["http.request.method"] == "_OTHER"
    assert s.attributes["http.request.method_original"] == "PROPFIND"
    s = one(make_exchange(request_bytes("PURGE", "/users/1"), response_bytes(200)), routes=["/users/{id}"])
    assert s.name == "HTTP /users/{id}"


@pytest.mark.parametrize(
    ("role", "code", "status", "error_type"),
    [
        (Role.SERVER, 200, StatusCode.UNSET, None),
        (Role.SERVER, 302, StatusCode.UNSET, None),
        (Role.SERVER, 404, StatusCode.UNSET, None),
        (Role.SERVER, 500, StatusCode.ERROR, "500"),
        (Role.SERVER, 503, StatusCode.ERROR, "503"),
        (Role.CLIENT, 200, StatusCode.UNSET, None),
        (Role.CLIENT, 404, StatusCode.ERROR, "404"),
        (Role.CLIENT, 418, StatusCode.ERROR, "418"),
        (Role.CLIENT, 502, StatusCode.ERROR, "502"),
    ],
)
def test_status_rules(role: Role, code: int, status: StatusCode, error_type: str | None) -> None:
    s = one(make_exchange(request_bytes("GET", "/"), response_bytes(code, body=b"x"), role=role))
    assert s.attributes["http.response.status_code"] == code
    assert s.status == status
    assert s.attributes.get("error.type") == error_type


def test_keep_alive_several_exchanges_on_one_connection() -> None:
    exs = [
        make_exchange(request_bytes("GET", f"/{i}"), response_bytes(200 + i, body=b"ab"), conn_id=0xABC,
                      req_start_ns=1_000_000_000 + i * 10_000_000, end=EndReason.NEXT_REQUEST)
        for i in range(5)
    ]  # fmt: skip
    spans, c = feed_all(exs)
    assert [s.attributes["url.path"] for s in spans] == [f"/{i}" for i in range(5)]
    assert [s.attributes["http.response.status_code"] for s in spans] == [200, 201, 202, 203, 204]
    assert len({s.span_id for s in spans}) == 5 and len({s.trace_id for s in spans}) == 5
    assert all(s.status == StatusCode.UNSET for s in spans)
    assert c.stats.exchanges == 5 and c.stats.spans == 5


def test_pipelined_requests_become_separate_spans() -> None:
    req = request_bytes("GET", "/a") + request_bytes("GET", "/b") + request_bytes("HEAD", "/c")
    resp = (
        response_bytes(200, body=b"A")
        + response_bytes(404, body=b"")
        + response_bytes(200, body=b"ccc", head_only=True)
    )
    spans, c = feed_all([make_exchange(req, resp)])
    assert [s.attributes["url.path"] for s in spans] == ["/a", "/b", "/c"]
    assert [s.attributes["http.response.status_code"] for s in spans] == [200, 404, 200]
    assert len({s.span_id for s in spans}) == 3 and len({s.trace_id for s in spans}) == 1
    assert c.stats.pipelined_splits == 2


def test_pipelined_without_all_responses_captured() -> None:
    req = request_bytes("GET", "/a") + request_bytes("GET", "/b")
    spans, _ = feed_all([make_exchange(req, response_bytes(200, body=b"A" * 300))])
    assert len(spans) == 2
    assert spans[0].attributes["http.response.status_code"] == 200
    assert "http.response.status_code" not in spans[1].attributes
    assert spans[1].status == StatusCode.UNSET


def test_truncated_request_line_still_gives_a_span() -> None:
    long_path = "/search/" + "q" * 700
    spans, c = feed_all([make_exchange(request_bytes("GET", long_path), response_bytes(200))])
    (s,) = spans
    assert s.name == "GET /search/{id}" and s.attributes["url.path"].startswith("/search/qqq")
    assert len(s.attributes["url.path"]) < 512
    assert c.stats.truncated_heads == 1


def test_truncated_headers_keep_what_parsed() -> None:
    req = request_bytes("GET", "/x", headers=[("X-Big", "b" * 600)], user_agent="ua/1")
    spans, c = feed_all([make_exchange(req, response_bytes(200, headers=[("X-Pad", "p" * 300)], body=b"hi"))])
    (s,) = spans
    assert s.attributes["user_agent.original"] == "ua/1"
    assert s.attributes["http.response.status_code"] == 200
    assert c.stats.truncated_heads == 1


def test_large_request_body_is_not_a_truncated_head() -> None:
    req = request_bytes("POST", "/upload", body=b"x" * 5000)
    spans, c = feed_all([make_exchange(req, response_bytes(200))])
    assert spans[0].attributes["http.request.body.size"] == 5000
    assert c.stats.truncated_heads == 0


def test_chunked_response_complete_and_cut() -> None:
    resp = response_bytes(200, body=b"0123456789" * 50, chunked=True)
    s = one(make_exchange(request_bytes("GET", "/"), resp))
    assert s.status == StatusCode.UNSET and s.attributes["http.response.body.size"] > 500
    s = one(make_exchange(request_bytes("GET", "/"), resp, end=EndReason.CLOSED))
    assert s.status == StatusCode.UNSET  # closed after the last chunk: complete
    s = one(make_exchange(request_bytes("GET", "/"), resp, end=EndReason.CLOSED, delivered=len(resp) - 7))
    assert s.status == StatusCode.ERROR and s.attributes["error.type"] == "response_incomplete"
    assert s.attributes["http.response.status_code"] == 200


def test_content_length_closed_mid_response() -> None:
    resp = response_bytes(200, body=b"z" * 1000)
    spans, c = feed_all([make_exchange(request_bytes("GET", "/big"), resp, end=EndReason.CLOSED, delivered=600)])
    (s,) = spans
    assert s.status == StatusCode.ERROR and s.attributes["error.type"] == "response_incomplete"
    assert s.status_message
    assert s.attributes["http.response.body.size"] == 600 - (len(resp) - 1000)
    assert c.stats.responses_incomplete == 1
    s = one(make_exchange(request_bytes("GET", "/big"), resp, end=EndReason.CLOSED))
    assert s.status == StatusCode.UNSET and s.attributes["http.response.body.size"] == 1000


def test_close_delimited_response_is_complete_at_close() -> None:
    resp = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"
    s = one(make_exchange(request_bytes("GET", "/", version="HTTP/1.0"), resp, end=EndReason.CLOSED))
    assert s.status == StatusCode.UNSET


def test_expect_100_continue() -> None:
    req = request_bytes("PUT", "/blob", headers=[("Expect", "100-continue")], body=b"d" * 100)
    resp = response_bytes(201, body=b"made", interim=[100])
    ex = make_exchange(req, resp)
    assert ex.interim_response
    s = one(ex)
    assert s.attributes["http.response.status_code"] == 201
    assert s.attributes["http.response.body.size"] == 4
    assert s.status == StatusCode.UNSET


def test_expect_100_continue_rejected() -> None:
    req = request_bytes("PUT", "/blob", headers=[("Expect", "100-continue")], body=b"")
    s = one(make_exchange(req, response_bytes(417, body=b""), role=Role.CLIENT))
    assert s.attributes["http.response.status_code"] == 417 and s.status == StatusCode.ERROR


@pytest.mark.parametrize(
    ("method", "resp"),
    [
        ("HEAD", response_bytes(200, body=b"x" * 500, head_only=True)),
        ("GET", response_bytes(204)),
        ("GET", response_bytes(304, headers=[("ETag", '"abc"')])),
    ],
)
def test_bodyless_responses_complete_even_when_closed(method: str, resp: bytes) -> None:
    for end in (EndReason.COMPLETE, EndReason.CLOSED, EndReason.TIMEOUT):
        s = one(make_exchange(request_bytes(method, "/r"), resp, end=end, role=Role.CLIENT))
        assert s.status == StatusCode.UNSET, end
        assert "http.response.body.size" not in s.attributes


@pytest.mark.parametrize(
    ("end", "error_type", "counter"),
    [
        (EndReason.CLOSED, "connection_closed", "closed_no_response"),
        (EndReason.TIMEOUT, "timeout", "timeouts"),
        (EndReason.EVICTED, "evicted", "evicted"),
    ],
)
def test_no_response(end: EndReason, error_type: str, counter: str) -> None:
    for role in (Role.SERVER, Role.CLIENT):
        ex = make_exchange(request_bytes("GET", "/slow"), None, end=end, role=role)
        spans, c = feed_all([ex])
        (s,) = spans
        assert s.status == StatusCode.ERROR and s.attributes["error.type"] == error_type
        assert "http.response.status_code" not in s.attributes
        assert s.end_ns == ex.req_end_ns + OFFSET  # the last time known
        assert getattr(c.stats, counter) == 1


def test_timeout_with_partial_response_is_error_but_keeps_status() -> None:
    resp = response_bytes(200, body=b"y" * 100)
    s = one(make_exchange(request_bytes("GET", "/"), resp, end=EndReason.TIMEOUT, delivered=len(resp) - 10))
    assert s.status == StatusCode.ERROR and s.attributes["error.type"] == "timeout"
    assert s.attributes["http.response.status_code"] == 200
    # The kernel timed out but the captured framing says the response was whole: no error.
    s = one(make_exchange(request_bytes("GET", "/"), resp, end=EndReason.TIMEOUT))
    assert s.status == StatusCode.UNSET


def test_next_request_without_response_is_counted_not_error() -> None:
    spans, c = feed_all([make_exchange(request_bytes("GET", "/"), None, end=EndReason.NEXT_REQUEST)])
    assert spans[0].status == StatusCode.UNSET and c.stats.no_response == 1


def test_unparsed_response_falls_back_to_kernel_status() -> None:
    ex = make_exchange(request_bytes("GET", "/"), b"\x00garbage" * 4, status=503)
    spans, c = feed_all([ex])
    assert spans[0].attributes["http.response.status_code"] == 503 and spans[0].status == StatusCode.ERROR
    assert c.stats.unparsed_responses == 1


def test_5xx_error_type_wins_over_transport_error() -> None:
    resp = response_bytes(500, body=b"e" * 50)
    s = one(make_exchange(request_bytes("GET", "/"), resp, end=EndReason.CLOSED, delivered=len(resp) - 5))
    assert s.status == StatusCode.ERROR and s.attributes["error.type"] == "500"


@pytest.mark.parametrize(
    ("mode", "server_query", "client_full"),
    [
        ("keep", "q=shoes&token=abc123&sig=zz", "http://h:1/s?q=shoes&token=abc123&sig=zz"),
        ("redact", "q=shoes&token=REDACTED&sig=REDACTED", "http://h:1/s?q=shoes&token=REDACTED&sig=REDACTED"),
        ("drop", None, "http://h:1/s"),
    ],
)
def test_query_modes(mode: str, server_query: str | None, client_full: str) -> None:
    req = request_bytes("GET", "/s?q=shoes&token=abc123&sig=zz", host="h:1")
    s = one(make_exchange(req, response_bytes(200)), query=mode)
    assert s.attributes.get("url.query") == server_query
    c = one(make_exchange(req, response_bytes(200), role=Role.CLIENT), query=mode)
    assert c.attributes["url.full"] == client_full


@pytest.mark.parametrize(
    ("query", "redacted"),
    [
        ("access_token=a1&x=2", "access_token=REDACTED&x=2"),
        (
            "X-Amz-Signature=abc&X-Amz-Credential=AK%2F1&X-Amz-Date=2024",
            "X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Date=2024",
        ),
        ("password=hunter2&user=bob", "password=REDACTED&user=bob"),
        (
            "api_key=k&apikey=k2&key=k3&Signature=s&AWSAccessKeyId=id",
            "api_key=REDACTED&apikey=REDACTED&key=REDACTED&Signature=REDACTED&AWSAccessKeyId=REDACTED",
        ),
        ("code=oauthcode&state=s1", "code=REDACTED&state=s1"),
        ("client_secret=s&refresh_token=r", "client_secret=REDACTED&refresh_token=REDACTED"),
        ("acc%65ss_token=x", "acc%65ss_token=REDACTED"),
        ("page=2&sort=asc", "page=2&sort=asc"),
        ("token", "token"),
        ("token=", "token="),
        ("a=1&&b=2", "a=1&&b=2"),
    ],
)  # fmt: skip
def test_query_redaction_keys(query: str, redacted: str) -> None:
    s = one(make_exchange(request_bytes("GET", "/p?" + query), response_bytes(200)))
    assert s.attributes["url.query"] == redacted


SECRETS = {
    "Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.SECRET-BEARER",
    "Proxy-Authorization": "Basic U0VDUkVULVBST1hZ",
    "Cookie": "sessionid=SECRET-COOKIE-VALUE; csrftoken=SECRET-CSRF",
    "X-Api-Key": "SECRET-API-KEY-123",
}


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_secrets_never_exported(role: Role) -> None:
    req = request_bytes(
        "POST", "/login?password=SECRET-QUERY-PW", headers=list(SECRETS.items()), body=b"user=a&pass=SECRET-BODY"
    )
    resp = response_bytes(
        200, headers=[("Set-Cookie", "sid=SECRET-SET-COOKIE; HttpOnly"), ("WWW-Authenticate", "SECRET-WWW")],
        body=b'{"token": "SECRET-RESPONSE-BODY"}',
    )  # fmt: skip
    spans, _ = feed_all([make_exchange(req, resp, role=role)], query="redact")
    (s,) = spans
    exported = [s.name, s.status_message, s.trace_state, *map(str, s.attributes.values()), *s.attributes]
    for text in exported:
        assert "SECRET" not in text, text
        for v in SECRETS.values():
            assert v not in text
    # Only Host and User-Agent header values are exported at all.
    assert s.attributes["user_agent.original"] == "test-client/1.0"


def test_userinfo_in_absolute_target_is_dropped() -> None:
    req = b"GET http://alice:SECRET-PW@proxy.example:3128/p?q=1 HTTP/1.1\r\nHost: proxy.example:3128\r\n\r\n"
    c = one(make_exchange(req, response_bytes(200), role=Role.CLIENT))
    assert c.attributes["url.full"] == "http://proxy.example:3128/p?q=1"
    s = one(make_exchange(req, response_bytes(200)))
    assert s.attributes["url.path"] == "/p" and s.attributes["server.address"] == "proxy.example"
    for v in [*c.attributes.values(), *s.attributes.values()]:
        assert "SECRET" not in str(v)


def test_invalid_host_header_is_not_trusted() -> None:
    s = one(
        make_exchange(request_bytes("GET", "/", host="bad host\tname:99999"), response_bytes(200), role=Role.CLIENT)
    )
    assert s.attributes["server.address"] == "192.0.2.10" and s.attributes["server.port"] == 40000


def test_unparseable_request_counted_and_skipped() -> None:
    tls_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(60))
    exs = [
        make_exchange(tls_hello, b"\x16\x03\x03\x00\x5a", conn_id=1),
        make_exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None, conn_id=2, end=EndReason.CLOSED),
        make_exchange(request_bytes("GET", "/ok"), response_bytes(200), conn_id=3),
    ]
    spans, c = feed_all(exs)
    assert [s.attributes["url.path"] for s in spans] == ["/ok"]
    st = c.stats
    assert st.unparsed_exchanges == 2
    assert st.unparsed_bytes == exs[0].req_bytes + exs[0].resp_bytes + exs[1].req_bytes
    assert st.exchanges == 3 and st.spans == 1


def test_determinism_same_stream_same_spans() -> None:
    exs = [
        make_exchange(request_bytes("GET", f"/{i}"), response_bytes(200 if i % 3 else 500), conn_id=0x10 + i % 4,
                      req_start_ns=2_000_000_000 + i * 1_000_000, role=Role.SERVER if i % 2 else Role.CLIENT)
        for i in range(30)
    ]  # fmt: skip
    a, _ = feed_all(exs, id_salt=b"salt-1")
    b, _ = feed_all(exs, id_salt=b"salt-1")
    assert [dataclasses.asdict(s) for s in a] == [dataclasses.asdict(s) for s in b]
    other, _ = feed_all(exs, id_salt=b"salt-2")
    assert {s.span_id for s in a}.isdisjoint({s.span_id for s in other})
    long_salt, _ = feed_all(exs, id_salt=b"x" * 100)  # longer than a blake2b key
    assert len(long_salt) == 30


def test_span_ids_follow_identity() -> None:
    from correlator.linker import make_linker

    ex = make_exchange(request_bytes("GET", "/"), response_bytes(200), conn_id=77, req_start_ns=123456)
    s = one(ex, id_salt=b"k")
    assert s.span_id == make_linker(b"k", 30, 10, 10).span_id(77, 123456)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="query mode"):
        Correlator(CLOCK, CorrelatorConfig(query="hide"))
    with pytest.raises(ValueError, match="max_hold_s"):
        Correlator(CLOCK, CorrelatorConfig(max_hold_s=0))
    with pytest.raises(ValueError, match="max_held_spans"):
        Correlator(CLOCK, CorrelatorConfig(max_held_spans=0))
    with pytest.raises(ValueError, match="route template"):
        Correlator(CLOCK, CorrelatorConfig(routes=["users/{id}"]))
    with pytest.raises(ValueError, match="catch-all"):
        Correlator(CLOCK, CorrelatorConfig(routes=["/a/*/b"]))
    Correlator(CLOCK)  # defaults are valid


def test_stats_as_dict() -> None:
    d = CorrelatorStats().as_dict()
    for k in ("exchanges", "spans", "unparsed_exchanges", "unparsed_bytes", "orphaned_spans", "held_dropped",
              "truncated_heads", "pipelined_splits", "timeouts", "internal_errors", "held", "duplicate_ids",
              "duplicate_exchanges"):  # fmt: skip
        assert d[k] == 0
    assert all(isinstance(v, int) for v in d.values())


def _local_pair(start: int = 1_000_000_000) -> tuple[Exchange, Exchange]:
    """A loopback client and its server end with no kernel PEER hint: the server waits for the client."""
    req, resp = request_bytes("GET", "/dup"), response_bytes(200)
    client = make_exchange(req, resp, role=Role.CLIENT, pid=10, conn_id=0xC1, req_start_ns=start,
                           local=("127.0.0.1", 40000), remote=("127.0.0.1", 8080))  # fmt: skip
    server = make_exchange(req, resp, role=Role.SERVER, pid=20, conn_id=0x51, req_start_ns=start + 5_000,
                           local=("127.0.0.1", 8080), remote=("127.0.0.1", 40000))  # fmt: skip
    return client, server


@pytest.mark.parametrize("repeat", ["same record", "sweep timeout", "other head"])
def test_repeat_while_waiting_for_peer_is_dropped_and_counted(repeat: str) -> None:
    # The first record is kept (it still links to its client); the repeat is one counted drop
    # and nothing else: no timeout, no unparsed exchange, no second span with the same id.
    client, server = _local_pair()
    again = {
        "same record": server,
        "sweep timeout": dataclasses.replace(server, end=EndReason.TIMEOUT, resp_start_ns=0, resp_end_ns=0,
                                             resp_bytes=0, resp_head=b"", resp_tail=b"", status=0),
        "other head": dataclasses.replace(server, req_head=b"\x16\x03\x01 not http"),
    }[repeat]  # fmt: skip
    c = Correlator(CLOCK, CorrelatorConfig())
    assert c.feed(server) == [] and c.stats.peer_waiting == 1
    assert c.feed(again) == []
    out = c.feed(client) + c.flush()
    st = c.stats
    assert st.exchanges == 3 and st.spans == len(out) == 2
    assert st.duplicate_exchanges == 1 and c.stats.as_dict()["duplicate_exchanges"] == 1
    assert st.timeouts == 0 and st.unparsed_exchanges == 0 and st.duplicate_ids == 0 and st.internal_errors == 0
    srv = next(s for s in out if s.kind == SpanKind.SERVER)
    cli = next(s for s in out if s.kind == SpanKind.CLIENT)
    assert srv.parent_span_id == cli.span_id and srv.trace_id == cli.trace_id
    assert srv.attributes["http.response.status_code"] == 200 and srv.status == StatusCode.UNSET


def test_repeat_still_waiting_at_flush_is_dropped_and_counted() -> None:
    # The case fuzzing found: the same server exchange fed twice, its client never seen.
    _, server = _local_pair()
    spans, c = feed_all([server, server])
    assert len(spans) == 1 and c.stats.duplicate_exchanges == 1
    st = c.stats
    assert st.spans == st.exchanges - st.unparsed_exchanges - st.duplicate_exchanges + st.pipelined_splits


def test_recording_fed_twice_loses_nothing_silently() -> None:
    # After the first has left the wait, a repeat reaches the linker: it goes out unlinked and
    # counts as duplicate_ids. Either way every record fed is a span or a counted drop.
    client, server = _local_pair()
    spans, c = feed_all([server, client, server, client])
    st = c.stats
    assert st.exchanges == 4 and st.duplicate_exchanges + st.duplicate_ids == 2
    assert st.spans == len(spans) == st.exchanges - st.duplicate_exchanges


def test_end_never_before_start() -> None:
    ex = dataclasses.replace(
        make_exchange(request_bytes("GET", "/"), None, end=EndReason.CLOSED), req_end_ns=0, resp_end_ns=0
    )
    s = one(ex)
    assert s.end_ns == s.start_ns


def test_memoised_parses_stay_bounded_and_exact() -> None:
    c = Correlator(CLOCK, CorrelatorConfig())
    same = request_bytes("GET", "/same?token=t1")
    for i in range(3000):
        req = same if i % 2 else request_bytes("GET", f"/u/{i}")
        (s,) = c.feed(make_exchange(req, response_bytes(200, body=b"x" * (i % 7)), conn_id=i + 1, role=Role(2 - i % 2)))
        assert s.attributes["http.response.body.size"] == i % 7
        if i % 2:
            assert s.attributes["url.full"] == "http://127.0.0.1:8080/same?token=REDACTED"
        else:
            assert s.attributes["url.path"] == f"/u/{i}"
    memos = (c._feeder.heads, c._feeder.shapes, c._resps, c._hosts)
    assert all(len(m) <= 1024 for m in memos)


def test_client_ipv6_host_header() -> None:
    s = one(make_exchange(request_bytes("GET", "/x", host="[::1]:8080"), response_bytes(200), role=Role.CLIENT))
    assert s.attributes["url.full"] == "http://[::1]:8080/x" and s.attributes["server.address"] == "::1"


def test_expect_100_continue_as_the_kernel_records_it() -> None:
    # Interim and final in separate reads: the kernel restarts the response at the final one
    # and only flags that an interim came.
    req = request_bytes("PUT", "/blob", headers=[("Expect", "100-continue")], body=b"d" * 100)
    ex = make_exchange(req, response_bytes(201, body=b"made"), interim=True)
    assert ex.interim_response and ex.resp_head.startswith(b"HTTP/1.1 201")
    s = one(ex)
    assert s.attributes["http.response.status_code"] == 201 and s.attributes["http.response.body.size"] == 4
    # Interim and final in one read, never completed in the kernel: the captured framing decides.
    ex = make_exchange(req, response_bytes(201, body=b"made", interim=[100]), end=EndReason.TIMEOUT)
    s = one(ex)
    assert s.status == StatusCode.UNSET and s.attributes["http.response.status_code"] == 201
