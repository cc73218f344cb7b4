"""HTTP/1.x heads as the kernel captured them: bounded, maybe truncated, maybe several pipelined.

The kernel keeps the first 512 bytes of what the client wrote (request line, headers, perhaps a
body start or the next pipelined request), the first 256 bytes of the response and its last 8
bytes. Parsing here is best effort and never raises: a head that is not HTTP/1.x yields None.
Only the headers needed for framing, linking and the semantic conventions are extracted; every
other header value (Authorization, Cookie, ...) is never read into a Python object at all.

Header lookup lowers the header block once and finds "\\r\\n<name>:" in it, which is cheaper in
CPython than splitting and lowering every header line, and needs no per-header regex.
"""

from __future__ import annotations

import re

# has_no_body(method, status), RFC 9112 6.3: responses that end at their head whatever their
# headers say. In C: span assembly asks it for every response.
from correlator._spans import has_no_body

# RFC 9110 tchar: the bytes a method token may contain.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# A request target never holds control bytes or spaces (RFC 9112 3.2).
_CTL_OR_SPACE = re.compile(rb"[\x00-\x20\x7f]")
_KNOWN_METHODS_B = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"))
_MAX_METHOD = 32
_CHUNKED_END = b"0\r\n\r\n"


class RequestHead:
    __slots__ = (
        "method", "target", "version", "host", "user_agent", "traceparent", "tracestate",
        "content_length", "chunked", "expect_continue", "head_len", "complete", "start",
    )  # fmt: skip

    def __init__(self) -> None:
        self.method: bytes = b""
        self.target: bytes = b""
        self.version: str = ""  # "1.1", "1.0", or "" when the request line was cut before it
        self.host: bytes | None = None
        self.user_agent: bytes | None = None
        self.traceparent: bytes | None = None
        self.tracestate: bytes | None = None
        self.content_length: int | None = None
        self.chunked: bool = False
        self.expect_continue: bool = False
        self.head_len: int = -1  # bytes up to and including the blank line; -1 if not seen
        self.complete: bool = False  # the blank line ending the head was seen
        self.start: int = 0  # offset of this request in the captured bytes


class ResponseHead:
    __slots__ = ("status", "version", "content_length", "chunked", "head_end", "complete", "interim")

    def __init__(self) -> None:
        self.status: int = 0
        self.version: str = ""
        self.content_length: int | None = None
        self.chunked: bool = False
        self.head_end: int = -1  # offset just past the blank line in the captured bytes; -1 if cut
        self.complete: bool = False
        self.interim: int = 0  # 1xx interim responses skipped before this one


def _value(block: bytes, lower: bytes, i: int) -> bytes:
    """The header value starting at offset i of a head block (its line runs to the next CRLF)."""
    j = lower.find(b"\r\n", i)
    return block[i:j].strip() if j >= 0 else block[i:].strip()


def parse_content_length(value: bytes) -> int | None:
    if value.isdigit():
        return int(value) if len(value) <= 18 else None
    # RFC 9110 8.6: a list of identical values is the same length; anything else is invalid.
    parts = {p.strip() for p in value.split(b",")}
    if len(parts) == 1:
        (p,) = parts
        if p.isdigit() and len(p) <= 18:
            return int(p)
    return None


def _is_chunked(value: bytes) -> bool:
    # Only the final transfer coding decides the framing (RFC 9112 6.3).
    return value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def parse_request(buf: bytes, start: int = 0) -> RequestHead | None:
    """Parse one request head at `start`; None if the bytes there are not an HTTP/1.x request."""
    n = len(buf)
    # RFC 9112 2.2: a server SHOULD ignore empty lines received before the request line.
    while buf.startswith(b"\r\n", start):
        start += 2
    if start >= n:
        return None
    le = buf.find(b"\r\n", start)
    line = buf[start:le] if le >= 0 else buf[start:]
    sp1 = line.find(b" ")
    if sp1 <= 0 or sp1 > _MAX_METHOD:
        return None
    method = line[:sp1]
    if method not in _KNOWN_METHODS_B and method.translate(None, _TCHAR):
        return None
    sp2 = line.find(b" ", sp1 + 1)
    if sp2 >= 0:
        target = line[sp1 + 1 : sp2]
        vb = line[sp2 + 1 :]
        if vb == b"HTTP/1.1":
            version = "1.1"
        elif vb == b"HTTP/1.0":
            version = "1.0"
        elif le < 0 and b"HTTP/1."[: len(vb)] == vb:
            version = ""  # the capture ended inside the version
        else:
            return None  # HTTP/0.9, HTTP/2 preface, junk
    elif le < 0:
        target = line[sp1 + 1 :]  # the capture ended inside the target
        version = ""
    else:
        return None
    if not target or _CTL_OR_SPACE.search(target) is not None:
        return None
    c = target[0]
    if c != 0x2F and target != b"*" and b"://" not in target[:16] and method != b"CONNECT":  # "/"
        return None
    r = RequestHead()
    r.method = method
    r.target = target
    r.version = version
    r.start = start
    if le < 0:
        return r
    he = buf.find(b"\r\n\r\n", le)
    if he >= 0:
        block = buf[le:he]
        r.head_len = he + 4 - start
        r.complete = True
    else:
        # Cut inside the headers: keep only whole lines, a cut value (Content-Length "12" of
        # "1234") would be wrong rather than missing.
        last = buf.rfind(b"\r\n")
        block = buf[le:last]
    if not block:
        return r
    lower = block.lower()
    # Inline lookups: this runs once per request, and a call per header costs more than the find.
    # (find, not `in`: bytes.__contains__ first tries its argument as an int, which costs more.)
    i = lower.find(b"\r\nhost:")
    if i >= 0:
        j = lower.find(b"\r\n", i + 7)
        r.host = (block[i + 7 : j] if j >= 0 else block[i + 7 :]).strip()
    i = lower.find(b"\r\nuser-agent:")
    if i >= 0:
        j = lower.find(b"\r\n", i + 13)
        r.user_agent = (block[i + 13 : j] if j >= 0 else block[i + 13 :]).strip()
    i = lower.find(b"\r\ntrace")
    if i >= 0:
        i = lower.find(b"\r\ntraceparent:", i)
        if i >= 0:
            r.traceparent = _value(block, lower, i + 14)
            i = lower.find(b"\r\ntracestate:")
            if i >= 0:
                r.tracestate = _value(block, lower, i + 13)
    i = lower.find(b"\r\ntransfer-encoding:")
    if i >= 0:
        r.chunked = _is_chunked(_value(block, lower, i + 20))
    else:
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            r.content_length = parse_content_length(_value(block, lower, i + 17))
    i = lower.find(b"\r\nexpect:")
    if i >= 0:
        r.expect_continue = _value(block, lower, i + 9).lower() == b"100-continue"
    return r


def _request_body_end(buf: bytes, r: RequestHead) -> int:
    """Offset just past r's body in buf, or -1 if it cannot be known from the captured bytes."""
    if not r.complete:
        return -1
    pos = r.start + r.head_len
    if r.chunked:
        if buf.startswith(_CHUNKED_END, pos):
            return pos + 5
        e = buf.find(b"\r\n" + _CHUNKED_END, pos)
        return e + 7 if e >= 0 else -1
    if r.content_length:
        pos += r.content_length
    return pos


def parse_requests(buf: bytes, limit: int = 16) -> list[RequestHead]:
    """The request at the start of buf and any whole or partial requests pipelined after it.

    Empty when the first request is not HTTP/1.x. A later request is taken only when the bytes
    just past the previous request's body parse as a request line, so a body never becomes one."""
    first = parse_request(buf, 0)
    if first is None:
        nl = buf.find(b"\n")
        if nl <= 0 or buf[nl - 1] == 0x0D:
            return []
        # Bare LF line ends (hand-written clients; most servers accept them, RFC 9112 2.2):
        # normalise to CRLF. Offsets then differ from the wire by a byte per line, which only
        # affects derived body sizes.
        buf = buf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        first = parse_request(buf, 0)
        if first is None:
            return []
    out = [first]
    r = first
    n = len(buf)
    while len(out) < limit:
        pos = _request_body_end(buf, r)
        if pos < 0 or pos >= n:
            break
        nxt = parse_request(buf, pos)
        if nxt is None:
            break
        out.append(nxt)
        r = nxt
    return out


def parse_response(buf: bytes, start: int = 0) -> ResponseHead | None:
    """One response head (interim or final) at `start`; None if not an HTTP/1.x status line."""
    if not buf.startswith(b"HTTP/1.", start) or len(buf) < start + 12:
        return None
    v = buf[start + 7]
    if buf[start + 8] != 0x20 or (v != 0x31 and v != 0x30):  # "1" / "0"
        return None
    digits = buf[start + 9 : start + 12]
    if not digits.isdigit():
        return None
    if len(buf) > start + 12 and buf[start + 12] not in b" \r":
        return None
    r = ResponseHead()
    r.status = int(digits)
    r.version = "1.1" if v == 0x31 else "1.0"
    le = buf.find(b"\r\n", start)
    if le < 0:
        return r
    he = buf.find(b"\r\n\r\n", le)
    if he >= 0:
        block = buf[le:he]
        r.head_end = he + 4
        r.complete = True
    else:
        block = buf[le : buf.rfind(b"\r\n")]
    if not block:
        return r
    lower = block.lower()
    i = lower.find(b"\r\ntransfer-encoding:")
    if i >= 0:
        r.chunked = _is_chunked(_value(block, lower, i + 20))
    else:
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            r.content_length = parse_content_length(_value(block, lower, i + 17))
    return r


def parse_final_response(buf: bytes, start: int = 0) -> ResponseHead | None:
    """The final response at `start`, skipping 1xx interim responses (100 Continue, 103 Early
    Hints); 101 Switching Protocols is final. None if no final status line was captured."""
    interim = 0
    while True:
        r = parse_response(buf, start)
        if r is None:
            return None
        if r.status >= 200 or r.status == 101 or r.status < 100:
            r.interim = interim
            return r
        if r.head_end < 0:
            return None
        interim += 1
        start = r.head_end


def _response_end(buf: bytes, method: bytes, r: ResponseHead) -> int:
    if r.head_end < 0:
        return -1
    if has_no_body(method, r.status):
        return r.head_end
    if r.chunked:
        if buf.startswith(_CHUNKED_END, r.head_end):
            return r.head_end + 5
        e = buf.find(b"\r\n" + _CHUNKED_END, r.head_end)
        return e + 7 if e >= 0 else -1
    if r.content_length is not None:
        return r.head_end + r.content_length
    return -1  # delimited by close: nothing can follow


def parse_responses(buf: bytes, methods: list[bytes]) -> list[ResponseHead]:
    """Final responses in order, one per request method given, as far as the bytes allow."""
    out: list[ResponseHead] = []
    pos = 0
    n = len(buf)
    for m in methods:
        if pos >= n:
            break
        r = parse_final_response(buf, pos)
        if r is None:
            break
        out.append(r)
        pos = _response_end(buf, m, r)
        if pos < 0:
            break
    return out


def framing_complete(method: bytes, r: ResponseHead, resp_bytes: int, resp_tail: bytes) -> bool | None:
    """Whether the whole response arrived: True, False, or None when its framing is unknown from
    what was captured (delimited by close, or the head was cut before its framing headers)."""
    if has_no_body(method, r.status):
        return True
    if r.chunked:
        return resp_tail.endswith(_CHUNKED_END)
    if r.content_length is not None and r.head_end >= 0:
        return resp_bytes - r.head_end >= r.content_length
    return None
