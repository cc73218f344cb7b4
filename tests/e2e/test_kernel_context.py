"""The W3C traceparent parsed in the kernel, on the real kernel: a client request that carries one
(an instrumented application's) joins that trace with that span as its parent; a malformed one
(version ff, upper-case hex, an all-zero id, a short value) is ignored and the request starts a
trace of its own. Header names are case-insensitive, the value may follow optional whitespace,
and the header may sit anywhere in the captured head.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from correlator.records import Exchange, ParentKind, Role
from tests.support.ebpf import on_load_error, require_ebpf
from tracer import records
from tracer.capabilities import probe
from tracer.capture import Capture, CaptureConfig, CaptureError

pytestmark = pytest.mark.ebpf

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exchanges() -> Iterator[tuple[list[Exchange], threading.Lock]]:
    require_ebpf()
    cap = Capture(CaptureConfig(pids={os.getpid()}, self_pid=0, families=[]), probe())
    try:
        cap.start()
    except CaptureError as exc:
        cap.close()
        on_load_error(exc, "capture")
    got: list[Exchange] = []
    lock = threading.Lock()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for raw in cap.poll(20):
                if records.record_type(raw) == records.REC_EXCHANGE:
                    ex = records.decode_exchange(raw)
                    with lock:
                        got.append(ex)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield got, lock
    finally:
        stop.set()
        t.join(5)
        cap.close()


def _request(header: str, padding: int = 0) -> int:
    """One request with `header` among its headers, to a loopback server answering 204; returns
    the client's local port."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(65536)
            c.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with socket.create_connection(srv.getsockname()) as c:
        pad = "".join(f"X-Pad-{i}: {'p' * 20}\r\n" for i in range(padding))
        c.sendall(f"GET /t HTTP/1.1\r\nHost: x\r\n{pad}{header}\r\n\r\n".encode())
        c.recv(1000)
        port = c.getsockname()[1]
    t.join(5)
    srv.close()
    return port


def _client_of(exchanges: tuple[list[Exchange], threading.Lock], port: int) -> Exchange:
    got, lock = exchanges
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            found = [e for e in got if e.role == Role.CLIENT and e.local_port == port]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no client exchange from port {port}")


@pytest.mark.parametrize(("header", "padding"), [
    (f"traceparent: 00-{TRACE}-{SPAN}-01", 0),
    (f"TraceParent:00-{TRACE}-{SPAN}-00", 0),
    (f"traceparent: \t00-{TRACE}-{SPAN}-01", 0),
    (f"traceparent: 00-{TRACE}-{SPAN}-01", 12),  # past the first 256 bytes of the head
], ids=["plain", "case-and-no-space", "whitespace", "deep-in-the-head"])
def test_a_valid_traceparent_names_the_trace_and_the_parent(exchanges: tuple[list[Exchange], threading.Lock],
                                                            header: str, padding: int) -> None:
    ex = _client_of(exchanges, _request(header, padding))
    assert ex.kernel_ids and ex.parent is not None and ex.parent.kind == ParentKind.TRACEPARENT
    assert ex.trace_id.hex() == TRACE and ex.parent_span_id.hex() == SPAN and ex.remote_parent


@pytest.mark.parametrize("header", [
    f"traceparent: ff-{TRACE}-{SPAN}-01",
    f"traceparent: 00-{TRACE.upper()}-{SPAN}-01",
    f"traceparent: 00-{'0' * 32}-{SPAN}-01",
    f"traceparent: 00-{TRACE}-{'0' * 16}-01",
    f"traceparent: 00-{TRACE}-{SPAN}",
    f"x-traceparent: 00-{TRACE}-{SPAN}-01",
], ids=["version-ff", "upper-case", "zero-trace", "zero-span", "short", "other-header"])
def test_a_malformed_traceparent_is_ignored(exchanges: tuple[list[Exchange], threading.Lock], header: str) -> None:
    ex = _client_of(exchanges, _request(header))
    assert ex.kernel_ids and ex.parent is None and not ex.remote_parent
    assert ex.trace_id.hex() != TRACE and any(ex.trace_id)
