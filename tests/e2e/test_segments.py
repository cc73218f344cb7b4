"""The kernel's segment path for the protocols beyond HTTP/1, on the real kernel: a connection whose
first bytes open Redis, PostgreSQL, MySQL or HTTP/2 (or that talks to their well-known port) reaches
user space as bounded segment records, each with its direction, its true length, the first 512
bytes, a per-connection sequence number, a record at close, and, on a client's write, the trace
the request joins by the kernel's parent rules.

The peers here are plain sockets speaking each protocol's first bytes: what is under test is the
kernel's recognition and copy, not the protocols (the decoders have their own tests with real
servers).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from correlator.segments import PROTO_HTTP2, PROTO_MYSQL, PROTO_POSTGRES, PROTO_REDIS, SegmentRecord
from tests.support.ebpf import on_load_error, require_ebpf
from tracer import records
from tracer.capabilities import probe
from tracer.capture import Capture, CaptureConfig, CaptureError

pytestmark = pytest.mark.ebpf

REDIS_PING = b"*1\r\n$4\r\nPING\r\n"
PG_STARTUP = (len(b"\0\0\0\0\0\x03\0\0user\0kspan\0database\0orders\0\0")).to_bytes(4, "big") + \
    b"\x00\x03\x00\x00user\0kspan\0database\0orders\0\0"
MYSQL_GREETING = bytes([74, 0, 0, 0, 10]) + b"10.11.19-MariaDB\0" + b"\0" * 56
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Segments:
    def __init__(self) -> None:
        require_ebpf()
        # this process and its threads only: the kernel's pid filter
        self.cap = Capture(CaptureConfig(pids={os.getpid()}, self_pid=0, families=[]), probe())
        try:
            self.cap.start()
        except CaptureError as exc:
            self.cap.close()
            on_load_error(exc, "capture")
        self.recs: list[SegmentRecord] = []
        self.exchanges: list[records.Exchange] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for raw in self.cap.poll(20):
                kind = records.record_type(raw)
                with self._lock:
                    if kind == records.REC_SEGMENT:
                        self.recs.append(records.decode_segment(raw))
                    elif kind == records.REC_EXCHANGE:
                        self.exchanges.append(records.decode_exchange(raw))

    def wait(self, pred: Callable[[list[SegmentRecord]], bool], timeout_s: float = 10.0) -> list[SegmentRecord]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                got = list(self.recs)
            if pred(got):
                return got
            time.sleep(0.05)
        raise AssertionError(f"segments missing: {[(r.proto, r.client, r.seg.data[:16]) for r in got]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.cap.close()


@pytest.fixture(scope="module")
def segs() -> Iterator[Segments]:
    s = Segments()
    try:
        yield s
    finally:
        s.close()


def _server(first_reply: bytes | None, replies: int = 1) -> tuple[socket.socket, threading.Thread]:
    """A loopback listener that (for MySQL) greets first, then answers each read with `OK`."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        c, _ = srv.accept()
        with c:
            if first_reply:
                c.sendall(first_reply)
            for _ in range(replies):
                if not c.recv(65536):
                    break
                c.sendall(b"+OK\r\n")
            c.recv(1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def _conversation(first: bytes | None, client_sends: list[bytes]) -> tuple[int, int]:
    srv, t = _server(first, len(client_sends))
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    local = c.getsockname()[1]
    if first:
        c.recv(65536)
    for data in client_sends:
        c.sendall(data)
        c.recv(65536)
    c.close()
    t.join(5)
    srv.close()
    return local, port


def _of(recs: list[SegmentRecord], port: int) -> list[SegmentRecord]:
    return [r for r in recs if r.local_port == port or r.remote_port == port]


@pytest.mark.parametrize(("proto", "first", "sends"), [
    (PROTO_REDIS, None, [REDIS_PING, REDIS_PING]),
    (PROTO_POSTGRES, None, [PG_STARTUP, b"Q\0\0\0\x0dselect 1\0"]),
    (PROTO_MYSQL, MYSQL_GREETING, [b"\x05\0\0\0\x03ping"]),
    (PROTO_HTTP2, None, [H2_PREFACE + b"\0\0\0\x04\0\0\0\0\0"]),
], ids=["redis", "postgresql", "mysql", "http2"])
def test_first_bytes_open_a_protocol_and_every_transfer_becomes_a_segment(
        segs: Segments, proto: int, first: bytes | None, sends: list[bytes]) -> None:
    local, port = _conversation(first, sends)
    transfers = len(sends) * 2 + (1 if first else 0)

    def done(recs: list[SegmentRecord]) -> bool:
        mine = _of(recs, port)
        return sum(1 for r in mine if r.closed) >= 2 and sum(1 for r in mine if not r.closed) >= 2 * transfers

    mine = _of(segs.wait(done), port)
    client = [r for r in mine if r.local_port == local]
    server = [r for r in mine if r.local_port == port]
    for end, is_client in ((client, True), (server, False)):
        data = [r for r in end if not r.closed]
        assert len(data) == transfers, [(r.seg.egress, r.seg.data[:12]) for r in data]
        assert {r.proto for r in end} == {proto}
        assert all(r.client == is_client for r in end), "the end is told by the protocol's first bytes"
        assert [r.seq for r in end] == list(range(len(end))), "one sequence per connection, a close last"
        assert end[-1].closed and not end[-1].seg.data
        # each end's own writes are egress; the bytes are the ones sent, in order
        greeting = [first] if first else []
        replies = [b"+OK\r\n"] * len(sends)
        wrote = [r.seg.data for r in data if r.seg.egress]
        read = [r.seg.data for r in data if not r.seg.egress]
        assert (wrote, read) == ((sends, greeting + replies) if is_client else (greeting + replies, sends))
        assert all(r.seg.length == len(r.seg.data) for r in data)


def test_a_transfer_longer_than_the_copy_keeps_its_true_length(segs: Segments) -> None:
    big = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5000\r\n" + b"v" * 5000 + b"\r\n"
    local, port = _conversation(None, [big])
    mine = _of(segs.wait(lambda recs: any(r.seg.length == len(big) for r in _of(recs, port))), port)
    w = next(r for r in mine if r.seg.length == len(big) and r.local_port == local)
    assert len(w.seg.data) == 512 and w.seg.truncated and w.seg.data == big[:512]


def test_a_scattered_write_is_gathered_from_its_iovecs(segs: Segments) -> None:
    """gRPC's C core writes a frame as many small slices in one sendmsg: the copy gathers them."""
    srv, t = _server(None, 2)
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    local = c.getsockname()[1]
    c.sendall(REDIS_PING)  # the connection's first bytes open the protocol
    c.recv(100)
    parts = [REDIS_PING[:4], REDIS_PING[4:]] + [bytes([65 + i]) * 7 for i in range(40)]
    c.sendmsg(parts)
    c.recv(100)
    c.close()
    t.join(5)
    srv.close()
    want = b"".join(parts)
    mine = _of(segs.wait(lambda recs: any(r.local_port == local and r.seg.length == len(want) for r in recs)), port)
    w = next(r for r in mine if r.local_port == local and r.seg.length == len(want))
    assert w.seg.data == want and w.proto == PROTO_REDIS


def test_a_connection_to_a_well_known_port_picked_up_mid_stream(segs: Segments) -> None:
    """No first bytes to go by (the connection began before kspan): port 6379 is the hint."""
    try:
        srv = socket.create_server(("127.0.0.1", 6379))
    except OSError as e:
        pytest.fail(f"port 6379 is busy on this machine ({e}): the hint needs it")
    with srv:
        c = socket.create_connection(("127.0.0.1", 6379))
        s, _ = srv.accept()
        local = c.getsockname()[1]
        c.sendall(b"$5\r\nhello\r\n")  # the middle of a reply stream: not a command's first bytes
        s.recv(100)
        c.close()
        s.close()
    mine = _of(segs.wait(lambda recs: any(r.local_port == local and r.closed for r in recs)), local)
    client = [r for r in mine if r.local_port == local]
    assert client[0].proto == PROTO_REDIS and client[0].client and client[0].seg.data == b"$5\r\nhello\r\n"


def test_a_client_call_from_a_thread_serving_a_request_joins_its_trace(segs: Segments) -> None:
    """The thread rule, as for HTTP: a Redis command written by the thread serving an HTTP request
    carries that request's trace and span as its parent."""
    rsrv, rt = _server(None, 1)
    rport = rsrv.getsockname()[1]

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            with socket.create_connection(("127.0.0.1", rport)) as r:
                r.sendall(REDIS_PING)
                r.recv(100)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    hport = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", hport)) as c:
            c.sendall(b"GET /cart HTTP/1.1\r\nHost: x\r\n\r\n")
            c.recv(1000)
        recs = segs.wait(lambda rs: any(r.remote_port == rport and r.seg.egress and r.trace_id for r in rs))
        deadline = time.monotonic() + 10
        server = None
        while time.monotonic() < deadline and server is None:
            with segs._lock:
                server = next((e for e in segs.exchanges if e.local_port == hport and e.role == 2), None)
            time.sleep(0.05)
        assert server is not None and server.kernel_ids
        cmd = next(r for r in recs if r.remote_port == rport and r.seg.egress)
        assert cmd.trace_id == server.trace_id and cmd.parent_span_id == server.span_id
        assert cmd.parent_kind == 1  # thread
    finally:
        httpd.shutdown()
        rt.join(5)
        rsrv.close()


def test_both_ends_of_a_local_connection_place_each_byte_alike(segs: Segments) -> None:
    """Each transfer carries the TCP sequence number of its first byte, the same on both ends of
    the connection; a server's read carries the trace of the local client's write that began last
    before the read's end (published at the write's entry), so user space can make the server's
    request the client's child without waiting for anything."""
    mask = 0xFFFFFFFF
    cmds = [REDIS_PING, b"*1\r\n$4\r\nINFO\r\n", b"*1\r\n$4\r\nTIME\r\n"]
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = srv.accept()
        c.sendall(cmds[0])  # opens the protocol: its trace is decided at the write's entry too
        assert s.recv(100) == cmds[0]
        c.sendall(cmds[1])  # two writes before the server reads: each its own trace (a root)
        c.sendall(cmds[2])
        want, got = b"".join(cmds[1:]), b""
        while len(got) < len(want):
            got += s.recv(100)
        s.sendall(b"+OK\r\n")
        c.recv(100)
        c.close()
        s.close()
    mine = _of(segs.wait(lambda recs: sum(r.closed for r in _of(recs, port)) >= 2), port)
    writes = [r for r in mine if r.client and r.seg.egress and not r.closed]
    reads = [r for r in mine if not r.client and not r.seg.egress and not r.closed]
    assert [w.seg.data for w in writes] == cmds
    assert all(r.seq_known for r in writes + reads)
    for a, b in zip(writes, writes[1:], strict=False):
        assert b.seg.pos == (a.seg.pos + a.seg.length) & mask
    assert reads[0].seg.pos == writes[0].seg.pos
    assert b"".join(r.seg.data for r in reads) == b"".join(cmds)
    assert len({w.trace_id for w in writes}) == 3
    for r in reads:
        end = (r.seg.pos + r.seg.length) & mask
        before = [w for w in writes if 0 < ((end - w.seg.pos) & mask) < 1 << 30]
        latest = min(before, key=lambda w: (end - w.seg.pos) & mask)
        assert r.peer and r.ctx_seq == latest.seg.pos and r.trace_id == latest.trace_id, (r, latest)
        assert r.ctx_end == end
    # the server's reply is placed on its own stream, which the client reads alike, and looks
    # again up to what the server had read (for a first write not recognised at its entry)
    reply = next(r for r in mine if not r.client and r.seg.egress)
    got_reply = next(r for r in mine if r.client and not r.seg.egress and not r.closed)
    assert reply.seq_known and got_reply.seg.pos == reply.seg.pos
    read_to = (reads[-1].seg.pos + reads[-1].seg.length) & mask
    assert reply.peer and reply.ctx_end == read_to and reply.trace_id == writes[-1].trace_id


def test_a_connections_first_write_is_tied_to_the_server_before_it_returns(segs: Segments) -> None:
    """On loopback the server may read (and answer) a connection's first command while the
    client's write is still in the kernel: the woken server preempts the writer. A first write
    whose bytes open a client protocol publishes its trace at the write's entry, so a read made
    while the write is blocked (a large command through small socket buffers) is already tied to
    it."""
    value = b"x" * (4 << 20)
    first = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n"
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # inherited by the accepted socket
        port = srv.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s, _ = srv.accept()
        writer = threading.Thread(target=c.sendall, args=(first,), daemon=True)
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive(), "the write should still be blocked in the kernel"
        got = s.recv(65536)  # read while the client's write has not returned
        while len(got) < len(first):
            got += s.recv(1 << 20)
        writer.join(10)
        s.sendall(b"+OK\r\n")
        c.recv(100)
        c.close()
        s.close()
    mine = _of(segs.wait(lambda recs: sum(r.closed for r in _of(recs, port)) >= 2), port)
    write = next(r for r in mine if r.client and r.seg.egress and not r.closed)
    reads = [r for r in mine if not r.client and not r.seg.egress and not r.closed]
    assert reads and reads[0].seg.pos == write.seg.pos
    assert reads[0].peer, "the first read was made before the write returned: tied at the write's entry"
    assert reads[0].ctx_seq == write.seg.pos and reads[0].trace_id == write.trace_id


def test_only_a_connections_first_bytes_open_it_from_its_start(segs: Segments) -> None:
    """Any Redis command looks like a connection's first bytes: a protocol is taken as seen from
    its start (the decoder may assume the defaults a new connection has, e.g. database 0) only
    when nothing had crossed the connection in that direction before."""
    starts = {}
    for name, before in (("fresh", b""), ("picked_up", b"hello there\n")):
        with socket.create_server(("127.0.0.1", 0)) as srv:
            c = socket.create_connection(srv.getsockname())
            s, _ = srv.accept()
            if before:
                c.sendall(before)  # not a protocol's first bytes: no state yet
                assert s.recv(100) == before
            c.sendall(REDIS_PING)
            assert s.recv(100) == REDIS_PING
            local = c.getsockname()[1]
            c.close()
            s.close()
        mine = segs.wait(lambda recs, p=local: sum(r.closed for r in _of(recs, p)) >= 2)
        firsts = [r for r in _of(mine, local) if r.seq == 0]
        assert {(r.client, r.seg.data) for r in firsts} == {(True, REDIS_PING), (False, REDIS_PING)}, firsts
        starts[name] = {r.from_start for r in firsts}
    assert starts == {"fresh": {True}, "picked_up": {False}}


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def _copied(rec: SegmentRecord) -> dict[int, bytes]:
    """A frame-walked transfer's copied bytes by their offset in the transfer."""
    return {(p.pos - rec.seg.pos) & 0xFFFFFFFF: p.data for p in rec.pieces}


def test_http2_transfers_are_walked_frame_by_frame(segs: Segments) -> None:
    """The kernel copies every HTTP/2 frame header and every payload but DATA's, wherever they fall
    in a transfer: a response's trailers after a large message, a frame header cut between two
    writes, a HEADERS payload continued in the next write, a frame scattered over many iovecs."""
    headers = _frame(1, 4, 1, b"h" * 20)
    body = _frame(0, 0, 1, b"\xdd" * 3000)
    trailers = _frame(1, 5, 1, b"t" * 30)
    cut = _frame(0, 0, 3, b"\xdd" * 100)  # its header is cut 4 bytes in by the first write's end
    cont = _frame(1, 4, 3, b"c" * 60)  # its payload continues into the third write
    pieces = [_frame(1, 4, 5, b"")[:9]] + [bytes([i]) * 7 for i in range(10)]  # header + 10 slices
    writes = [H2_PREFACE + _frame(4, 0, 0, b""), headers + body + trailers]
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        local = c.getsockname()[1]
        c.sendall(writes[0])
        c.sendall(writes[1])
        c.sendall(cut[:4])
        c.sendall(cut[4:] + cont[:30])
        c.sendall(cont[30:])
        scattered = _frame(1, 4, 5, b"".join(pieces[1:]))
        c.sendmsg([scattered[:9], *pieces[1:]])
        got, want = b"", b"".join(writes) + cut + cont + scattered
        while len(got) < len(want):
            got += s.recv(65536)
        c.close()
        s.close()
    mine = segs.wait(lambda recs: sum(r.closed for r in _of(recs, local)) >= 2)
    sent = [r for r in _of(mine, local) if r.client and r.seg.egress and not r.closed]
    assert [r.seg.length for r in sent] == [len(writes[0]), len(writes[1]), 4, len(cut) - 4 + 30, len(cont) - 30,
                                            len(scattered)]
    assert all(r.pieces for r in sent)
    assert _copied(sent[0]) == {0: H2_PREFACE, 24: _frame(4, 0, 0, b"")}  # the preface is not a frame
    big = _copied(sent[1])
    t_at = len(headers) + len(body)
    assert big == {0: headers, len(headers): body[:9], t_at: trailers}  # no DATA payload byte
    assert _copied(sent[2]) == {0: cut[:4]}
    assert _copied(sent[3]) == {0: cut[4:9], 5 + 100: cont[:30]}
    assert _copied(sent[4]) == {0: cont[30:]}
    assert _copied(sent[5]) == {0: scattered}
    # the server's reads are walked alike: every frame header and non-DATA payload it read
    read = b"".join(p.data for r in _of(mine, local) if not r.client and not r.seg.egress for p in r.pieces)
    for part in (H2_PREFACE, headers, body[:9], trailers, cont, scattered):
        assert part in read
    assert b"\xdd" * 64 not in read
