"""correlator/http1.py: request and response heads as the kernel captures them."""

from __future__ import annotations

import pytest

from correlator import http1
from tests.support.exchanges import chunk, request_bytes, response_bytes


def test_simple_request_head() -> None:
    raw = request_bytes("GET", "/a/b?x=1", host="example.com:8080", headers=[("Accept", "*/*")], user_agent="curl/8.0")
    (r,) = http1.parse_requests(raw)
    assert r.method == b"GET"
    assert r.target == b"/a/b?x=1"
    assert r.version == "1.1"
    assert r.host == b"example.com:8080"
    assert r.user_agent == b"curl/8.0"
    assert r.complete and r.head_len == len(raw)
    assert r.content_length is None and not r.chunked and r.traceparent is None


def test_headers_are_case_insensitive_and_trimmed() -> None:
    raw = b"POST /x HTTP/1.0\r\nhOsT:   h1  \r\nCONTENT-LENGTH: 5\r\nuser-AGENT: UA\r\n\r\nhello"
    (r,) = http1.parse_requests(raw)
    assert (r.host, r.user_agent, r.content_length, r.version) == (b"h1", b"UA", 5, "1.0")


def test_chunked_wins_over_content_length() -> None:
    raw = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    (r,) = http1.parse_requests(raw)
    assert r.chunked and r.content_length is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"12", 12), (b"7, 7", 7), (b"7, 8", None), (b"-1", None), (b"abc", None), (b"9" * 30, None)],
)
def test_content_length_values(value: bytes, expected: int | None) -> None:
    assert http1.parse_content_length(value) == expected


def test_expect_continue() -> None:
    raw = request_bytes("PUT", "/up", headers=[("Expect", "100-Continue")], body=b"x" * 10)
    (r,) = http1.parse_requests(raw)
    assert r.expect_continue and r.content_length == 10


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge preface
        b"GET /x HTTP/0.9\r\n\r\n",
        b"GET /x\r\n\r\n",  # HTTP/0.9 simple request
        b"G(T /x HTTP/1.1\r\n\r\n",  # not a token
        b"GET x HTTP/1.1\r\n\r\n",  # not a target form
        b" GET / HTTP/1.1\r\n\r\n",
        b"GET /a\x00b HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"hello world",
    ],
)
def test_not_http_is_none(raw: bytes) -> None:
    assert http1.parse_requests(raw) == []


def test_request_line_cut_by_capture_limit() -> None:
    raw = request_bytes("GET", "/long/" + "p" * 600)[:512]
    (r,) = http1.parse_requests(raw)
    assert r.method == b"GET" and r.target.startswith(b"/long/ppp") and r.version == ""
    assert not r.complete


def test_cut_inside_version_still_parses() -> None:
    raw = b"GET /abc HTTP/1."
    (r,) = http1.parse_requests(raw)
    assert r.target == b"/abc" and r.version == "" and not r.complete


def test_headers_cut_keep_whole_lines_only() -> None:
    # The capture ends inside the Content-Length value: "12" of "1234" would be a lie.
    raw = b"POST /x HTTP/1.1\r\nHost: h\r\nUser-Agent: ua\r\nContent-Length: 12"
    (r,) = http1.parse_requests(raw)
    assert r.host == b"h" and r.user_agent == b"ua"
    assert r.content_length is None and not r.complete


def test_pipelined_requests_split() -> None:
    raw = request_bytes("GET", "/1") + request_bytes("POST", "/2", body=b"abc") + request_bytes("HEAD", "/3")
    rs = http1.parse_requests(raw)
    assert [(r.method, r.target) for r in rs] == [(b"GET", b"/1"), (b"POST", b"/2"), (b"HEAD", b"/3")]
    assert rs[1].content_length == 3


def test_pipelined_after_chunked_body() -> None:
    raw = request_bytes("POST", "/1", body=b"hello world!" * 3, chunked=True) + request_bytes("GET", "/2")
    rs = http1.parse_requests(raw)
    assert [r.target for r in rs] == [b"/1", b"/2"]


def test_pipelined_last_request_cut() -> None:
    raw = (request_bytes("GET", "/1") * 1 + request_bytes("GET", "/2", headers=[("X-Pad", "z" * 600)]))[:512]
    rs = http1.parse_requests(raw)
    assert [r.target for r in rs] == [b"/1", b"/2"]
    assert rs[0].complete and not rs[1].complete


def test_body_that_looks_like_a_request_is_not_split() -> None:
    body = request_bytes("DELETE", "/evil")
    raw = request_bytes("POST", "/upload", body=body)
    rs = http1.parse_requests(raw)
    assert [r.target for r in rs] == [b"/upload"]
    # A request without framing headers has no body (RFC 9112 6.3): what follows is a request.
    raw2 = b"POST /upload HTTP/1.1\r\nHost: h\r\n\r\n" + body
    assert len(http1.parse_requests(raw2)) == 2
    assert len(http1.parse_requests(raw, limit=1)) == 1


def test_pipelined_limit() -> None:
    raw = request_bytes("GET", "/", host="h", user_agent=None) * 40
    assert len(http1.parse_requests(raw[:512], limit=16)) == 16


def test_absolute_and_special_targets() -> None:
    assert http1.parse_requests(b"GET http://h:81/p?q HTTP/1.1\r\n\r\n")[0].target == b"http://h:81/p?q"
    assert http1.parse_requests(b"OPTIONS * HTTP/1.1\r\n\r\n")[0].target == b"*"
    assert http1.parse_requests(b"CONNECT h:443 HTTP/1.1\r\n\r\n")[0].target == b"h:443"


def test_response_head() -> None:
    raw = response_bytes(200, headers=[("Content-Type", "text/plain")], body=b"hello")
    r = http1.parse_final_response(raw)
    assert r is not None
    assert (r.status, r.version, r.content_length, r.chunked, r.complete) == (200, "1.1", 5, False, True)
    assert r.head_end == len(raw) - 5


def test_response_interim_skipped() -> None:
    raw = response_bytes(201, body=b"ok", interim=[100])
    r = http1.parse_final_response(raw)
    assert r is not None and r.status == 201 and r.interim == 1 and r.content_length == 2
    assert raw[r.head_end :] == b"ok"


def test_response_only_interim_is_none() -> None:
    assert http1.parse_final_response(b"HTTP/1.1 100 Continue\r\n\r\n") is None
    assert http1.parse_final_response(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 2") is None


def test_switching_protocols_is_final() -> None:
    r = http1.parse_final_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert r is not None and r.status == 101


@pytest.mark.parametrize(
    "raw",
    [b"", b"HTTP/1.1", b"HTTP/2 200\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n", b"SSH-2.0-x\r\n"],
)
def test_response_not_http(raw: bytes) -> None:
    assert http1.parse_final_response(raw) is None


def test_response_without_reason_phrase() -> None:
    r = http1.parse_final_response(b"HTTP/1.1 204\r\n\r\n")
    assert r is not None and r.status == 204 and r.complete


def test_response_head_cut() -> None:
    raw = response_bytes(200, headers=[("X-Long", "v" * 300)], body=b"x")[:256]
    r = http1.parse_final_response(raw)
    assert r is not None and r.status == 200 and not r.complete and r.head_end == -1


@pytest.mark.parametrize(
    ("method", "status", "raw", "resp_bytes", "tail", "expected"),
    [
        (b"GET", 200, response_bytes(200, body=b"abcdef"), None, None, True),
        (b"GET", 200, response_bytes(200, body=b"abcdef"), -2, None, False),
        (b"HEAD", 200, response_bytes(200, body=b"abcdef", head_only=True), None, None, True),
        (b"GET", 204, response_bytes(204), None, None, True),
        (b"GET", 304, response_bytes(304, headers=[("ETag", '"x"')]), None, None, True),
        (b"GET", 200, response_bytes(200, body=b"z" * 40, chunked=True), None, None, True),
        (b"GET", 200, response_bytes(200, body=b"z" * 40, chunked=True), -3, None, False),
        (b"GET", 200, b"HTTP/1.0 200 OK\r\n\r\nclose-delimited", None, None, None),
    ],
)
def test_framing_complete(
    method: bytes, status: int, raw: bytes, resp_bytes: int | None, tail: bytes | None, expected: bool | None
) -> None:
    delivered = raw if resp_bytes is None else raw[:resp_bytes]
    r = http1.parse_final_response(delivered[:256])
    assert r is not None and r.status == status
    assert http1.framing_complete(method, r, len(delivered), delivered[-8:]) is expected


def test_pipelined_responses() -> None:
    raw = (
        response_bytes(200, body=b"one") + response_bytes(404, body=b"") + response_bytes(200, chunked=True, body=b"3")
    )
    rs = http1.parse_responses(raw, [b"GET", b"GET", b"GET"])
    assert [r.status for r in rs] == [200, 404, 200]
    # HEAD's response has no body even with a Content-Length.
    raw2 = response_bytes(200, body=b"12345", head_only=True) + response_bytes(500, body=b"")
    assert [r.status for r in http1.parse_responses(raw2, [b"HEAD", b"GET"])] == [200, 500]


def test_chunk_helper_roundtrip() -> None:
    assert chunk(b"abc", 2) == b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"


def test_bare_lf_line_endings_are_accepted() -> None:
    (r,) = http1.parse_requests(b"GET /lf HTTP/1.1\nHost: h\nUser-Agent: nc\n\n")
    assert (r.target, r.host, r.user_agent, r.complete) == (b"/lf", b"h", b"nc", True)
    assert http1.parse_requests(b"GET /lf HTTP/2.0\nHost: h\n\n") == []
