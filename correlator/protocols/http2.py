"""HTTP/2 (RFC 9113) and gRPC on top of it: one connection's frames (h2c with prior knowledge, h2c
after an HTTP/1.1 `Upgrade: h2c`, or TLS plaintext, which arrives the same way) become one
Operation per stream: request HEADERS, response HEADERS, trailers or END_STREAM. RST_STREAM and
GOAWAY fail a stream; a connection that closes fails what is still open.

Semantic conventions: OpenTelemetry semconv 1.27 (HTTP stable: http.request.method, url.*,
http.response.status_code, network.protocol.version; RPC: rpc.system, rpc.service, rpc.method,
rpc.grpc.status_code). A stream is gRPC when its content-type is application/grpc (or
application/grpc+proto, ...): named "{service}/{method}", an error when grpc-status is not 0. Any
other stream is HTTP, named by its method alone: http.route is the correlator's (its route table
and per-service cap), not a decoder's.

What never leaves: header values other than :method, :scheme, :authority (client spans' url.full),
:path (url.path, url.query with credential values redacted), :status, user-agent, content-type
(only tested, never exported) and grpc-status. grpc-message is user text: never exported. Bodies
are never read.

Truncated copies (the kernel keeps the first 512 bytes of each transfer): a frame's length steps
over the gap when the gap ends inside that frame's payload. A gap that swallows a frame header
loses the frame boundaries of that direction; they are found again only at a later transfer's
start where a chain of strictly valid frame headers ends exactly at the transfer's end, else the
bytes are counted and the decoder waits. A connection picked up mid-stream (no preface) is handled
the same way. A header block cut short, or frames lost while out of sync, leave that direction's
HPACK table unknown (hpack.Decoder(complete=False)): from then on only static, literal and newly
inserted fields decode, and every field that referred to an unknown entry is counted.

A stream's req_pos is the stream position of its first HEADERS frame's header (for stream 1 after
`Upgrade: h2c`, of the upgrade request), taken from the segment that byte came in. After a pick-up
or a loss only a block carrying :method is known to open its stream; a pushed stream has none.

Counters: frames, header_blocks; gap_bytes_stepped (cut payload bytes stepped over by a frame's
length); sync_lost, bytes_unsynced, resyncs, midstream_pickups; header_blocks_truncated,
hpack_table_lost, hpack_errors, header_fields_unknown; requests_undecoded, responses_undecoded,
responses_without_request (once per stream), headers_unknown_role, frames_no_stream;
grpc_status_unknown; streams_end_unknown (emitted at close or eviction without a failure: their
end was in lost bytes), streams_evicted (more than MAX_STREAMS open); frames_invalid,
frames_oversize, frames_unknown_type, continuation_missing, continuation_unexpected, bad_preface;
not_http2, bytes_not_http2 (an HTTP/1.1 connection without an accepted h2c upgrade);
decoder_errors (a bug caught: both directions resynchronise).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from correlator import semconv
from correlator.protocols import hpack
from correlator.segments import Operation, Segment, stream_pos
from correlator.spans import AttrValue

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_FRAME_SIZE = 0x5
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = (1 << 24) - 1

ERROR_CODES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
               "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
               "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")  # fmt: skip
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")  # fmt: skip

# Flags each frame type may carry, for the strict check that verifies a resynchronisation.
_FLAGS = {DATA: 0x09, HEADERS: 0x2D, PRIORITY: 0, RST_STREAM: 0, SETTINGS: 0x01, PUSH_PROMISE: 0x0C, PING: 0x01,
          GOAWAY: 0, WINDOW_UPDATE: 0, CONTINUATION: 0x04}  # fmt: skip
# The only header values a stream keeps; every other value is dropped as it is decoded.
_KEEP = frozenset((b":method", b":scheme", b":authority", b":path", b":status", b"content-type", b"grpc-status",
                   b"user-agent"))  # fmt: skip
_PARTIAL = b"\x00partial"  # marks a kept header dict whose block had fields that could not be decoded
MAX_STREAMS = 512  # open streams tracked per connection (bounded memory); more are counted
MAX_HEADER_BLOCK = 65536  # a header block kept beyond this is treated as cut
_MAX_HTTP1_HEAD = 16384
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} \S+ HTTP/1\.1\r\n")

# Side modes
_START, _PREFACE, _H1_REQUEST, _H1_RESPONSE, _SKIP, _FRAMES, _LOST, _DEAD = range(8)


def _error_name(code: int) -> str:
    return ERROR_CODES[code] if code < len(ERROR_CODES) else f"0x{code:x}"


def frame_ok(ftype: int, flags: int, sid: int, length: int, max_frame: int) -> bool:
    """A frame header every conforming peer could send (only the types RFC 9113 defines)."""
    if ftype > CONTINUATION or length > max_frame or flags & ~_FLAGS[ftype] or sid & 0x80000000:
        return False
    if ftype in (SETTINGS, PING, GOAWAY):
        if sid:
            return False
    elif ftype != WINDOW_UPDATE and not sid:
        return False
    if ftype == PRIORITY:
        return length == 5
    if ftype in (RST_STREAM, WINDOW_UPDATE):
        return length == 4
    if ftype == SETTINGS:
        return length % 6 == 0 and not (flags & ACK and length)
    if ftype == PING:
        return length == 8
    if ftype == GOAWAY:
        return length >= 8
    if ftype == PUSH_PROMISE:
        return length >= 4
    return True


def verified_boundary(data: bytes, length: int, max_frame: int) -> int | None:
    """The first offset of a transfer (data = its first bytes, `length` its size) from which a chain
    of valid frame headers ends exactly at the transfer's end; None if there is none."""
    for p in range(len(data)):
        pos = p
        while pos < length:
            if pos + 9 > len(data):
                break
            n = int.from_bytes(data[pos : pos + 3], "big")
            sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
            if not frame_ok(data[pos + 3], data[pos + 4], sid, n, max_frame):
                break
            pos += 9 + n
        if pos == length:
            return p
    return None


@dataclass(slots=True)
class _Block:
    sid: int
    end_stream: bool
    promised: int  # PUSH_PROMISE's promised stream, 0 for HEADERS
    fragment: bytearray
    cut: bool
    pos: int | None  # the stream position of its HEADERS (or PUSH_PROMISE) frame's header


@dataclass(slots=True)
class _Side:
    """One direction's bytes: framing state and the HPACK decoder of the blocks this side sends."""

    egress: bool
    mode: int = _START
    hdr: bytearray = field(default_factory=bytearray)
    ftype: int = -1  # the frame being read (-1: reading a header)
    flags: int = 0
    sid: int = 0
    remaining: int = 0
    payload: bytearray = field(default_factory=bytearray)
    keep: int = 0  # payload bytes worth keeping of the current frame
    cut: bool = False
    head: bytearray = field(default_factory=bytearray)  # HTTP/1.1 upgrade head
    preface_at: int = 0
    skip: int = 0
    max_frame: int = DEFAULT_MAX_FRAME  # what this side may send: the peer's SETTINGS_MAX_FRAME_SIZE
    hpack: hpack.Decoder = field(default_factory=hpack.Decoder)
    block: _Block | None = None
    hdr_pos: int = 0  # the stream position of the first byte of the frame header in `hdr`
    frame_pos: int = 0  # the same for the frame being read
    head_pos: int = 0  # the same for the first byte of the HTTP/1.1 head in `head`
    # Every frame this side sent since its preface (or upgrade request) was framed: a HEADERS on a
    # new client stream is then that stream's first. After a pick-up or a loss it may be the
    # trailers of a stream opened in the lost bytes, so only a block with :method (which trailers
    # never carry) is known to open its stream.
    whole: bool = False


@dataclass(slots=True)
class _Stream:
    sid: int
    start_ns: int
    end_ns: int
    pid: int
    tid: int
    req: dict[bytes, bytes] | None  # None: the request's headers could not be decoded
    req_ended: bool = False
    resp_seen: bool = False
    resp: dict[bytes, bytes] | None = None
    trailers: dict[bytes, bytes] | None = None
    trailers_seen: bool = False
    blind: bool = False  # its response's direction lost sync while it was open: its end may be lost
    req_pos: int | None = None  # the request's first byte (Operation.req_pos)


def _keep(fields: list[hpack.Field]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for f in fields:
        if f.name in _KEEP and f.name not in out:
            out[f.name] = f.value
    return out


def _is_grpc(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    ct = content_type.lower()
    return ct == b"application/grpc" or ct.startswith((b"application/grpc+", b"application/grpc;"))


def _int(value: bytes | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 6:
        return None
    return int(value)


class Http2Decoder:
    """A StreamDecoder for one HTTP/2 connection (either end)."""

    protocol = "http2"

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self._sides = {True: _Side(egress=True), False: _Side(egress=False)}
        self._client_egress: bool | None = None  # the traced process's writes carry the requests
        self._streams: dict[int, _Stream] = {}
        self._max_client_sid = 0
        self._orphans: set[int] = set()  # streams with a response but no known request, counted once
        self._out: list[Operation] = []
        self._seg: Segment | None = None

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- input ------------------------------------------------------------------------------

    def feed(self, seg: Segment) -> list[Operation]:
        self._out = []
        try:
            self._feed(seg)
        except Exception:  # a decoder bug must not take the agent down: count, lose sync
            self._count("decoder_errors")
            for side in self._sides.values():
                if side.mode != _DEAD:
                    self._lose(side, count=False)
        out, self._out = self._out, []
        return out

    def close(self, now_ns: int) -> list[Operation]:
        self._out = []
        try:
            for side in self._sides.values():
                if side.block is not None:
                    self._count("header_blocks_truncated")
                    side.block = None
            for sid in sorted(self._streams):
                st = self._streams.pop(sid)
                if st.blind:
                    # Its end may have been in bytes that could not be decoded: what is known
                    # (the status) stands, no failure is claimed.
                    self._count("streams_end_unknown")
                    self._complete(st)
                else:
                    self._fail(st, semconv.ERR_INCOMPLETE if st.resp_seen else semconv.ERR_CLOSED,
                               "connection closed before the stream ended")  # fmt: skip
        except Exception:
            self._count("decoder_errors")
            self._streams.clear()
        out, self._out = self._out, []
        return out

    def _feed(self, seg: Segment) -> None:
        if not seg.length:
            return
        self._seg = seg
        side = self._sides[seg.egress]
        data = seg.data
        base = 0  # the offset in seg.data of data[0]
        gap = max(0, seg.length - len(data))
        if side.mode == _START:
            self._start(seg)
        if side.mode == _DEAD:
            self._count("bytes_not_http2", seg.length)
            return
        if side.mode == _LOST:
            p = verified_boundary(data, seg.length, side.max_frame)
            if p is None:
                self._count("bytes_unsynced", seg.length)
                return
            self._count("resyncs")
            if p:
                self._count("bytes_unsynced", p)
            side.mode = _FRAMES
            data = data[p:]
            base = p
        self._consume(side, data, base)
        if gap:
            self._gap(side, gap)

    def _start(self, seg: Segment) -> None:
        """A direction's first bytes: the client's preface, an HTTP/1.1 upgrade, the server's
        SETTINGS (a server may write it before it reads the client's preface), or mid-stream."""
        data = seg.data
        mine = self._sides[seg.egress]
        peer = self._sides[not seg.egress]
        preface = data.startswith(PREFACE[: min(len(data), 16)])  # "PRI * HTTP/2.0\r\n"; the rest is checked
        if peer.mode != _START:
            # The peer opened with SETTINGS: a server's preface if this side's first bytes are the
            # client's. Its table then started empty, so what it inserted since is all of it.
            if preface:
                self._client_egress = seg.egress
                mine.mode = _PREFACE
                mine.whole = True
                peer.hpack.complete = True
                if peer.max_frame == MAX_FRAME_LIMIT:  # this side's SETTINGS, if any, come next
                    peer.max_frame = DEFAULT_MAX_FRAME
            else:
                self._count("midstream_pickups")
                self._midstream(mine)
            return
        if preface:
            self._client_egress = seg.egress
            mine.mode = _PREFACE
            mine.whole = True
            peer.mode = _FRAMES
        elif _REQUEST_LINE.match(data):
            self._client_egress = seg.egress
            mine.mode = _H1_REQUEST
            mine.whole = True
            peer.mode = _H1_RESPONSE
        elif (len(data) >= 9 and data[3] == SETTINGS and not data[4] & ACK
              and frame_ok(SETTINGS, data[4], int.from_bytes(data[5:9], "big"),
                           int.from_bytes(data[:3], "big"), DEFAULT_MAX_FRAME)):  # fmt: skip
            # Framing is known from here; the table is decoded as if its history were unknown
            # until the peer's first bytes tell whether this is the connection's start.
            mine.mode = _FRAMES
            mine.hpack = hpack.Decoder(complete=False)
            mine.max_frame = MAX_FRAME_LIMIT
        else:
            # Picked up mid-stream: neither framing nor either table's history is known.
            self._count("midstream_pickups")
            self._midstream(mine)
            self._midstream(peer)

    @staticmethod
    def _midstream(side: _Side) -> None:
        side.mode = _LOST
        side.whole = False
        side.max_frame = MAX_FRAME_LIMIT
        side.hpack = hpack.Decoder(complete=False)

    def _lose(self, side: _Side, count: bool = True) -> None:
        if count:
            self._count("sync_lost")
        side.mode = _LOST
        side.ftype = -1
        side.hdr.clear()
        side.payload = bytearray()
        if side.block is not None:
            try:
                # Its stream and END_STREAM flag are known, and its HEADERS was framed in sync.
                self._finish_block(side, cut=True)
            except Exception:
                self._count("decoder_errors")
                side.block = None
        side.whole = False
        self._lose_table(side)
        if side.egress != self._client_egress:
            for st in self._streams.values():
                st.blind = True

    def _lose_table(self, side: _Side) -> None:
        if side.hpack.complete or len(side.hpack):
            self._count("hpack_table_lost")
        side.hpack.lose()
        side.hpack.max_allowed = None  # a SETTINGS frame may have been missed too

    def _gap(self, side: _Side, n: int) -> None:
        if side.mode == _FRAMES and side.ftype >= 0 and n <= side.remaining:
            side.cut = True
            side.remaining -= n
            self._count("gap_bytes_stepped", n)
            if not side.remaining:
                self._end_frame(side)
            return
        if side.mode == _SKIP and n <= side.skip:
            side.skip -= n
            if not side.skip:
                side.mode = _PREFACE
            return
        if side.mode in (_LOST, _DEAD):
            self._count("bytes_unsynced" if side.mode == _LOST else "bytes_not_http2", n)
            return
        if side.mode == _FRAMES and side.ftype >= 0:
            # The frame ends inside the gap: it is complete (cut); what follows is not known.
            n -= side.remaining
            self._count("gap_bytes_stepped", side.remaining)
            side.remaining = 0
            side.cut = True
            self._end_frame(side)
        self._count("bytes_unsynced", n)
        self._lose(side)

    def _consume(self, side: _Side, data: bytes, base: int) -> None:
        """data: the segment's bytes from offset `base` on."""
        seg = self._seg
        assert seg is not None
        i = 0
        n = len(data)
        while i < n:
            mode = side.mode
            if mode == _FRAMES:
                if side.ftype < 0:
                    if not side.hdr:
                        side.hdr_pos = stream_pos(seg, base + i)
                    need = 9 - len(side.hdr)
                    side.hdr += data[i : i + need]
                    i += min(need, n - i)
                    if len(side.hdr) < 9:
                        return
                    self._begin_frame(side)
                    if side.mode != _FRAMES:
                        self._count("bytes_unsynced", n - i)
                        return
                    if side.ftype >= 0 and not side.remaining:
                        self._end_frame(side)
                    continue
                take = min(side.remaining, n - i)
                room = side.keep - len(side.payload)
                if room > 0:
                    side.payload += data[i : i + min(take, room)]
                i += take
                side.remaining -= take
                if not side.remaining:
                    self._end_frame(side)
            elif mode == _PREFACE:
                take = min(len(PREFACE) - side.preface_at, n - i)
                if data[i : i + take] != PREFACE[side.preface_at : side.preface_at + take]:
                    self._count("bad_preface")
                    self._count("bytes_unsynced", n - i)
                    self._lose(side, count=False)
                    return
                side.preface_at += take
                i += take
                if side.preface_at == len(PREFACE):
                    side.mode = _FRAMES
            elif mode in (_H1_REQUEST, _H1_RESPONSE):
                if not side.head:
                    side.head_pos = stream_pos(seg, base + i)
                i = self._http1(side, data, i)
            elif mode == _SKIP:
                take = min(side.skip, n - i)
                side.skip -= take
                i += take
                if not side.skip:
                    side.mode = _PREFACE
            else:
                self._count("bytes_unsynced" if mode == _LOST else "bytes_not_http2", n - i)
                return

    # -- the HTTP/1.1 upgrade (RFC 7540 3.2) -------------------------------------------------

    def _http1(self, side: _Side, data: bytes, i: int) -> int:
        start = max(0, len(side.head) - 3)
        side.head += data[i:]
        end = side.head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(side.head) > _MAX_HTTP1_HEAD:
                self._not_http2()
            return len(data)
        used = end + 4 - (len(side.head) - (len(data) - i))
        head = bytes(side.head[: end + 4])
        side.head = bytearray()
        lines = head.split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        if side.mode == _H1_REQUEST:
            tokens = [t.strip().lower() for t in headers.get(b"upgrade", b"").split(b",")]
            parts = lines[0].split(b" ")
            if b"h2c" not in tokens or len(parts) != 3:
                self._not_http2()
                return len(data)
            req = {b":method": parts[0], b":path": parts[1], b":scheme": b"http"}
            if b"host" in headers:
                req[b":authority"] = headers[b"host"]
            for name in (b"user-agent", b"content-type"):
                if name in headers:
                    req[name] = headers[name]
            seg = self._seg
            assert seg is not None
            # The upgrade request is stream 1's request (RFC 9113 3.2): its first byte names it.
            self._streams[1] = _Stream(1, seg.start_ns, seg.end_ns, seg.pid, seg.tid, req, req_ended=True,
                                       req_pos=side.head_pos)
            self._max_client_sid = 1
            self._upgrade_settings(side, headers.get(b"http2-settings", b""))
            clen = _int(headers.get(b"content-length"))
            side.skip = clen or 0
            side.mode = _SKIP if side.skip else _PREFACE
        else:
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or parts[1] != b"101":
                self._not_http2()
                return len(data)
            side.mode = _FRAMES
        return i + used

    def _upgrade_settings(self, side: _Side, value: bytes) -> None:
        # The upgrade's HTTP2-Settings is the client's first SETTINGS (RFC 7540 3.2.1): it bounds
        # the server's header table and frame size from the first response on.
        try:
            payload = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            self._count("frames_invalid")
            return
        self._settings(side, 0, payload, False)

    def _not_http2(self) -> None:
        self._count("not_http2")
        self._streams.clear()
        for side in self._sides.values():
            side.mode = _DEAD

    # -- frames -------------------------------------------------------------------------------

    def _begin_frame(self, side: _Side) -> None:
        h = side.hdr
        length = int.from_bytes(h[0:3], "big")
        ftype, flags = h[3], h[4]
        sid = int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
        side.hdr = bytearray()
        side.frame_pos = side.hdr_pos
        if length > side.max_frame:
            self._count("frames_oversize")
            self._lose(side)
            return
        side.ftype, side.flags, side.sid, side.remaining = ftype, flags, sid, length
        side.payload = bytearray()
        side.cut = False
        if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE):
            side.keep = min(length, MAX_HEADER_BLOCK)
        elif ftype == DATA:
            side.keep = 0  # bodies are never read
        elif ftype == SETTINGS:
            side.keep = min(length, 600)
        else:
            side.keep = min(length, 64)  # GOAWAY's debug data beyond its codes is not needed

    def _end_frame(self, side: _Side) -> None:
        ftype, flags, sid = side.ftype, side.flags, side.sid
        payload = bytes(side.payload)
        cut = side.cut or len(payload) < side.keep
        side.ftype = -1
        side.payload = bytearray()
        side.cut = False
        self._count("frames")
        if side.block is not None and ftype != CONTINUATION:
            self._count("continuation_missing")
            self._finish_block(side, cut=True)
        if ftype == DATA:
            self._data(side, sid, flags)
        elif ftype in (HEADERS, PUSH_PROMISE):
            self._headers_frame(side, ftype, flags, sid, payload, cut)
        elif ftype == CONTINUATION:
            blk = side.block
            if blk is None or blk.sid != sid:
                self._count("continuation_unexpected")
                if blk is not None:
                    self._finish_block(side, cut=True)
                return
            blk.fragment += payload
            blk.cut = blk.cut or cut or len(blk.fragment) > MAX_HEADER_BLOCK
            if flags & END_HEADERS:
                self._finish_block(side)
        elif ftype == RST_STREAM:
            if len(payload) < 4 or not sid:
                self._count("frames_invalid")
                return
            st = self._streams.pop(sid, None)
            if st is not None:
                code = _error_name(int.from_bytes(payload[:4], "big"))
                who = "client" if side.egress == self._client_egress else "server"
                self._fail(st, code, f"RST_STREAM {code} from the {who}")
        elif ftype == SETTINGS:
            self._settings(side, flags, payload, cut)
        elif ftype == GOAWAY:
            if len(payload) < 8:
                self._count("frames_invalid")
                return
            self._goaway(side, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big"))
        elif ftype in (PRIORITY, PING, WINDOW_UPDATE):
            return
        else:
            self._count("frames_unknown_type")  # RFC 9113 5.5: ignored

    def _settings(self, side: _Side, flags: int, payload: bytes, cut: bool) -> None:
        if flags & ACK:
            return
        if cut or len(payload) % 6:
            self._count("frames_invalid")
        peer = self._sides[not side.egress]
        for off in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[off : off + 2], "big")
            value = int.from_bytes(payload[off + 2 : off + 6], "big")
            # This side's limits bound what the peer sends: its blocks' table, its frames' size.
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                peer.hpack.allow(value)
            elif ident == SETTINGS_MAX_FRAME_SIZE and DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                peer.max_frame = max(peer.max_frame, value) if peer.max_frame != MAX_FRAME_LIMIT else value

    def _goaway(self, side: _Side, last: int, code: int) -> None:
        # Streams the GOAWAY's receiver opened above `last` were never processed (retry-safe);
        # with an error code the connection is going down and nothing open will end.
        receiver_is_client = side.egress != self._client_egress
        for sid in sorted(self._streams):
            opened_by_receiver = (sid % 2 == 1) == receiver_is_client
            if code:
                name = _error_name(code)
                self._fail(self._streams.pop(sid), name, f"GOAWAY {name}")
            elif opened_by_receiver and sid > last:
                self._fail(self._streams.pop(sid), "REFUSED_STREAM", "GOAWAY: the stream was not processed")

    def _headers_frame(self, side: _Side, ftype: int, flags: int, sid: int, payload: bytes, cut: bool) -> None:
        if not sid:
            self._count("frames_invalid")
            return
        off = 0
        pad = 0
        if flags & PADDED:
            if not payload:
                self._count("frames_invalid")
                return
            pad = payload[0]
            off = 1
        promised = 0
        if ftype == HEADERS and flags & PRIORITY_FLAG:
            off += 5
        elif ftype == PUSH_PROMISE:
            if len(payload) < off + 4:
                self._count("frames_invalid")
                return
            promised = int.from_bytes(payload[off : off + 4], "big") & 0x7FFFFFFF
            off += 4
        if cut:
            fragment = payload[off:]  # the padding is at the end, in the lost part
        else:
            if off + pad > len(payload):
                self._count("frames_invalid")
                cut = True
            fragment = payload[off : len(payload) - pad]
        side.block = _Block(sid, bool(flags & END_STREAM) and ftype == HEADERS, promised, bytearray(fragment), cut,
                            side.frame_pos)
        if flags & END_HEADERS:
            self._finish_block(side)

    def _finish_block(self, side: _Side, cut: bool = False) -> None:
        blk = side.block
        side.block = None
        if blk is None:
            return
        fields: dict[bytes, bytes] | None = None
        if blk.cut or cut:
            self._count("header_blocks_truncated")
            self._lose_table(side)
        else:
            try:
                decoded = side.hpack.decode(bytes(blk.fragment))
            except hpack.HpackError:
                self._count("hpack_errors")
                self._lose_table(side)
            else:
                fields = _keep(decoded.fields)
                if decoded.unknown:
                    self._count("header_fields_unknown", decoded.unknown)
                    fields[_PARTIAL] = b""
        self._count("header_blocks")
        if blk.promised:
            self._push(side, blk.promised, fields)
        else:
            self._on_headers(side, blk.sid, fields, blk.end_stream, blk.pos)

    # -- streams ------------------------------------------------------------------------------

    def _push(self, side: _Side, promised: int, fields: dict[bytes, bytes] | None) -> None:
        if self._client_egress is None:
            self._client_egress = not side.egress  # only a server promises
        seg = self._seg
        assert seg is not None
        if promised in self._streams:
            self._count("frames_invalid")
            return
        self._make_room()
        # No req_pos: a pushed stream's request is the server's PUSH_PROMISE, no byte of the
        # request direction, whose positions are another sequence number space.
        self._streams[promised] = _Stream(promised, seg.start_ns, seg.end_ns, seg.pid, seg.tid, fields, req_ended=True)

    def _make_room(self) -> None:
        """At MAX_STREAMS open streams, the oldest goes: on a long-lived connection a stream whose
        end was in lost bytes would otherwise stay open forever and block every later one."""
        if len(self._streams) < MAX_STREAMS:
            return
        st = self._streams.pop(min(self._streams))
        self._count("streams_evicted")
        if st.blind:
            self._count("streams_end_unknown")
            self._complete(st)
        else:
            self._fail(st, semconv.ERR_EVICTED, "more open streams than the decoder tracks")

    def _on_headers(self, side: _Side, sid: int, h: dict[bytes, bytes] | None, end_stream: bool,
                    pos: int | None) -> None:
        seg = self._seg
        assert seg is not None
        if self._client_egress is None:
            # Mid-stream: the block's own pseudo-headers tell a request from a response.
            if h is not None and b":method" in h:
                self._client_egress = side.egress
            elif h is not None and b":status" in h:
                self._client_egress = not side.egress
            else:
                self._count("headers_unknown_role")
                return
        st = self._streams.get(sid)
        if side.egress == self._client_egress:
            if st is not None:  # request trailers
                st.req_ended = st.req_ended or end_stream
                return
            if sid % 2 == 0 or sid <= self._max_client_sid:
                self._count("frames_no_stream")
                return
            self._make_room()
            self._max_client_sid = sid
            if h is None:
                self._count("requests_undecoded")
            opens = side.whole or (h is not None and b":method" in h)
            self._streams[sid] = _Stream(sid, seg.start_ns, seg.end_ns, seg.pid, seg.tid, h, req_ended=end_stream,
                                         req_pos=pos if opens else None)
            return
        if st is None:
            if sid not in self._orphans:
                if len(self._orphans) >= MAX_STREAMS:
                    self._orphans.clear()
                self._orphans.add(sid)
                self._count("responses_without_request")
            return
        st.end_ns = seg.end_ns
        if not st.resp_seen:
            status = _int(h.get(b":status")) if h is not None else None
            if status is not None and 100 <= status < 200 and not end_stream:
                return  # informational: the final response follows
            st.resp_seen = True
            st.resp = h
        else:
            st.trailers_seen = True
            st.trailers = h
        if end_stream:
            self._complete(self._streams.pop(sid))

    def _data(self, side: _Side, sid: int, flags: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            self._count("frames_no_stream")
            return
        seg = self._seg
        assert seg is not None
        if side.egress == self._client_egress:
            st.req_ended = st.req_ended or bool(flags & END_STREAM)
            return
        st.end_ns = seg.end_ns
        if flags & END_STREAM:
            if not st.resp_seen:
                self._count("frames_invalid")  # a body before any response headers
            self._complete(self._streams.pop(sid))

    # -- operations ---------------------------------------------------------------------------

    def _complete(self, st: _Stream) -> None:
        self._out.append(self._operation(st, None, None))

    def _fail(self, st: _Stream, error: str, message: str) -> None:
        self._out.append(self._operation(st, error, message))

    def _operation(self, st: _Stream, error: str | None, message: str | None) -> Operation:
        req = st.req
        resp = st.resp
        client = self._client_egress is True
        ct = (req or {}).get(b"content-type") or (resp or {}).get(b"content-type")
        # A request whose headers were lost still has a span: its timing and its response's status
        # (gRPC when the response says so), under the conventions' name for an unknown method.
        if _is_grpc(ct):
            op = self._grpc(st, req or {}, client)
        else:
            op = self._http(st, req or {}, client)
        if error is not None:
            op.error = error
            op.error_message = message
        return op

    def _grpc(self, st: _Stream, req: dict[bytes, bytes], client: bool) -> Operation:
        attrs: dict[str, AttrValue] = {"rpc.system": "grpc"}
        path = req.get(b":path", b"").decode("utf-8", "replace")
        service, sep, method = path[1:].partition("/") if path.startswith("/") else ("", "", "")
        if sep and service and method and "/" not in method:
            attrs["rpc.service"] = service
            attrs["rpc.method"] = method
            name = f"{service}/{method}"
        else:
            name = req.get(b":method", b"POST").decode("latin-1") if path else "grpc"
        op = Operation("grpc", client, st.start_ns, st.end_ns, name, attrs, pid=st.pid, tid=st.tid,
                       req_pos=st.req_pos)
        status: int | None = None
        for h in (st.trailers, st.resp):
            if h is not None and b"grpc-status" in h:
                status = _int(h[b"grpc-status"])
                break
        if status is not None:
            attrs["rpc.grpc.status_code"] = status
            if status:
                label = GRPC_CODES[status] if status < len(GRPC_CODES) else str(status)
                op.error = label
                op.error_message = f"grpc-status {status} ({label})"
            return op
        if not st.resp_seen:
            return op  # failed or closed: the caller sets the error
        http_status = _int((st.resp or {}).get(b":status"))
        if http_status is not None and http_status != 200:
            op.error = str(http_status)
            op.error_message = f"HTTP status {http_status} without grpc-status"
        elif (st.blind or st.resp is None or _PARTIAL in st.resp
              or (st.trailers_seen and (st.trailers is None or _PARTIAL in st.trailers))):  # fmt: skip
            self._count("grpc_status_unknown")  # in a block or bytes that could not be decoded
        else:
            op.error = "grpc_status_missing"
            op.error_message = "the response ended without grpc-status"
        return op

    def _http(self, st: _Stream, req: dict[bytes, bytes], client: bool) -> Operation:
        attrs: dict[str, AttrValue] = {}
        raw = req.get(b":method")
        name = "HTTP"
        if raw is not None:
            method, original = semconv.normalize_method(raw)
            attrs["http.request.method"] = method
            if original is not None:
                attrs["http.request.method_original"] = original
            if method != semconv.OTHER_METHOD:
                name = method
        scheme = req.get(b":scheme", b"").decode("latin-1")
        target = req.get(b":path")
        path = query = None
        if target is not None:
            t = target.decode("utf-8", "replace")
            path, q, query_s = t.partition("?")
            query = semconv.redact_query(query_s) if q else None
        if client:
            auth = req.get(b":authority")
            hostport = semconv.split_host_port(auth.decode("utf-8", "replace")) if auth else None
            if hostport is not None and scheme and path is not None:
                assert auth is not None
                url = f"{scheme}://{auth.decode('utf-8', 'replace')}{path}"
                attrs["url.full"] = url + ("?" + query if query is not None else "")
        else:
            if scheme:
                attrs["url.scheme"] = scheme
            if path:
                attrs["url.path"] = path
            if query is not None:
                attrs["url.query"] = query
        attrs["network.protocol.version"] = "2"
        ua = req.get(b"user-agent")
        if ua:
            attrs["user_agent.original"] = ua.decode("utf-8", "replace")
        op = Operation("http2", client, st.start_ns, st.end_ns, name, attrs, pid=st.pid, tid=st.tid,
                       req_pos=st.req_pos)
        status = _int((st.resp or {}).get(b":status"))
        if status is not None:
            attrs["http.response.status_code"] = status
            if status >= 500 or (status >= 400 and client):
                op.error = str(status)
        elif st.resp_seen and st.resp is None:
            self._count("responses_undecoded")
        return op
