"""Fuzzing the HTTP/1 parsers and Correlator.feed with malformed, truncated and adversarial bytes.

Properties: nothing raises, nothing leaks a secret header, held state stays bounded, every span
built is released exactly once, and every exchange fed is accounted for after flush: it gave its
spans, or it is a counted drop (unparsed_exchanges, or duplicate_exchanges for a repeated identity).

Example counts: the ones below under the derandomized "ci" profile (`make test`, plain pytest),
the profile's own larger count under "fuzz" (`make fuzz`); tests/conftest.py has the profiles.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from correlator import http1
from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.records import EndReason, Exchange, ExchangeId, ParentHint, ParentKind, Role, Source
from correlator.spans import Span
from correlator.tracecontext import parse_traceparent
from tests.support.exchanges import REQ_HEAD, RESP_HEAD, request_bytes, response_bytes


def _fuzz(examples: int) -> settings:
    """Settings for one property: at least `examples`, more when the loaded profile asks for more
    (derandomize, database, deadline and print_blob always come from the profile)."""
    return settings(max_examples=max(examples, settings.default.max_examples),
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


FUZZ = _fuzz(300)

METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "BREW", "M-SEARCH", "G\x00T"]
TOKENS = [b"\r\n", b"\r\n\r\n", b" ", b":", b"HTTP/1.1", b"HTTP/1.", b"Content-Length: ",
          b"Transfer-Encoding: chunked", b"0\r\n\r\n", b"Host: ", b"traceparent: ", b"?", b"/", b"%", b"\x00",
          b"\xff", b"-1", b"99999999999999999999"]  # fmt: skip


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    names = st.sampled_from(
        ["Accept", "Content-Type", "X-Req", "Content-Length", "Transfer-Encoding", "Expect", "traceparent",
         "tracestate", "Connection", "X-" + "a" * 40]
    )  # fmt: skip
    values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    return draw(st.lists(st.tuples(names, values), max_size=8))


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """Valid bytes, then cut, spliced with HTTP-ish tokens, and bit-flipped."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 2:
            del data[pos : pos + draw(st.integers(1, 20))]
        else:
            data[pos:pos] = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(["/", "/a/b?c=d&token=x", "*", "http://u:p@h:1/x?y", "h:443", "/" + "p" * 600]))
    body = draw(st.binary(max_size=64))
    raw = request_bytes(method, target, headers=draw(header_lists()), body=body, chunked=draw(st.booleans()))
    if draw(st.booleans()):
        raw += request_bytes(draw(st.sampled_from(METHODS)), "/next")
    return draw(mutated(raw)) if draw(st.booleans()) else raw


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([100, 101, 200, 204, 206, 304, 404, 500, 999]))
    raw = response_bytes(
        status, headers=draw(header_lists()), body=draw(st.binary(max_size=300)), chunked=draw(st.booleans()),
        interim=draw(st.sampled_from([(), (100,), (100, 103)])),
    )  # fmt: skip
    return draw(mutated(raw)) if draw(st.booleans()) else raw


@FUZZ
@given(st.one_of(st.binary(max_size=600), requests()))
def test_parse_requests_never_raises(raw: bytes) -> None:
    head = raw[:REQ_HEAD]
    rs = http1.parse_requests(head)
    assert len(rs) <= 16
    for r in rs:
        assert r.method and r.target
        assert r.version in ("1.1", "1.0", "")
        assert r.content_length is None or 0 <= r.content_length < 10**18
        assert r.head_len == -1 or 0 < r.head_len <= len(head)


@FUZZ
@given(
    st.one_of(st.binary(max_size=400), responses()),
    st.lists(st.sampled_from([b"GET", b"HEAD", b"CONNECT"]), max_size=4),
)
def test_parse_responses_never_raise(raw: bytes, methods: list[bytes]) -> None:
    head = raw[:RESP_HEAD]
    r = http1.parse_final_response(head)
    if r is not None:
        assert 0 <= r.status <= 999
        assert http1.framing_complete(b"GET", r, len(raw), raw[-8:]) in (True, False, None)
    assert len(http1.parse_responses(head, methods)) <= len(methods)


@FUZZ
@given(st.binary(max_size=80))
def test_traceparent_never_raises(raw: bytes) -> None:
    tp = parse_traceparent(raw)
    assert tp is None or (len(tp[0]) == 16 and len(tp[1]) == 8 and any(tp[0]) and any(tp[1]))


SECRET = "S3CR3T-MARK"


@st.composite
def exchanges(draw: st.DrawFn, ids: list[tuple[int, int]]) -> Exchange:
    req = draw(requests())
    if draw(st.booleans()):
        # A secret header inserted right after the request line: it must never be exported.
        le = req.find(b"\r\n")
        if le > 0:
            name = draw(st.sampled_from([b"Authorization", b"Cookie", b"Proxy-Authorization", b"X-Api-Key"]))
            req = req[: le + 2] + name + b": Bearer " + SECRET.encode() + b"\r\n" + req[le + 2 :]
    resp = draw(st.one_of(st.just(b""), responses(), st.binary(max_size=64)))
    conn = draw(st.integers(0, 8))
    start = draw(st.integers(0, 10**10))
    key = (conn, start)
    parent = None
    if draw(st.booleans()):
        if ids and draw(st.booleans()):
            pc, ps = draw(st.sampled_from(ids))
        else:
            pc, ps = draw(st.integers(0, 8)), draw(st.integers(0, 10**10))
        parent = ParentHint(ParentKind(draw(st.integers(0, 4))), draw(st.integers(0, 2**32 - 1)), ExchangeId(pc, ps))
    ids.append(key)
    times = draw(st.lists(st.integers(0, 2**63 - 1), min_size=3, max_size=3))
    return Exchange(
        pid=draw(st.integers(0, 2**32 - 1)), tid=1, role=draw(st.sampled_from(list(Role))),
        end=draw(st.sampled_from(list(EndReason))), source=Source.SOCKET, tls=draw(st.booleans()), conn_id=conn,
        family=draw(st.sampled_from([0, 2, 10])),
        local_addr=draw(st.sampled_from(["", "127.0.0.1", "::1", "::ffff:1.2.3.4"])),
        local_port=draw(st.integers(0, 65535)), remote_addr="127.0.0.1", remote_port=draw(st.integers(0, 65535)),
        req_start_ns=start, req_end_ns=times[0], resp_start_ns=draw(st.sampled_from([0, times[1]])),
        resp_end_ns=times[2], req_bytes=len(req), resp_bytes=draw(st.integers(0, 10**9)),
        status=draw(st.integers(0, 65535)), parent=parent, req_head=req[:REQ_HEAD], resp_head=resp[:RESP_HEAD],
        resp_tail=resp[-8:], req_head_truncated=len(req) > REQ_HEAD, resp_head_truncated=len(resp) > RESP_HEAD,
        interim_response=draw(st.booleans()),
    )  # fmt: skip


def _check_span(s: Span) -> None:
    assert len(s.trace_id) == 16 and any(s.trace_id)
    assert len(s.span_id) == 8 and any(s.span_id)
    assert s.parent_span_id is None or len(s.parent_span_id) == 8
    assert s.end_ns >= s.start_ns
    for k, v in s.attributes.items():
        assert isinstance(v, str | int | float | bool), k
        if isinstance(v, str):
            v.encode("utf-8")  # OTLP strings must be valid UTF-8
            assert SECRET not in v, (k, v)
    assert SECRET not in s.name and SECRET not in s.trace_state


@st.composite
def repeats(draw: st.DrawFn, fed: list[Exchange], ids: list[tuple[int, int]]) -> Exchange:
    """A record with the identity of one already fed: the same record again (a recording replayed
    twice), the timeout sweep's record for it, or another record under the same identity."""
    prev = draw(st.sampled_from(fed))
    how = draw(st.integers(0, 2))
    if how == 0:
        return prev
    if how == 1:
        return dataclasses.replace(prev, end=EndReason.TIMEOUT, resp_start_ns=0, resp_end_ns=0, resp_bytes=0,
                                   resp_head=b"", resp_tail=b"", status=0)  # fmt: skip
    return dataclasses.replace(draw(exchanges(ids)), conn_id=prev.conn_id, req_start_ns=prev.req_start_ns)


@_fuzz(150)
@given(st.data(), st.sampled_from(["keep", "redact", "drop"]), st.integers(1, 6))
def test_correlator_feed_fuzz(data: st.DataObject, query: str, max_held: int) -> None:
    c = Correlator(WallClock(10**18), CorrelatorConfig(query=query, max_held_spans=max_held, max_hold_s=1.0,
                                                        routes=["/a/{x}", "/p/*"]))  # fmt: skip
    ids: list[tuple[int, int]] = []
    fed: list[Exchange] = []
    seen: set[tuple[int, int]] = set()
    repeated = 0  # records fed whose identity an earlier record had
    advanced = False
    emitted: list[Span] = []
    for _ in range(data.draw(st.integers(1, 25))):
        if fed and data.draw(st.integers(0, 3)) == 0:
            ex = data.draw(repeats(fed, ids))
        else:
            ex = data.draw(exchanges(ids))
        fed.append(ex)
        key = (ex.conn_id, ex.req_start_ns)
        repeated += key in seen
        seen.add(key)
        emitted += c.feed(ex)
        assert c.stats.held <= max_held
        if data.draw(st.booleans()):
            advanced = True
            emitted += c.advance(data.draw(st.integers(0, 2**63 - 1)))
    emitted += c.flush()
    st_ = c.stats
    assert st_.internal_errors == 0, c.last_error
    assert st_.held == 0 and st_.peer_waiting == 0
    assert st_.exchanges == len(fed)
    # Every record fed is accounted for: its spans (one per request it holds), or a counted drop.
    parsed = st_.exchanges - st_.unparsed_exchanges - st_.duplicate_exchanges
    assert parsed >= 0
    assert st_.spans == len(emitted) == parsed + st_.pipelined_splits
    assert len({id(s) for s in emitted}) == len(emitted)  # each span released once
    # A duplicate counter fires only for a repeated identity, and for every one while nothing was
    # forgotten (identities are remembered for max_hold of stream time, which only advance() moves).
    dups = st_.duplicate_exchanges + st_.duplicate_ids
    assert dups <= repeated
    if not advanced:
        assert dups == repeated
    for s in emitted:
        _check_span(s)
