"""Connections older than the agent, on the real kernel: no first bytes to recognise them by, so
the well-known server ports (PostgreSQL 5432, MySQL 3306) are the hint, and HTTP/2, which has
none, is recognised by a transfer of whole frames. Their first segments say they were picked up
mid-stream (not `from_start`), so no decoder assumes a new connection's defaults.

The connections are opened before this module's capture starts: the kernel has seen neither
their handshakes nor their addresses (no inet_sock_set_state event), only the transfers after.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from correlator.segments import PROTO_HTTP2, PROTO_MYSQL, PROTO_POSTGRES, SegmentRecord
from tests.support.ebpf import on_load_error, require_ebpf
from tracer import records
from tracer.capabilities import probe
from tracer.capture import Capture, CaptureConfig, CaptureError

pytestmark = pytest.mark.ebpf


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


class Pair:
    """A connected client and server socket, opened before the capture."""

    def __init__(self, port: int) -> None:
        try:
            self.srv = socket.create_server(("127.0.0.1", port))
        except OSError as e:
            pytest.fail(f"port {port} is busy on this machine ({e}): the port hint needs it")
        self.port = self.srv.getsockname()[1]
        self.client = socket.create_connection(("127.0.0.1", self.port))
        self.server, _ = self.srv.accept()
        self.local = self.client.getsockname()[1]

    def exchange(self, request: bytes, reply: bytes) -> None:
        self.client.sendall(request)
        got = b""
        while len(got) < len(request):
            got += self.server.recv(65536)
        self.server.sendall(reply)
        got = b""
        while len(got) < len(reply):
            got += self.client.recv(65536)

    def close(self) -> None:
        for s in (self.client, self.server, self.srv):
            s.close()


@pytest.fixture(scope="module")
def picked() -> Iterator[tuple[dict[str, Pair], list[SegmentRecord]]]:
    require_ebpf()
    pairs = {"postgres": Pair(5432), "mysql": Pair(3306), "http2": Pair(0)}
    # traffic the agent never sees: the connections' starts
    pairs["postgres"].exchange(b"Q\0\0\0\x0dselect 1\0", b"Z\0\0\0\x05I")
    pairs["http2"].exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""), _frame(4, 0, 0, b""))
    cap = Capture(CaptureConfig(pids={os.getpid()}, self_pid=0, families=[]), probe())
    try:
        cap.start()
    except CaptureError as exc:
        cap.close()
        for p in pairs.values():
            p.close()
        on_load_error(exc, "capture")
    recs: list[SegmentRecord] = []
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            for raw in cap.poll(20):
                if records.record_type(raw) == records.REC_SEGMENT:
                    recs.append(records.decode_segment(raw))

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        pairs["postgres"].exchange(b"Q\0\0\0\x0dselect 2\0", b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I")
        pairs["mysql"].exchange(b"\x09\0\0\0\x03select 1", b"\x07\0\0\x01\0\0\0\x02\0\0\0")
        pairs["http2"].exchange(_frame(1, 5, 1, b"\x83\x86") + _frame(8, 0, 0, b"\0\0\x10\0"),
                                _frame(1, 5, 1, b"\x88"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len({r.seg.conn_id for r in recs}) < 6:
            time.sleep(0.05)
        yield pairs, list(recs)
    finally:
        stop.set()
        t.join(5)
        cap.close()
        for p in pairs.values():
            p.close()


@pytest.mark.parametrize(("name", "proto"), [("postgres", PROTO_POSTGRES), ("mysql", PROTO_MYSQL),
                                             ("http2", PROTO_HTTP2)])
def test_a_connection_older_than_the_agent_is_picked_up(picked: tuple[dict[str, Pair], list[SegmentRecord]],
                                                        name: str, proto: int) -> None:
    pairs, recs = picked
    p = pairs[name]
    mine = [r for r in recs if p.local in (r.local_port, r.remote_port) and p.port in (r.local_port, r.remote_port)]
    ends = {(r.client, r.local_port) for r in mine}
    assert ends == {(True, p.local), (False, p.port)}, [(r.client, r.local_port, r.proto) for r in mine]
    assert {r.proto for r in mine} == {proto}
    first = [r for r in mine if r.seq == 0]
    assert len(first) == 2 and not any(r.from_start for r in first), first
    # the addresses came from the socket itself (no state-change event was seen)
    assert all(r.family and r.remote_addr == "127.0.0.1" for r in mine)
