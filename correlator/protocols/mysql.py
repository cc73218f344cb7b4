"""MySQL / MariaDB client/server protocol into database operations, either end.

Follows the OpenTelemetry database semantic conventions v1.33 (stable for MySQL and MariaDB):
`db.system.name` "mysql" ("mariadb" when the server's greeting says MariaDB), `db.namespace` the
database of the handshake response, then of COM_INIT_DB, `db.operation.name`,
`db.collection.name`, `db.query.text` (literals redacted, correlator/protocols/sql.py),
`db.response.status_code` the ERR packet's error number (error.type too; its SQLSTATE goes in the
message), and `db.response.returned_rows` for a result set. Span name "{operation} {collection or
namespace}".

Operations: COM_QUERY (one per command; a multi-statement query is one batch), COM_STMT_PREPARE
(the statement id remembered with its text, at most MAX_STATEMENTS per connection),
COM_STMT_EXECUTE (the remembered text; its parameter values are never read) and COM_INIT_DB.
Other commands are followed for framing only. The classic protocol answers one command at a time,
so a command sent while a response is still open means that response was lost (a gap): it ends
there with no status, counted.

Never kept: the handshake's auth data, auth switch / more-data exchanges, COM_CHANGE_USER,
LOCAL INFILE contents, row values, COM_STMT_EXECUTE parameters; an error message is exported with
its quoted parts and numbers redacted.

Framing: a 3-byte length and a sequence id before each packet. A packet running into the part of
a transfer the kernel did not copy (beyond 512 bytes) is decoded from what was copied and the rest
stepped over by its length; when a gap swallows a packet boundary, or the connection is picked up
mid-stream, the decoder resynchronises on the first offset of a later segment where a chain of
packets with consecutive sequence ids runs to the end of the copy. Result-set ends are recognised
with and without CLIENT_DEPRECATE_EOF (a 0xfe packet shorter than the 16 MiB a row starting with
0xfe would need).

A command's req_pos is the stream position of its packet header's first byte, taken from the
segment that byte came in; packets framed from a resynchronisation that had to skip bytes get none
until a transfer opens exactly on a packet boundary of that framing.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from correlator.protocols.sql import UNREADABLE, describe, identifier, redact_message
from correlator.segments import Operation, Segment, stream_pos
from correlator.spans import AttrValue

MAX_STATEMENTS = 256
MAX_PENDING = 64
_MAX_PACKET = 0xFFFFFF
_KEEP = 16384  # bytes of one packet kept at most; the rest is stepped over
_LONE_MAX = 65536  # a resync's only, unfinished packet is believed up to this size

COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
_NO_RESPONSE = frozenset((COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA))
_COMMANDS = frozenset(range(0x00, 0x20))

CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_SSL = 0x800
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH_LENENC = 0x200000
CLIENT_QUERY_ATTRIBUTES = 1 << 27
SERVER_MORE_RESULTS_EXISTS = 0x8


@dataclass(slots=True)
class _Pkt:
    seq: int
    payload: bytes  # maybe cut (complete False)
    length: int
    complete: bool
    seg: Segment
    pos: int | None  # the stream position of its header's first byte (None: not placed)
    start_ns: int  # when its first byte came: the start of the segment that held it


def _lenenc(b: bytes, pos: int) -> tuple[int, int]:
    """A length-encoded integer at pos: (value, index after it); (-1, pos) when cut or invalid."""
    if pos >= len(b):
        return -1, pos
    first = b[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > len(b):
        return -1, pos
    return int.from_bytes(b[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


class _Frames:
    """One direction's packet framing across segments and their uncopied gaps."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.c = counters
        self.buf = bytearray()
        self.skip = 0
        self.synced = False  # the first segment must prove it starts on a packet
        self.quiet = True
        self.dead = False
        self.buf_pos: int | None = None  # the stream position of buf[0]
        self.buf_ns = 0  # the start of the segment buf[0] came in
        # Packet boundaries are placed (their stream positions known) when the framing started at
        # a transfer's first byte. A resynchronisation that skipped bytes found its boundary by
        # content, which a chain of random bytes passes often enough: its packets are not placed
        # until a transfer starts exactly on a boundary of the framing, which confirms it.
        self.placed = False

    def _count(self, name: str, n: int = 1) -> None:
        self.c[name] = self.c.get(name, 0) + n

    def _lose(self, why: str) -> None:
        self._count(why)
        self.buf.clear()
        self.skip = 0
        self.synced = False

    @staticmethod
    def _chain_ok(data: bytes, total: int, at_start: bool) -> bool:
        """Does a run of packets with consecutive sequence ids start at data[0] and reach the end
        of the copy (`total`: the transfer's bytes from there)? At the segment's start one packet
        of a connection's first exchange (sequence 0 or 1) continuing in the next segment is enough."""
        pos, whole, seq = 0, 0, -1
        while pos < len(data):
            if len(data) - pos < 4:
                return whole > 0 and total > len(data)
            length = int.from_bytes(data[pos : pos + 3], "little")
            s = data[pos + 3]
            if seq >= 0 and s != (seq + 1) & 0xFF:
                return False
            if length == 0 and whole == 0:
                return False
            seq = s
            if pos + 4 + length > len(data):
                # One lone packet proves nothing inside a segment; at its start it may.
                return whole > 0 or (at_start and length <= _LONE_MAX and (s <= 1 or pos + 4 + length <= total))
            whole += 1
            pos += 4 + length
        return whole > 0

    @staticmethod
    def _drop(n: int, lead: int, lead_pos: int | None, off: int) -> tuple[int, int | None, int]:
        """(lead, lead_pos, off) once n bytes are dropped from the front of the data they map."""
        if n < lead:
            # A position inside the earlier bytes would be counted across the segments they came
            # from: unknown.
            return lead - n, None if n else lead_pos, off
        return 0, None, off + n - lead

    def push(self, seg: Segment) -> list[_Pkt]:
        if self.dead:
            self._count("encrypted_bytes", seg.length)
            return []
        data = seg.data
        gap = seg.length - len(data)
        out: list[_Pkt] = []
        if self.synced and not self.buf and not self.skip:
            self.placed = True  # this transfer opens on a packet boundary
        # Where the bytes decoded here sit: the first `lead` came from earlier segments (the first
        # of them at lead_pos), the rest are seg.data from offset `off` on. Each position is taken
        # from the segment its byte is in, never counted across segments (gaps, lost segments).
        lead, lead_pos, off = 0, None, 0
        lead_ns = seg.start_ns  # when the earlier bytes' first came
        if not self.synced and self.quiet:  # the direction's first bytes
            if len(self.buf) + len(data) < 4 and gap <= 0:
                if not self.buf:
                    self.buf_pos = stream_pos(seg, 0)
                    self.buf_ns = seg.start_ns
                self.buf += data  # too short to tell a packet header yet
                return out
            if self.buf:
                lead, lead_pos, lead_ns = len(self.buf), self.buf_pos, self.buf_ns
            data = bytes(self.buf) + data
            self.buf.clear()
        if not self.synced:
            total = seg.length + (len(data) - len(seg.data))
            for k in range(len(data)):
                if self._chain_ok(data[k:], total - k, k == 0):
                    if k:
                        self._count("resync_skipped_bytes", k)
                    if k or not self.quiet:
                        self._count("resynchronised")
                    self.placed = k == 0
                    data = data[k:]
                    lead, lead_pos, off = self._drop(k, lead, lead_pos, off)
                    self.synced = True
                    break
            self.quiet = False
            if not self.synced:
                self._count("unsynced_segments")
                self._count("unsynced_bytes", seg.length)
                return out
        if self.skip:
            take = min(self.skip, len(data))
            data = data[take:]
            lead, lead_pos, off = self._drop(take, lead, lead_pos, off)
            self.skip -= take
            self._count("stepped_over_bytes", take)
        if self.buf:  # the start of a packet, from earlier segments
            lead, lead_pos, lead_ns = len(self.buf), self.buf_pos, self.buf_ns
        self.buf += data
        buf = self.buf
        placed = self.placed
        pos = 0
        while len(buf) - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 3], "little")
            end = pos + 4 + length
            at = self._where(seg, pos, lead, lead_pos, off) if placed else None
            ns = lead_ns if pos < lead else seg.start_ns
            if end > len(buf):
                if len(buf) - pos >= _KEEP:
                    out.append(_Pkt(buf[pos + 3], bytes(buf[pos + 4 :]), length, False, seg, at, ns))
                    self.skip = end - len(buf)
                    pos = len(buf)
                break
            out.append(_Pkt(buf[pos + 3], bytes(buf[pos + 4 : end]), length, True, seg, at, ns))
            pos = end
        self.buf_pos = self._where(seg, pos, lead, lead_pos, off) if placed else None
        self.buf_ns = lead_ns if pos < lead else seg.start_ns
        del buf[:pos]
        if gap > 0:
            self._count("gap_bytes", gap)
            if self.skip:
                if gap <= self.skip:
                    self.skip -= gap
                else:
                    self._lose("gap_lost_sync")
            elif len(buf) >= 4:
                length = int.from_bytes(buf[0:3], "little")
                need = 4 + length - len(buf)
                out.append(_Pkt(buf[3], bytes(buf[4:]), length, False, seg, self.buf_pos, self.buf_ns))
                buf.clear()
                if gap <= need:
                    self.skip = need - gap
                else:
                    self._lose("gap_lost_sync")
            else:
                self._lose("gap_lost_sync")
        return out

    @staticmethod
    def _where(seg: Segment, i: int, lead: int, lead_pos: int | None, off: int) -> int | None:
        if i >= lead:
            return stream_pos(seg, off + i - lead)
        return lead_pos if i == 0 else None


@dataclass(slots=True)
class _Cmd:
    kind: str  # "query", "prepare", "execute", "init_db", "other"
    text: str | None
    start_ns: int
    pid: int
    tid: int
    state: str = "first"  # "first", "columns", "rows", "params", "defs", "infile"
    remaining: int = 0  # column (or parameter) definitions still to come
    after: int = 0  # prepare: column definitions after the parameters
    rows: int = 0
    results: int = 0
    code: int | None = None
    sqlstate: str | None = None
    message: str | None = None
    schema: str | None = None
    resultset: bool = False  # rows came back (not only an OK)
    cut: bool = False  # a response packet ran into an uncopied gap: its row count is unknown
    req_pos: int | None = None  # the command packet's first byte (Operation.req_pos)


class MySQLDecoder:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self._frames = {True: _Frames(self.counters), False: _Frames(self.counters)}
        self._client_egress: bool | None = None
        self._phase = "unknown"  # "handshake" (greeting seen), "auth", "command"
        self._system = "mysql"
        self._namespace: str | None = None
        self._server_caps = 0
        self._statements: OrderedDict[int, str | None] = OrderedDict()
        self._pending: deque[_Cmd] = deque()
        self._infile = False
        self._client_caps = 0
        self._eof_may_follow = False  # a prepare's definitions end with an EOF without DEPRECATE_EOF

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def feed(self, seg: Segment) -> list[Operation]:
        out: list[Operation] = []
        try:
            for pkt in self._frames[seg.egress].push(seg):
                self._packet(seg.egress, pkt, out)
            if (not self._frames[seg.egress].synced and self._client_egress is not None
                    and seg.egress != self._client_egress and self._pending):
                self._lost(seg.end_ns, out)
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
                cmd = self._pending.popleft()
                if cmd.kind != "other":
                    self._count("no_response")
                    out.append(self._export(cmd, max(now_ns, cmd.start_ns), "no_response"))
        except Exception:  # noqa: BLE001
            self._count("decode_errors")
        return out

    def _lost(self, end_ns: int, out: list[Operation]) -> None:
        while self._pending:
            cmd = self._pending.popleft()
            if cmd.kind != "other":
                self._count("responses_unseen")
                out.append(self._export(cmd, end_ns, None))

    # -- roles and phases -------------------------------------------------------------------------

    def _packet(self, egress: bool, pkt: _Pkt, out: list[Operation]) -> None:
        p = pkt.payload
        if self._client_egress is None:
            if pkt.seq == 0 and p[:1] == b"\x0a" and b"\x00" in p[1:64]:
                self._client_egress = not egress  # the server's greeting
            elif pkt.seq == 0 and p and p[0] in (COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_INIT_DB):
                self._client_egress = egress
                self._phase = "command"
                self._count("no_handshake")  # picked up mid-stream: no db.namespace
            else:
                self._count("undecided_packets")
                return
        if egress == self._client_egress:
            self._from_client(pkt, out)
        else:
            self._from_server(pkt, out)

    def _greeting(self, p: bytes) -> None:
        self._phase = "handshake"
        version, pos = p[1:].split(b"\x00", 1)[0], p.find(b"\x00", 1) + 1
        if b"mariadb" in version.lower():
            self._system = "mariadb"
        # thread id (4), auth data part 1 (8), filler (1), caps low (2), charset, status, caps high
        if len(p) >= pos + 4 + 8 + 1 + 2:
            low = struct.unpack_from("<H", p, pos + 13)[0]
            high = struct.unpack_from("<H", p, pos + 18)[0] if len(p) >= pos + 20 else 0
            self._server_caps = low | high << 16

    def _handshake_response(self, p: bytes) -> None:
        if len(p) < 32:
            return
        caps = struct.unpack_from("<I", p)[0]
        if len(p) == 32 and caps & CLIENT_SSL:
            # TLS from here on: the library's plaintext is traced by the TLS probes instead.
            self._frames[True].dead = self._frames[False].dead = True
            self._count("encrypted_connections")
            return
        self._phase = "auth"
        pos = p.find(b"\x00", 32)  # the user name
        if pos < 0:
            return
        pos += 1
        # The auth data is stepped over, never read.
        if caps & CLIENT_PLUGIN_AUTH_LENENC:
            n, pos = _lenenc(p, pos)
            if n < 0:
                return
            pos += n
        elif caps & CLIENT_SECURE_CONNECTION:
            if pos >= len(p):
                return
            pos += 1 + p[pos]
        else:
            end = p.find(b"\x00", pos)
            if end < 0:
                return
            pos = end + 1
        if caps & CLIENT_CONNECT_WITH_DB and pos < len(p):
            end = p.find(b"\x00", pos)
            if end > pos:
                self._namespace = identifier(p[pos:end])
                if self._namespace is None:
                    self._count("bad_database_names")
        self._client_caps = caps

    # -- client -----------------------------------------------------------------------------------

    def _from_client(self, pkt: _Pkt, out: list[Operation]) -> None:
        p, seg = pkt.payload, pkt.seg
        if self._phase == "handshake" and pkt.seq == 1:
            self._handshake_response(p)
            return
        if self._phase == "auth" or (self._infile and pkt.seq != 0):
            self._count("auth_messages" if self._phase == "auth" else "infile_packets")
            return  # auth data / LOCAL INFILE contents: never read
        if pkt.seq != 0 or not p:
            self._count("unexpected_client_packets")
            return
        if self._pending:  # the previous command's response was lost (a gap)
            self._lost(seg.start_ns, out)
        self._infile = False
        self._eof_may_follow = False
        cmd_byte = p[0]
        kind, text = "other", None
        if cmd_byte == COM_QUERY:
            kind = "query"
            body = p[1:]
            if self._client_caps & self._server_caps & CLIENT_QUERY_ATTRIBUTES:
                n, pos = _lenenc(body, 0)
                _, pos = _lenenc(body, pos)
                body = body[pos:] if n == 0 else b""
            text = body.decode("utf-8", "replace")
        elif cmd_byte == COM_STMT_PREPARE:
            kind, text = "prepare", p[1:].decode("utf-8", "replace")
        elif cmd_byte == COM_STMT_EXECUTE and len(p) >= 5:
            stmt_id = struct.unpack_from("<I", p, 1)[0]
            if stmt_id not in self._statements:
                self._count("unknown_statements")  # prepared before the pickup
            kind, text = "execute", self._statements.get(stmt_id)
        elif cmd_byte == COM_STMT_CLOSE and len(p) >= 5:
            self._statements.pop(struct.unpack_from("<I", p, 1)[0], None)
        elif cmd_byte == COM_INIT_DB:
            kind = "init_db"
        elif cmd_byte == COM_CHANGE_USER:
            self._phase = "auth"  # a new authentication exchange; its data is never read
        elif cmd_byte not in _COMMANDS:
            self._count("unknown_commands")
            return
        if not pkt.complete and kind in ("query", "prepare"):
            self._count("query_text_cut")
        if cmd_byte in _NO_RESPONSE or cmd_byte == COM_CHANGE_USER:
            return
        cmd = _Cmd(kind, text, pkt.start_ns, seg.pid, seg.tid, req_pos=pkt.pos)
        if kind == "init_db":
            cmd.schema = identifier(p[1:]) if pkt.complete else None
            if cmd.schema is None:
                self._count("bad_database_names")
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._count("pending_overflow")
        self._pending.append(cmd)

    # -- server -----------------------------------------------------------------------------------

    def _from_server(self, pkt: _Pkt, out: list[Operation]) -> None:
        p, seg = pkt.payload, pkt.seg
        if not p:
            return
        if pkt.seq == 0 and p[0] == 0x0A and self._phase in ("unknown", "handshake"):
            self._greeting(p)
            return
        if self._phase in ("auth", "handshake"):
            if p[0] == 0x00:
                self._phase = "command"
            elif p[0] == 0xFF:
                self._count("auth_failed")
                self._phase = "command"
            return  # auth switch (0xfe) and more data (0x01) are never read
        cmd = self._pending[0] if self._pending else None
        if cmd is None:
            if self._eof_may_follow and p[0] == 0xFE and len(p) < 9:
                self._eof_may_follow = False
                return
            self._count("unmatched_responses")
            return
        if not pkt.complete:
            cmd.cut = True
        first = p[0]
        if first == 0xFF:  # ERR ends the command, whatever state it was in
            self._err(cmd, p)
            self._done(seg, out)
            return
        if cmd.state == "first":
            if first == 0x00 and cmd.kind == "prepare" and len(p) >= 12:
                stmt_id, ncols, nparams = struct.unpack_from("<IHH", p, 1)
                self._statements[stmt_id] = cmd.text
                if len(self._statements) > MAX_STATEMENTS:
                    self._statements.popitem(last=False)
                    self._count("statements_forgotten")
                cmd.state, cmd.remaining, cmd.after = "params", nparams, ncols
                self._prepare_next(cmd, seg, out)
                return
            if first == 0x00 or (first == 0xFE and len(p) < 9):
                if cmd.kind == "init_db":
                    self._namespace = cmd.schema  # None when the name was unreadable: unknown
                self._ok_or_more(cmd, p, seg, out)
                return
            if first == 0xFB and cmd.kind == "query":
                self._infile = True  # the client sends a file: its contents are never read
                return
            n, _ = _lenenc(p, 0)
            if cmd.kind == "other" or n <= 0:
                self._done(seg, out)
                return
            cmd.state, cmd.remaining, cmd.resultset = "columns", n, True
            return
        if cmd.state == "columns":
            if cmd.remaining > 0:
                cmd.remaining -= 1
                return
            cmd.state = "rows"
            if first == 0xFE and len(p) < 9:
                return  # the EOF after the column definitions
        if cmd.state == "rows":
            if first == 0xFE and pkt.length < _MAX_PACKET:
                self._ok_or_more(cmd, p, seg, out)
            else:
                cmd.rows += 1  # the row's values are never read
            return
        if cmd.state in ("params", "defs"):
            if first == 0xFE and len(p) < 9:
                return  # an EOF between definition blocks
            cmd.remaining -= 1
            self._prepare_next(cmd, seg, out)

    def _prepare_next(self, cmd: _Cmd, seg: Segment, out: list[Operation]) -> None:
        if cmd.remaining > 0:
            return
        if cmd.state == "params" and cmd.after > 0:
            cmd.state, cmd.remaining, cmd.after = "defs", cmd.after, 0
            return
        # Without CLIENT_DEPRECATE_EOF one EOF follows the last block, after the operation ended.
        self._eof_may_follow = True
        self._done(seg, out)

    def _ok_or_more(self, cmd: _Cmd, p: bytes, seg: Segment, out: list[Operation]) -> None:
        cmd.results += 1
        status = 0
        if p[0] == 0xFE and len(p) == 5:  # EOF: warnings (2), status (2)
            status = struct.unpack_from("<H", p, 3)[0]
        else:  # OK: affected rows, last insert id (lenenc), status (2)
            _, pos = _lenenc(p, 1)
            _, pos = _lenenc(p, pos)
            if pos + 2 <= len(p):
                status = struct.unpack_from("<H", p, pos)[0]
        if status & SERVER_MORE_RESULTS_EXISTS:
            cmd.state = "first"
            return
        self._done(seg, out)

    def _err(self, cmd: _Cmd, p: bytes) -> None:
        if len(p) >= 3:
            cmd.code = struct.unpack_from("<H", p, 1)[0]
        msg = p[3:]
        if msg[:1] == b"#" and len(msg) >= 6:
            cmd.sqlstate = msg[1:6].decode("ascii", "replace")
            msg = msg[6:]
        text = redact_message(msg.decode("utf-8", "replace"))
        cmd.message = f"SQLSTATE {cmd.sqlstate}: {text}" if cmd.sqlstate else text

    def _done(self, seg: Segment, out: list[Operation]) -> None:
        cmd = self._pending.popleft()
        if cmd.kind != "other":
            out.append(self._export(cmd, seg.end_ns, None))

    # -- export -----------------------------------------------------------------------------------

    def _export(self, cmd: _Cmd, end_ns: int, failure: str | None) -> Operation:
        attrs: dict[str, AttrValue] = {"db.system.name": self._system}
        namespace = self._namespace
        opname: str | None = None
        coll: str | None = None
        if cmd.kind == "init_db":
            opname = "USE"
            namespace = cmd.schema if cmd.code is None else namespace
        elif cmd.text is not None:
            info = describe(cmd.text, "mysql")
            if info is UNREADABLE and cmd.text:
                self._count("unreadable_query_text")
            if info.text:
                attrs["db.query.text"] = info.text
            opname, coll = info.operation, info.collection
            if cmd.kind == "prepare":
                opname = "PREPARE"  # the statement's own operation runs at its executes
            if info.statements > 1:
                attrs["db.operation.batch.size"] = info.statements
        if namespace:
            attrs["db.namespace"] = namespace
        if opname:
            attrs["db.operation.name"] = opname
        if coll:
            attrs["db.collection.name"] = coll
        if cmd.kind in ("query", "execute") and cmd.code is None and cmd.results == 1 and cmd.resultset and not cmd.cut:
            attrs["db.response.returned_rows"] = cmd.rows
        error, message = failure, None
        if failure == "no_response":
            message = "the connection ended before the response"
        if cmd.code is not None:
            attrs["db.response.status_code"] = str(cmd.code)
            error, message = str(cmd.code), cmd.message
        target = coll or namespace
        name = f"{opname} {target}" if opname and target else opname or target or self._system
        return Operation(protocol="mysql", client=bool(self._client_egress), start_ns=cmd.start_ns,
                         end_ns=max(end_ns, cmd.start_ns), name=name, attributes=attrs, error=error,
                         error_message=message, pid=cmd.pid, tid=cmd.tid, req_pos=cmd.req_pos)
