"""PostgreSQL wire protocol v3 (frontend/backend) into database operations, either end.

Follows the OpenTelemetry database semantic conventions v1.33 (stable for PostgreSQL):
`db.system.name` "postgresql", `db.namespace` the database of the startup message (the user's
name when the startup names none, as the server does), `db.operation.name`, `db.collection.name`,
`db.query.text` (literals redacted, correlator/protocols/sql.py), `db.response.status_code` the
SQLSTATE of an ErrorResponse (error.type too, for classes other than 00/01/02), and
`db.response.returned_rows` from a SELECT's CommandComplete tag. Span name "{operation}
{collection or namespace}".

One operation per simple Query ('Q', all its statements until ReadyForQuery: a batch when several)
and per Execute of the extended protocol: several Executes before one Sync (pipelining) are
several operations, answered in order. A named statement's text is remembered from its Parse for
later Binds (at most MAX_STATEMENTS per connection). After an ErrorResponse the server skips to
the next Sync; the Executes it skipped never ran and are counted (`skipped_after_error`), not
reported.

Never kept: Bind parameter values, DataRow contents, PasswordMessage / SASL / GSS messages ('p'),
Authentication requests' data, error Detail/Hint fields; an error's message is exported only with
its quoted parts and numbers redacted.

Positions: an operation's req_pos is where its request's first byte sits in the frontend's stream:
the Query's type byte, or the first Parse or Bind after the previous Execute or Sync (an Execute
with neither before it: its own), each from the segment that byte came in. After a resync the
request under way may have begun in the bytes skipped: no operation has one until decoding
passes a Query, Execute or Sync (that one's included).

Framing: a type byte and a 4-byte length (startup messages have no type byte). The kernel copies
at most 512 bytes of a transfer; a message running into the uncopied rest is decoded from what was
copied and the rest stepped over by its length. When a gap swallows a message boundary, or a
connection is picked up mid-stream, the decoder resynchronises on the first offset of a later
segment where a chain of well-formed messages runs to the end of the copy, counting what it
skipped. The traced process's role (client or server) comes from the startup message, or else from
the first message type only one side sends.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from correlator.protocols.sql import OPERATIONS, UNREADABLE, describe, identifier, redact_message
from correlator.segments import Operation, Segment, stream_pos
from correlator.spans import AttrValue

PROTOCOL = "postgresql"
MAX_STATEMENTS = 256  # named prepared statements remembered per connection
MAX_PENDING = 1024  # frontend messages awaiting their response
MAX_MESSAGE = 1 << 30  # the server's own limit on a message
_KEEP = 16384  # bytes of one message kept at most; the rest is stepped over
_STARTUP_MAX = 10000
_LONE_MAX = 65536  # a resync's only, unfinished message is believed up to this size
_ERROR_FIELDS = frozenset(b"SVCMDHPpqWstcdnFLR")

_V3 = 196608
_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_CANCEL = 80877102
_STARTUP_CODES = (_V3, _SSL_REQUEST, _GSS_REQUEST, _CANCEL)

FRONTEND = frozenset(b"QPBEDCSHXFpdcf")
BACKEND = frozenset(b"RSKZTDCENA123nstIGHWVvdc")
FRONTEND_ONLY = FRONTEND - BACKEND
BACKEND_ONLY = BACKEND - FRONTEND
_ANY = FRONTEND | BACKEND
_STARTUP = 0  # pseudo type of an untyped startup-phase message
_OPENS = frozenset(b"PB")  # the extended protocol's messages that may begin a request
_ANSWER = 1  # pseudo type of the one-byte answer to SSLRequest / GSSENCRequest


@dataclass(slots=True)
class _Msg:
    kind: int
    body: bytes  # maybe cut (complete False): the rest was not copied
    complete: bool
    seg: Segment
    pos: int | None = None  # the stream position of its first byte (its type byte), when tracked


# (offset in a buffer, stream position of the byte there): where each segment's bytes begin, so a
# message's position comes from the segment its first byte came in, never counted across segments.
_Marks = list[tuple[int, int]]


def _drop(marks: _Marks, n: int) -> _Marks:
    """The marks of a buffer once its first n bytes are gone."""
    if not n or not marks:
        return marks
    i = len(marks) - 1
    while i > 0 and marks[i][0] > n:
        i -= 1
    o, p = marks[i]
    return [(0, (p + n - o) & 0xFFFFFFFF), *((o2 - n, p2) for o2, p2 in marks[i + 1 :])]


def _fixed_len_ok(t: int, length: int, body: bytes) -> bool:
    """Checks of the messages whose size or shape is fixed, for resynchronisation."""
    if t == ord("Z"):
        return length == 5 and (len(body) < 1 or body[:1] in (b"I", b"T", b"E"))
    if t in b"123nIsX":
        return length == 4
    if t in b"CQ" and len(body) == length - 4:
        return body.endswith(b"\x00")
    if t == ord("K"):
        return length == 12
    if t in b"EN" and body:
        return body[0] in _ERROR_FIELDS or body[0] == 0 or t == ord("E") and length == 9  # 'E' Execute
    return True


class _Frames:
    """One direction's message framing across segments and their uncopied gaps."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.c = counters
        self.buf = bytearray()
        self.skip = 0  # bytes of the current message still to step over
        self.synced = True
        self.untyped = True  # the next message may be a startup-phase one (no type byte)
        self.first = True
        self.answer = False  # the next byte is the answer to an SSL/GSS encryption request
        self.allowed: frozenset[int] = _ANY
        self.dead = False  # encrypted from here on: nothing decodable
        self.losses = 0
        self.quiet = False  # the resync about to run is a first segment's check, not a loss
        self.marks: _Marks = []  # of buf
        self.track = True  # give messages their positions (the frontend's: requests are named by them)
        # The framing restarted at a resync: a request under way may have begun in what was
        # skipped, so no position names one until the decoder passes a request boundary.
        self.unsure = False

    def _lose(self, why: str) -> None:
        self.losses += 1
        self.c[why] = self.c.get(why, 0) + 1
        self.buf.clear()
        self.marks = []
        self.skip = 0
        self.synced = False
        self.untyped = False
        self.answer = False

    def _chain_ok(self, data: bytes, total: int, at_start: bool) -> bool:
        """Does a run of well-formed messages start at data[0] and reach the end of the copy?
        `total` is how many bytes the transfer had from there (the copy may be shorter). At the
        segment's start one message continuing in the next segment is enough."""
        pos, whole = 0, 0
        while pos < len(data):
            if len(data) - pos < 5:
                return (whole > 0 or at_start) and total > len(data) or (whole > 0 and total == len(data))
            t = data[pos]
            (length,) = struct.unpack_from(">I", data, pos + 1)
            if t not in self.allowed or length < 4 or length > MAX_MESSAGE:
                return False
            body = data[pos + 5 : pos + 1 + length]
            if not _fixed_len_ok(t, length, body):
                return False
            if pos + 1 + length > len(data):
                # One lone message proves nothing inside a segment; at its start it may, if small.
                return whole > 0 or (at_start and length <= _LONE_MAX)
            whole += 1
            pos += 1 + length
        return whole > 0

    def _resync(self, seg: Segment, data: bytes) -> bytes | None:
        total = seg.length - (len(seg.data) - len(data))
        for k in range(len(data)):
            if self._chain_ok(data[k:], total - k, k == 0):
                if k:
                    self.c["resync_skipped_bytes"] = self.c.get("resync_skipped_bytes", 0) + k
                if k or not self.quiet:  # a first segment that starts on a message is no resync
                    self.c["resynchronised"] = self.c.get("resynchronised", 0) + 1
                self.quiet = False
                self.synced = True
                self.unsure = True
                return data[k:]
        self.quiet = False
        self.c["unsynced_segments"] = self.c.get("unsynced_segments", 0) + 1
        self.c["unsynced_bytes"] = self.c.get("unsynced_bytes", 0) + seg.length
        return None

    def push(self, seg: Segment) -> list[_Msg]:
        if self.dead:
            self.c["encrypted_bytes"] = self.c.get("encrypted_bytes", 0) + seg.length
            return []
        data: bytes = seg.data
        gap = seg.length - len(data)
        out: list[_Msg] = []
        if self.answer and data and not self.buf:
            out.append(_Msg(_ANSWER, data[:1], True, seg))
            self.answer = False
            self.first = False
            data = data[1:]
            if not data and gap <= 0:
                return out
        marks: _Marks = [(0, stream_pos(seg, len(seg.data) - len(data)))] if self.track else []
        if self.first and data:
            if len(self.buf) + len(data) < 8 and gap <= 0:
                self._keep(data, marks)  # too short to tell a startup message yet
                return out
            marks = [*self.marks, *((o + len(self.buf), p) for o, p in marks)]
            data = bytes(self.buf) + data
            self.buf.clear()
            self.marks = []
            self.first = False
            if not self._looks_startup(data):
                self.untyped = False
                self.synced = False  # maybe picked up mid-stream: the first bytes must prove it
                self.quiet = True
        if not self.synced:
            got = self._resync(seg, data)
            if got is None:
                return out
            marks = _drop(marks, len(data) - len(got))
            data = got
        if self.skip:
            take = min(self.skip, len(data))
            data = data[take:]
            marks = _drop(marks, take)
            self.skip -= take
            self.c["stepped_over_bytes"] = self.c.get("stepped_over_bytes", 0) + take
        self._keep(data, marks)
        self._parse(seg, out)
        if gap > 0:
            self._gap(seg, gap, out)
        return out

    def _keep(self, data: bytes, marks: _Marks) -> None:
        """data appended to buf; marks: data's own."""
        if data:
            if self.buf:
                base = len(self.buf)
                self.marks += [(o + base, p) for o, p in marks]
            else:
                self.marks = marks
            self.buf += data

    def _pos_at(self, at: int) -> int | None:
        """The stream position of buf[at], when tracked."""
        if self.track:
            for o, p in reversed(self.marks):
                if o <= at:
                    return (p + at - o) & 0xFFFFFFFF
        return None

    def _looks_startup(self, data: bytes) -> bool:
        if len(data) < 8:
            return False
        length, code = struct.unpack_from(">II", data)
        return 8 <= length <= _STARTUP_MAX and code in _STARTUP_CODES

    def _parse(self, seg: Segment, out: list[_Msg]) -> None:
        buf = self.buf
        pos = 0
        # Messages met here mostly start in the last segment's bytes: its mark, at hand.
        last_o, last_p = self.marks[-1] if self.track and self.marks else (-1, 0)
        while pos < len(buf):
            if self.answer:
                out.append(_Msg(_ANSWER, bytes(buf[pos : pos + 1]), True, seg))
                self.answer = False
                pos += 1
                continue
            if self.untyped and len(buf) - pos >= 8 and self._looks_startup(bytes(buf[pos : pos + 8])):
                (length,) = struct.unpack_from(">I", buf, pos)
                if len(buf) - pos < length:
                    break
                out.append(_Msg(_STARTUP, bytes(buf[pos + 4 : pos + length]), True, seg, self._pos_at(pos)))
                pos += length
                continue
            if self.untyped and len(buf) - pos < 8:
                break
            self.untyped = False
            if len(buf) - pos < 5:
                break
            t = buf[pos]
            (length,) = struct.unpack_from(">I", buf, pos + 1)
            if t not in self.allowed or length < 4 or length > MAX_MESSAGE:
                self.c["bad_frames"] = self.c.get("bad_frames", 0) + 1
                del buf[:]
                self._lose("desynchronised")
                return
            end = pos + 1 + length
            if end > len(buf):
                if len(buf) - pos >= _KEEP:  # too big to keep: what we have, the rest skipped
                    out.append(_Msg(t, bytes(buf[pos + 5 : pos + _KEEP]), False, seg, self._pos_at(pos)))
                    self.skip = end - len(buf)
                    pos = len(buf)
                break
            at = None if last_o < 0 else (last_p + pos - last_o) & 0xFFFFFFFF if pos >= last_o else self._pos_at(pos)
            out.append(_Msg(t, bytes(buf[pos + 5 : end]), True, seg, at))
            pos = end
        if pos:
            del buf[:pos]
            self.marks = _drop(self.marks, pos) if buf else []

    def _gap(self, seg: Segment, gap: int, out: list[_Msg]) -> None:
        """The transfer's uncopied rest: step over it inside the current message, or lose sync."""
        self.c["gap_bytes"] = self.c.get("gap_bytes", 0) + gap
        if self.skip:
            if gap <= self.skip:
                self.skip -= gap
                return
            self._lose("gap_lost_sync")
            return
        buf = self.buf
        if len(buf) >= 5 and not self.untyped and not self.answer:
            t = buf[0]
            (length,) = struct.unpack_from(">I", buf, 1)
            need = 1 + length - len(buf)
            out.append(_Msg(t, bytes(buf[5:]), False, seg, self._pos_at(0)))
            buf.clear()
            self.marks = []
            if gap <= need:
                self.skip = need - gap
                return
        self._lose("gap_lost_sync")


@dataclass(slots=True)
class _Op:
    text: str | None  # the raw SQL (kept only inside the decoder, redacted on export)
    start_ns: int
    pid: int
    tid: int
    cut: bool = False  # the text was cut by the copy
    req_pos: int | None = None  # where its request began in the frontend's stream (Operation.req_pos)
    tags: list[str] = field(default_factory=list)
    sqlstate: str | None = None
    message: str | None = None


@dataclass(slots=True)
class _Item:
    kind: str  # "query", "parse", "bind", "describe", "execute", "close", "sync"
    op: _Op | None = None
    text: str | None = None  # a Parse's statement text (a failed prepare reports it)
    seg: Segment | None = None
    req_pos: int | None = None  # a Parse's request start (a failed prepare is named by it)


def _cstr(b: bytes, pos: int = 0) -> tuple[bytes, int, bool]:
    """A NUL-terminated string at pos: (bytes, index after the NUL, complete)."""
    end = b.find(b"\x00", pos)
    if end < 0:
        return b[pos:], len(b), False
    return b[pos:end], end + 1, True


class PostgresDecoder:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self._frames = {True: _Frames(self.counters), False: _Frames(self.counters)}
        self._front_egress: bool | None = None  # the direction of the frontend's messages
        self._namespace: str | None = None
        self._statements: OrderedDict[str, str | None] = OrderedDict()
        self._portals: dict[str, str | None] = {}
        self._pending: deque[_Item] = deque()
        self._last_back_ns = 0
        # The extended-protocol request under way: its first Parse or Bind was seen (where it
        # began), its Execute not yet.
        self._open = False
        self._req: int | None = None

    # -- plumbing ---------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def feed(self, seg: Segment) -> list[Operation]:
        out: list[Operation] = []
        try:
            frames = self._frames[seg.egress]
            if self._front_egress is not None:
                frames.allowed = FRONTEND if seg.egress == self._front_egress else BACKEND
            losses = frames.losses
            for msg in frames.push(seg):
                self._message(seg.egress, msg, out)
            if frames.losses != losses and seg.egress == self._front_egress:
                self._infer_after_gap(seg)
            if frames.synced is False and self._front_egress is not None and seg.egress != self._front_egress:
                self._responses_lost(seg, out)
        except Exception:  # noqa: BLE001 - a decoder never raises; the segment is counted
            self._count("decode_errors")
        return out

    def close(self, now_ns: int) -> list[Operation]:
        out: list[Operation] = []
        try:
            for frames in self._frames.values():
                if frames.buf:  # a message cut mid-frame by the connection's end
                    self._count("cut_at_close")
                    self._count("cut_at_close_bytes", len(frames.buf))
                    frames.buf.clear()
            while self._pending:
                item = self._pending.popleft()
                if item.op is not None:
                    self._count("no_response")
                    out.append(self._export(item.op, max(now_ns, item.op.start_ns), "no_response"))
        except Exception:  # noqa: BLE001
            self._count("decode_errors")
        return out

    def _message(self, egress: bool, msg: _Msg, out: list[Operation]) -> None:
        if self._front_egress is None:
            if msg.kind == _STARTUP or msg.kind in FRONTEND_ONLY:
                self._front_egress = egress
                if msg.kind != _STARTUP:
                    self._count("no_startup")  # picked up mid-stream: no db.namespace
            elif msg.kind in BACKEND_ONLY:
                self._front_egress = not egress
                self._count("no_startup")
            else:
                self._count("undecided_messages")  # e.g. 'D' or 'E', sent by both sides
                return
            self._frames[self._front_egress].allowed = FRONTEND
            self._frames[not self._front_egress].allowed = BACKEND
            self._frames[not self._front_egress].track = False
        if egress == self._front_egress:
            self._frontend(msg)
        else:
            self._backend(msg, out)

    # -- frontend ---------------------------------------------------------------------------------

    def _push(self, item: _Item) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._count("pending_overflow")
        self._pending.append(item)

    def _new_op(self, text: str | None, seg: Segment, cut: bool, req_pos: int | None) -> _Op:
        return _Op(text=text, start_ns=seg.start_ns, pid=seg.pid, tid=seg.tid, cut=cut, req_pos=req_pos)

    def _frontend(self, msg: _Msg) -> None:
        t, body, seg = msg.kind, msg.body, msg.seg
        frames = self._frames[bool(self._front_egress)]
        # A request begins with its Query, or with the first Parse or Bind after the previous
        # request's Execute or Sync (the Execute's own type byte when none came: a suspended
        # portal run again). After a resync that start may lie in the skipped bytes: no position
        # until the next boundary (frames.unsure).
        if t in _OPENS and not self._open:
            self._open, self._req = True, msg.pos
        if t == _STARTUP:
            self._startup(body)
        elif t == ord("p"):
            self._count("auth_messages")  # password / SASL / GSS: never read
        elif t == ord("Q"):
            raw, _, done = _cstr(body)
            text = raw.decode("utf-8", "replace")
            if not done:
                self._count("query_text_cut")
            self._push(_Item("query", self._new_op(text, seg, not done, None if frames.unsure else msg.pos)))
            self._open = frames.unsure = False
        elif t == ord("P"):
            name, pos, _ = _cstr(body)
            raw, _, done = _cstr(body, pos)
            text = raw.decode("utf-8", "replace")
            key = name.decode("utf-8", "replace")
            self._statements[key] = text
            self._statements.move_to_end(key)
            if len(self._statements) > MAX_STATEMENTS:
                self._statements.popitem(last=False)
                self._count("statements_forgotten")
            if not done:
                self._count("query_text_cut")
            self._push(_Item("parse", text=text, seg=seg, req_pos=None if frames.unsure else self._req))
        elif t == ord("B"):
            portal, pos, _ = _cstr(body)
            stmt, _, _ = _cstr(body, pos)
            key = stmt.decode("utf-8", "replace")
            if key not in self._statements:
                self._count("unknown_statements")  # its Parse came before the pickup
            self._portals[portal.decode("utf-8", "replace")] = self._statements.get(key)
            if len(self._portals) > MAX_STATEMENTS:
                self._portals.pop(next(iter(self._portals)))
            self._push(_Item("bind"))
        elif t == ord("E"):
            portal, _, _ = _cstr(body)
            text = self._portals.get(portal.decode("utf-8", "replace"))
            req = None if frames.unsure else self._req if self._open else msg.pos
            self._push(_Item("execute", self._new_op(text, seg, False, req)))
            self._open = frames.unsure = False
        elif t == ord("D"):
            self._push(_Item("describe"))
        elif t == ord("C"):
            if body[:1] == b"S":
                self._statements.pop(_cstr(body, 1)[0].decode("utf-8", "replace"), None)
            self._push(_Item("close"))
        elif t == ord("S"):
            self._push(_Item("sync"))
            self._open = frames.unsure = False
        elif t == ord("F"):
            self._count("function_calls")  # the fast-path interface: no SQL text to report
            self._push(_Item("close"))  # answered by one FunctionCallResponse ('V')
        # 'H' flush, 'X' terminate, 'd'/'c'/'f' COPY data: nothing to answer or report

    def _infer_after_gap(self, seg: Segment) -> None:
        """The frontend's copy ended inside a Parse or Bind whose transfer went on past it: drivers
        send Parse, Bind, Describe, Execute and Sync in one write, so the rest is taken as sent
        (the server's answers then match). Counted, since it is an inference."""
        last = self._pending[-1] if self._pending else None
        if last is None or last.kind not in ("parse", "bind"):
            return
        text = last.text if last.kind == "parse" else self._portals.get("")
        if last.kind == "parse":
            self._portals[""] = text
            self._push(_Item("bind"))
        # The cut message's request: its start was copied (unless it began before a resync).
        req = None if self._frames[bool(self._front_egress)].unsure or not self._open else self._req
        self._push(_Item("execute", self._new_op(text, seg, True, req)))
        self._push(_Item("sync"))
        self._open = False
        self._count("inferred_executes")

    def _startup(self, body: bytes) -> None:
        if len(body) < 4:
            return
        (code,) = struct.unpack_from(">I", body)
        back = self._frames[not self._front_egress]
        if code in (_SSL_REQUEST, _GSS_REQUEST):
            back.answer = True
            self._frames[bool(self._front_egress)].untyped = True
            self._count("encryption_requests")
            return
        if code == _CANCEL:
            self._count("cancel_requests")
            return
        params: dict[bytes, bytes] = {}
        pos = 4
        while pos < len(body) and body[pos] != 0:
            key, pos, _ = _cstr(body, pos)
            val, pos, _ = _cstr(body, pos)
            if key in (b"database", b"user"):  # nothing else of the startup is read
                params[key] = val
        db = params.get(b"database") or params.get(b"user")
        if db:
            self._namespace = identifier(db)
            if self._namespace is None:
                self._count("bad_database_names")

    # -- backend ----------------------------------------------------------------------------------

    def _backend(self, msg: _Msg, out: list[Operation]) -> None:
        t, body, seg = msg.kind, msg.body, msg.seg
        self._last_back_ns = seg.end_ns
        head = self._pending[0] if self._pending else None
        if t == _ANSWER:
            front = self._frames[bool(self._front_egress)]
            if body in (b"S", b"G"):  # encrypted from here on: TLS is traced at the library
                front.dead = True
                self._frames[not self._front_egress].dead = True
                self._count("encrypted_connections")
            else:
                front.untyped = True
            return
        if t in b"RSKNA":  # auth requests (data never read), parameters, key, notices
            return
        if t in b"123":
            want = {ord("1"): "parse", ord("2"): "bind", ord("3"): "close"}[t]
            if head is not None and head.kind == want:
                self._pending.popleft()
            else:
                self._count("unmatched_responses")
            return
        if t in b"Tn":
            if head is not None and head.kind == "describe":
                self._pending.popleft()
            return
        if t in b"tdcGHW":
            return  # parameter description, COPY: the operation goes on
        if t == ord("D"):
            return  # a row: its values are never read
        if t == ord("V"):
            if head is not None and head.kind == "close":
                self._pending.popleft()
            return
        if t in b"CIs":
            if head is None or head.kind not in ("query", "execute") or head.op is None:
                self._count("unmatched_responses")
                return
            if t == ord("C"):
                tag, _, _ = _cstr(body)
                head.op.tags.append(tag.decode("ascii", "replace")[:64])
            if head.kind == "execute":
                self._pending.popleft()
                out.append(self._export(head.op, seg.end_ns, None))
            return
        if t == ord("E"):
            self._error(body, seg, out)
            return
        if t == ord("Z"):
            self._ready(seg, out)
            return

    def _error(self, body: bytes, seg: Segment, out: list[Operation]) -> None:
        fields: dict[int, bytes] = {}
        pos = 0
        while pos < len(body) and body[pos] != 0:
            code = body[pos]
            val, pos, _ = _cstr(body, pos + 1)
            if code in b"CMV":  # SQLSTATE, message, severity: Detail/Hint/Where never read
                fields[code] = val
        sqlstate = fields.get(ord("C"), b"").decode("ascii", "replace")[:5] or None
        message = redact_message(fields.get(ord("M"), b"").decode("utf-8", "replace")) or None
        head = self._pending[0] if self._pending else None
        if head is not None and head.kind == "query" and head.op is not None:
            head.op.sqlstate = head.op.sqlstate or sqlstate
            head.op.message = head.op.message or message
            return  # the simple query ends at its ReadyForQuery
        # Extended protocol: the server skips everything up to the next Sync.
        group: list[_Item] = []
        while self._pending and self._pending[0].kind != "sync":
            group.append(self._pending.popleft())
        if not group and head is None:
            self._count("unmatched_errors")  # e.g. a FATAL at startup (authentication failed)
            return
        execs = [i for i in group if i.kind == "execute" and i.op is not None]
        if execs:
            op = execs[0].op
            assert op is not None
            if len(execs) > 1:
                self._count("skipped_after_error", len(execs) - 1)
        else:
            parse = next((i for i in group if i.kind == "parse"), None)
            if parse is None or parse.seg is None:
                self._count("unmatched_errors")
                return
            op = self._new_op(parse.text, parse.seg, False, parse.req_pos)  # a failed prepare
        op.sqlstate, op.message = sqlstate, message
        out.append(self._export(op, seg.end_ns, None))

    def _ready(self, seg: Segment, out: list[Operation]) -> None:
        # Pop up to and including the first query or sync: whatever came before it lost its
        # answer (a gap, or a pickup mid-stream).
        while self._pending:
            item = self._pending.popleft()
            if item.kind == "sync":
                return
            if item.kind == "query" and item.op is not None:
                out.append(self._export(item.op, seg.end_ns, None))
                return
            if item.op is not None:
                self._count("responses_unseen")
                out.append(self._export(item.op, seg.end_ns, None))

    def _responses_lost(self, seg: Segment, out: list[Operation]) -> None:
        """The server's stream lost sync: what it was answering ends here, status unknown."""
        while self._pending:
            item = self._pending.popleft()
            if item.op is not None:
                self._count("responses_unseen")
                out.append(self._export(item.op, seg.end_ns, None))

    # -- export -----------------------------------------------------------------------------------

    def _export(self, op: _Op, end_ns: int, failure: str | None) -> Operation:
        attrs: dict[str, AttrValue] = {"db.system.name": PROTOCOL}
        if self._namespace:
            attrs["db.namespace"] = self._namespace
        opname: str | None = None
        coll: str | None = None
        if op.text is not None:
            info = describe(op.text, "postgresql")
            if info is UNREADABLE and op.text:
                self._count("unreadable_query_text")
            if info.text:
                attrs["db.query.text"] = info.text
            opname, coll = info.operation, info.collection
            if info.statements > 1:
                attrs["db.operation.batch.size"] = info.statements
        if opname is None and op.tags:  # no text (its Parse came before the pickup): the tag
            words = [w for w in op.tags[0].split() if not w.isdigit()]
            if words and words[0] in OPERATIONS:
                opname = " ".join(words[:2]) if words[0] in ("CREATE", "DROP", "ALTER") else words[0]
        if opname:
            attrs["db.operation.name"] = opname
        if coll:
            attrs["db.collection.name"] = coll
        if len(op.tags) == 1:
            parts = op.tags[0].split()
            if len(parts) == 2 and parts[0] in ("SELECT", "FETCH", "MOVE") and parts[1].isdigit():
                attrs["db.response.returned_rows"] = int(parts[1])
        error: str | None = failure
        message: str | None = None
        if failure == "no_response":
            message = "the connection ended before the response"
        if op.sqlstate:
            attrs["db.response.status_code"] = op.sqlstate
            if op.sqlstate[:2] not in ("00", "01", "02"):
                error, message = op.sqlstate, op.message
        target = coll or self._namespace
        name = f"{opname} {target}" if opname and target else opname or target or PROTOCOL
        client = bool(self._front_egress)
        return Operation(protocol=PROTOCOL, client=client, start_ns=op.start_ns,
                         end_ns=max(end_ns, op.start_ns), name=name, attributes=attrs, error=error,
                         error_message=message, pid=op.pid, tid=op.tid, req_pos=op.req_pos)
