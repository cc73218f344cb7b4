"""The kernel capture end to end: a real Capture on this kernel, real servers and real clients
(curl, Python http.client), the records read back and checked field by field."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from correlator.records import EndReason, Exchange, ParentKind, Role
from tests.support.ebpf import fail_or_skip, on_load_error, require_ebpf
from tracer.capabilities import probe
from tracer.capture import Capture, CaptureConfig, CaptureError
from tracer.records import REC_EXCHANGE, RawExchange, decode_exchange, record_type

pytestmark = pytest.mark.ebpf

BODY = b"x" * 1500

SERVER = textwrap.dedent(
    '''
    import socket, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    BODY = b"x" * 1500

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n)
            self.send_response(201)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.startswith("/chunked"):
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (b"hello ", b"chunked ", b"world"):
                    self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(part), part))
                    self.wfile.flush()
                    time.sleep(0.01)
                self.wfile.write(b"0\\r\\n\\r\\n")
            elif self.path.startswith("/close-mid"):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"partial body")
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif self.path.startswith("/hang"):
                time.sleep(30)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

    class S(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET

        def server_bind(self):
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
            super().server_bind()

    srv = S((sys.argv[1], 0), H)
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
    '''
)

CLIENT = textwrap.dedent(
    '''
    import http.client, sys
    host, port, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for p in paths:
        method, _, path = p.partition(" ")
        body = b"payload-" * 100 if method == "POST" else None
        conn.request(method, path, body=body)
        r = conn.getresponse()
        r.read()
        print(r.status, flush=True)
    conn.close()
    '''
)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}{path}"


def _start_server(tmp: Path, host: str) -> Server:
    script = tmp / "capture_server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), host], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"test server on {host} did not start")
    return Server(proc, host, int(line))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capture")


def _start_capture(config: CaptureConfig) -> Capture:
    require_ebpf()
    cap = Capture(config, probe())
    try:
        cap.start()
    except CaptureError as exc:
        cap.close()
        on_load_error(exc, "capture")
    return cap


@pytest.fixture(scope="module")
def rec() -> Iterator[Recorder]:
    r = Recorder(_start_capture(CaptureConfig(response_timeout_s=1.0)))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def server4(tmp_module: Path, rec: Recorder) -> Iterator[Server]:
    srv = _start_server(tmp_module, "127.0.0.1")
    rec.watch(srv.port)
    try:
        yield srv
    finally:
        _stop(srv.proc)


@pytest.fixture(scope="module")
def server6(tmp_module: Path, rec: Recorder) -> Iterator[Server]:
    if not socket.has_ipv6:
        fail_or_skip("no IPv6 on this host")
    srv = _start_server(tmp_module, "::1")
    rec.watch(srv.port)
    try:
        yield srv
    finally:
        _stop(srv.proc)


class Recorder:
    """Drains a capture continuously in a thread (other work on this host may fill the ring
    buffer quickly) and keeps the exchanges that touch the test servers' ports."""

    def __init__(self, cap: Capture) -> None:
        self.cap = cap
        self.ports: set[int] = set()
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lport, rport = RawExchange.local_port.offset, RawExchange.remote_port.offset
        while not self._stop.is_set():
            batch = self.cap.poll(20)
            kept = []
            for raw in batch:
                # ports straight from the bytes: decoding every record of a busy host would be too slow
                if record_type(raw) != REC_EXCHANGE or (
                    int.from_bytes(raw[lport : lport + 2], "little") not in self.ports
                    and int.from_bytes(raw[rport : rport + 2], "little") not in self.ports
                ):
                    continue
                kept.append(decode_exchange(raw))
            if kept:
                with self._lock:
                    self.exchanges.extend(kept)

    def watch(self, port: int) -> None:
        self.ports.add(port)

    def clear(self) -> None:
        """Forget what earlier tests left behind (records of other captures' connections)."""
        with self._lock:
            self.exchanges = []

    def take(self, done: Callable[[list[Exchange]], bool], pids: set[int] | None = None,
             timeout_s: float = 5.0) -> list[Exchange]:
        """Wait until `done(exchanges of pids)`, then remove and return those exchanges. If it never
        is and the kernel lost records, the test cannot judge the capture: say so."""
        lost_before = self.cap.counters()["ringbuf_lost"]
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                mine = [e for e in self.exchanges if pids is None or e.pid in pids]
            if done(mine):
                break
            if time.monotonic() > deadline:
                lost = self.cap.counters()["ringbuf_lost"] - lost_before
                assert lost == 0, f"{lost} records lost in the ring buffer while waiting (host too busy?)"
                break
            time.sleep(0.02)
        with self._lock:
            self.exchanges = [e for e in self.exchanges if e not in mine]
        return mine

    def settle(self, pids: set[int] | None = None, wait_s: float = 0.5) -> list[Exchange]:
        """Whatever else arrives within wait_s (for checks that nothing more comes)."""
        time.sleep(wait_s)
        with self._lock:
            mine = [e for e in self.exchanges if pids is None or e.pid in pids]
            self.exchanges = [e for e in self.exchanges if e not in mine]
        return mine

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.cap.close()


def run_curl(*urls: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """curl in the background so its pid is known; returns (pid, stdout)."""
    outputs = [arg for url in urls for arg in ("-o", "/dev/null", url)]
    proc = subprocess.Popen(["curl", "-sS", "-w", "%{http_code} ", *extra, *outputs],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return proc.pid, out


def run_client(tmp: Path, server: Server, *requests: str) -> tuple[int, list[int]]:
    script = tmp / "capture_client.py"
    script.write_text(CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), server.host, str(server.port), *requests],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return proc.pid, [int(x) for x in out.split()]


def by_role(exs: list[Exchange], role: Role) -> list[Exchange]:
    return [e for e in exs if e.role == role]


def check_pair(client: Exchange, server: Exchange) -> None:
    """The two ends of one exchange on one TCP connection."""
    for ex in (client, server):
        assert ex.req_start_ns <= ex.req_end_ns <= ex.resp_start_ns <= ex.resp_end_ns, ex
        assert ex.family in (socket.AF_INET, socket.AF_INET6)
    assert client.req_bytes == server.req_bytes > 0
    assert client.resp_bytes == server.resp_bytes > 0
    assert client.req_head == server.req_head
    # the 4-tuples mirror each other
    assert (client.local_addr, client.local_port) == (server.remote_addr, server.remote_port)
    assert (client.remote_addr, client.remote_port) == (server.local_addr, server.local_port)
    assert client.conn_id != server.conn_id  # each end has its own socket
    # the server names the client's exchange as its peer parent
    assert server.parent is not None and server.parent.kind == ParentKind.PEER
    assert server.parent.pid == client.pid
    assert server.parent.exchange == client.id
    # the server read the request after the client began writing it, and answered before it was read
    assert client.req_start_ns <= server.req_start_ns
    assert server.resp_start_ns <= client.resp_end_ns


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_curl_get_seen_at_both_ends(rec: Recorder, request: pytest.FixtureRequest, family: str) -> None:
    rec.clear()
    server: Server = request.getfixturevalue("server4" if family == "ipv4" else "server6")
    pid, out = run_curl(server.url("/cl?q=1"))
    assert out.split() == ["200"]
    exs = rec.take(lambda g: len(g) >= 2, pids={pid, server.pid})
    clients = [e for e in by_role(exs, Role.CLIENT) if e.pid == pid]
    servers = [e for e in by_role(exs, Role.SERVER) if e.pid == server.pid]
    assert len(clients) == 1 and len(servers) == 1, exs
    c, s = clients[0], servers[0]
    for ex in (c, s):
        assert ex.end == EndReason.COMPLETE
        assert ex.status == 200
        assert ex.req_head.startswith(b"GET /cl?q=1 HTTP/1.1\r\n")
        assert ex.resp_head.startswith(b"HTTP/1.1 200 ")
        assert ex.resp_tail == BODY[-8:]
        assert ex.family == (socket.AF_INET if family == "ipv4" else socket.AF_INET6)
    assert c.remote_port == server.port and s.local_port == server.port
    assert c.remote_addr == server.host
    assert c.resp_bytes == len(c.resp_head.split(b"\r\n\r\n")[0]) + 4 + len(BODY)
    check_pair(c, s)


def test_dual_stack_server_pairs_with_ipv4_client(rec: Recorder, tmp_module: Path) -> None:
    rec.clear()
    server = _start_server(tmp_module, "::")
    rec.watch(server.port)
    try:
        pid, out = run_curl(f"http://127.0.0.1:{server.port}/dual")
        assert out.split() == ["200"]
        exs = rec.take(lambda g: len(g) >= 2, pids={pid, server.pid})
    finally:
        _stop(server.proc)
    c = next(e for e in exs if e.role == Role.CLIENT)
    s = next(e for e in exs if e.role == Role.SERVER)
    assert c.family == socket.AF_INET and s.family == socket.AF_INET6  # a v4-mapped address on the server
    assert s.remote_addr == "127.0.0.1"
    check_pair(c, s)


def test_connection_older_than_the_agent_gets_its_tuple(server4: Server, tmp_module: Path) -> None:
    script = tmp_module / "late_client.py"
    script.write_text(textwrap.dedent('''
        import http.client, sys
        conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
        conn.request("GET", "/before"); conn.getresponse().read()
        print(conn.sock.getsockname()[1], flush=True)
        sys.stdin.readline()
        conn.request("GET", "/after"); r = conn.getresponse(); r.read()
        print(r.status, flush=True)
    '''))
    proc = subprocess.Popen([sys.executable, str(script), server4.host, str(server4.port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        local_port = int(proc.stdout.readline())
        r = Recorder(_start_capture(CaptureConfig()))  # starts after the connection was made
        r.watch(server4.port)
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "200"
            exs = r.take(lambda g: len(g) >= 2, pids={proc.pid, server4.pid})
        finally:
            r.close()
    finally:
        _stop(proc)  # type: ignore[arg-type]
    assert sorted(e.role for e in exs) == [Role.CLIENT, Role.SERVER]
    c = next(e for e in exs if e.role == Role.CLIENT)
    s = next(e for e in exs if e.role == Role.SERVER)
    assert c.req_head.startswith(b"GET /after ") and c.end == EndReason.COMPLETE
    # no inet_sock_set_state was seen for this socket: the addresses come from struct sock_common
    assert (c.local_port, c.remote_port) == (local_port, server4.port)
    assert (c.local_addr, c.remote_addr) == ("127.0.0.1", "127.0.0.1")
    check_pair(c, s)


def test_keep_alive_one_record_per_request(rec: Recorder, server4: Server, tmp_module: Path) -> None:
    rec.clear()
    pid, statuses = run_client(tmp_module, server4, "GET /a", "POST /b", "GET /chunked", "HEAD /d", "GET /e")
    assert statuses == [200, 201, 200, 200, 200]
    exs = rec.take(lambda g: len(g) >= 10, pids={pid, server4.pid})
    clients = sorted(by_role([e for e in exs if e.pid == pid], Role.CLIENT), key=lambda e: e.req_start_ns)
    ports = {e.local_port for e in clients}
    servers = sorted((e for e in by_role(exs, Role.SERVER) if e.pid == server4.pid and e.remote_port in ports),
                     key=lambda e: e.req_start_ns)
    assert [e.req_head.split(b" ")[:2] for e in clients] == [
        [b"GET", b"/a"], [b"POST", b"/b"], [b"GET", b"/chunked"], [b"HEAD", b"/d"], [b"GET", b"/e"]]
    assert all(e.end == EndReason.COMPLETE for e in clients + servers), [(e.req_head[:12], e.end) for e in exs]
    assert len({e.conn_id for e in clients}) == 1, "one connection, kept alive"
    assert [e.status for e in clients] == [200, 201, 200, 200, 200]
    for c, s in zip(clients, servers, strict=True):
        check_pair(c, s)
    post = clients[1]
    head_len = post.req_head.index(b"\r\n\r\n") + 4
    assert post.req_bytes == head_len + 800  # the body is counted, not copied past the head
    assert post.resp_bytes > 800 and post.resp_tail == b"payload-"
    chunked = clients[2]
    assert chunked.resp_tail.endswith(b"0\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in chunked.resp_head
    head = clients[3]
    assert head.resp_bytes == len(head.resp_head)  # headers only
    # the records of one connection follow each other in time
    for a, b in zip(clients, clients[1:], strict=False):
        assert a.resp_end_ns <= b.req_start_ns


def test_curl_keep_alive_reuses_connection(rec: Recorder, server4: Server) -> None:
    rec.clear()
    pid, out = run_curl(server4.url("/one"), server4.url("/chunked"), server4.url("/three"))
    assert out.split() == ["200", "200", "200"]
    exs = rec.take(lambda g: len(g) >= 6, pids={pid, server4.pid})
    clients = [e for e in by_role(exs, Role.CLIENT) if e.pid == pid]
    assert len(clients) == 3 and len({e.conn_id for e in clients}) == 1
    assert len(by_role(exs, Role.SERVER)) == 3
    assert all(e.end == EndReason.COMPLETE for e in exs)


def test_expect_100_continue(rec: Recorder, server4: Server, tmp_module: Path) -> None:
    rec.clear()
    body = tmp_module / "body.bin"
    body.write_bytes(b"b" * 2000)
    pid, out = run_curl(server4.url("/upload"),
                        extra=("-H", "Expect: 100-continue", "--data-binary", f"@{body}"))
    assert out.split() == ["201"]
    exs = rec.take(lambda g: len(g) >= 2, pids={pid, server4.pid})
    assert {(e.role, e.end) for e in exs} == {(Role.CLIENT, EndReason.COMPLETE), (Role.SERVER, EndReason.COMPLETE)}
    for e in exs:
        assert e.interim_response, "the 100 Continue is flagged"
        assert e.status == 201 and e.resp_head.startswith(b"HTTP/1.1 201 ")  # the final response's head
        head_len = e.req_head.index(b"\r\n\r\n") + 4
        assert e.req_bytes == head_len + 2000  # the body sent after the interim response
        assert e.resp_bytes == e.resp_head.index(b"\r\n\r\n") + 4 + 2000
        assert e.req_start_ns <= e.req_end_ns <= e.resp_start_ns <= e.resp_end_ns


def test_head_request_completes_at_end_of_headers(rec: Recorder, server4: Server) -> None:
    rec.clear()
    pid, out = run_curl(server4.url("/cl"), extra=("-I",))
    assert out.split() == ["200"]
    exs = rec.take(lambda g: len(g) >= 2, pids={pid, server4.pid})
    assert {(e.role, e.end) for e in exs} == {(Role.CLIENT, EndReason.COMPLETE), (Role.SERVER, EndReason.COMPLETE)}
    for e in exs:
        assert e.req_head.startswith(b"HEAD /cl ")
        assert b"Content-Length: 1500" in e.resp_head
        assert e.resp_bytes == len(e.resp_head)


def test_server_closing_mid_response_gives_closed(rec: Recorder, server4: Server) -> None:
    rec.clear()
    proc = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", server4.url("/close-mid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=30) != 0  # curl saw the short body
    exs = rec.take(lambda g: len(g) >= 2, pids={proc.pid, server4.pid})
    ends = {(e.pid, e.role, e.end) for e in exs}
    assert ends == {(proc.pid, Role.CLIENT, EndReason.CLOSED), (server4.pid, Role.SERVER, EndReason.CLOSED)}, exs
    for e in exs:
        assert e.req_head.startswith(b"GET /close-mid ")
        assert e.status == 200 and e.resp_start_ns > 0 and 0 < e.resp_bytes < 100000


def test_request_without_response_is_swept_as_timeout(rec: Recorder, server4: Server) -> None:
    rec.clear()
    proc = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-m", "20", server4.url("/hang")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert rec.settle({proc.pid}, 0.2) == []  # nothing to emit yet
        swept: list[Exchange] = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and len(swept) < 2:
            time.sleep(0.3)
            swept += [e for e in map(decode_exchange, rec.cap.sweep(time.monotonic_ns()))
                      if e.pid in (proc.pid, server4.pid)]
        assert {(e.role, e.pid) for e in swept} == {(Role.CLIENT, proc.pid), (Role.SERVER, server4.pid)}
        for e in swept:
            assert e.end == EndReason.TIMEOUT
            assert e.resp_start_ns == 0 and e.resp_bytes == 0
            assert e.req_head.startswith(b"GET /hang ")
            assert time.monotonic_ns() - e.req_end_ns >= 1_000_000_000  # response_timeout_s=1.0
        # taken out of the kernel: a second sweep does not return them again
        again = [decode_exchange(r) for r in rec.cap.sweep(time.monotonic_ns())]
        assert [e for e in again if e.pid in (proc.pid, server4.pid)] == []
    finally:
        _stop(proc)  # type: ignore[arg-type]
    assert rec.cap.counters()["timeouts_swept"] >= 2


def test_agent_own_traffic_is_never_traced(rec: Recorder, server4: Server) -> None:
    rec.clear()
    assert rec.cap.config.self_pid == os.getpid()
    filtered_before = rec.cap.counters()["requests_filtered"]
    with socket.create_connection((server4.host, server4.port)) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(b"GET /self HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    exs = rec.settle(None, 1.0)
    assert [e for e in exs if e.pid == os.getpid()] == []
    assert [e for e in exs if e.req_head.startswith(b"GET /self ")] == [], "the receiving end is filtered too"
    assert not [e for e in exs if e.remote_port == local_port]
    assert rec.cap.counters()["requests_filtered"] > filtered_before


def test_port_filter(server4: Server, tmp_module: Path) -> None:
    other = _start_server(tmp_module, "127.0.0.1")
    r = Recorder(_start_capture(CaptureConfig(ports={server4.port})))
    r.watch(server4.port)
    r.watch(other.port)
    try:
        p1, _ = run_curl(server4.url("/wanted"))
        p2, _ = run_curl(other.url("/unwanted"))
        exs = r.take(lambda g: len(g) >= 2, pids={p1, p2, server4.pid, other.pid})
        exs += r.settle({p1, p2, server4.pid, other.pid}, 0.5)
        assert sorted((e.pid, e.role) for e in exs) == sorted([(p1, Role.CLIENT), (server4.pid, Role.SERVER)])
    finally:
        r.close()
        _stop(other.proc)


def test_pid_filter(server4: Server) -> None:
    r = Recorder(_start_capture(CaptureConfig(pids={server4.pid})))
    r.watch(server4.port)
    try:
        pid, _ = run_curl(server4.url("/only-server"))
        exs = r.take(lambda g: len(g) >= 1)
        exs += r.settle(None, 0.5)
        assert [e for e in exs if e.pid == pid] == [], "curl is not in --pid"
        assert len(exs) == 1 and exs[0].pid == server4.pid
        assert exs[0].role == Role.SERVER and exs[0].end == EndReason.COMPLETE
        assert exs[0].req_head.startswith(b"GET /only-server ")
    finally:
        r.close()


def test_exe_filter_traces_processes_started_later(server4: Server) -> None:
    r = Recorder(_start_capture(CaptureConfig(exe_names={"curl"})))
    r.watch(server4.port)
    try:
        pid, _ = run_curl(server4.url("/by-exe"))  # exec'd after the capture started
        exs = r.take(lambda g: len(g) >= 1)
        exs += r.settle(None, 0.5)
        assert [(e.pid, e.role) for e in exs] == [(pid, Role.CLIENT)], "curl only, not the python server"
        assert exs[0].req_head.startswith(b"GET /by-exe ") and exs[0].end == EndReason.COMPLETE
    finally:
        r.close()


def test_capture_close_detaches_everything() -> None:
    cap = _start_capture(CaptureConfig(network_events=False))
    assert cap.probes_attached >= 10
    assert cap.counters()["probes_attached"] == cap.probes_attached
    cap.close()
    cap.close()  # idempotent
    assert not cap.started and cap.poll(10) == []


# -- messages split at any byte ------------------------------------------------------------------

# A client on one keep-alive connection (TCP_NODELAY): each request is a list of fragments, each
# fragment one send() with a pause after it, so every fragment is its own transfer at both ends.
RAW_CLIENT = textwrap.dedent(
    '''
    import json, socket, sys, time
    host, port, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    for fragments, expect_response in plan:
        for f in fragments:
            sock.sendall(f.encode("latin-1"))
            time.sleep(0.02)
        if not expect_response:
            continue
        while b"\\r\\n\\r\\n" not in buf:
            buf += sock.recv(65536)
        head, _, buf = buf.partition(b"\\r\\n\\r\\n")
        length = 0
        for line in head.split(b"\\r\\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buf) < length:
            buf += sock.recv(65536)
        buf = buf[length:]
        print(head.split(b" ")[1].decode(), flush=True)
    time.sleep(0.1)
    sock.close()
    '''
)

# "split": every response written in three pieces, the status line split after "HT";
# "sink": reads and discards (a connection that is not HTTP).
RAW_SERVER = textwrap.dedent(
    '''
    import socket, sys, threading, time
    mode = sys.argv[1]
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    print(srv.getsockname()[1], flush=True)

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            data = c.recv(65536)
            if not data:
                break
            if mode == "sink":
                continue
            buf += data
            while b"\\r\\n\\r\\n" in buf:
                _, buf = buf.split(b"\\r\\n\\r\\n", 1)
                # pauses before each piece: the client is back in recv() when it arrives (after
                # its own last send it sleeps 0.02 s), so each piece is one read there too
                for part in (b"HT", b"TP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n", b"ok"):
                    time.sleep(0.05)
                    c.sendall(part)
        c.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    '''
)

WHOLE = "GET /whole HTTP/1.1\r\nHost: x\r\n\r\n"
SPLIT = ["GE", "T /x HT", "TP/1.1\r\nHo", "st: x\r\n", "\r\n"]
EVERY_BYTE = "POST /bytes HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd"


def run_raw_client(tmp: Path, host: str, port: int, plan: list[tuple[list[str], bool]]) -> tuple[int, list[int]]:
    script = tmp / "raw_client.py"
    script.write_text(RAW_CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), host, str(port), json.dumps(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc.pid, [int(x) for x in out.split()]


@pytest.fixture
def raw_server(tmp_module: Path, rec: Recorder, request: pytest.FixtureRequest) -> Iterator[Server]:
    script = tmp_module / "raw_server.py"
    script.write_text(RAW_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), request.param], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    srv = Server(proc, "127.0.0.1", int(proc.stdout.readline()))
    rec.watch(srv.port)
    try:
        yield srv
    finally:
        _stop(proc)


def _pairs(exs: list[Exchange], client_pid: int, server_pid: int) -> list[tuple[Exchange, Exchange]]:
    """(client, server) per request, in request order; exactly one exchange per request per end."""
    clients = sorted((e for e in exs if e.pid == client_pid), key=lambda e: e.req_start_ns)
    servers = sorted((e for e in exs if e.pid == server_pid), key=lambda e: e.req_start_ns)
    assert [e.role for e in clients] == [Role.CLIENT] * len(clients)
    assert [e.role for e in servers] == [Role.SERVER] * len(servers)
    assert len(clients) == len(servers), [(e.pid, e.req_head[:16]) for e in exs]
    return list(zip(clients, servers, strict=True))


def test_request_split_at_any_byte_is_one_exchange(rec: Recorder, server4: Server, tmp_module: Path) -> None:
    rec.clear()
    plan = [([WHOLE], True), (SPLIT, True), (list(EVERY_BYTE), True)]
    pid, statuses = run_raw_client(tmp_module, server4.host, server4.port, plan)
    assert statuses == [200, 200, 201]
    exs = rec.take(lambda g: len(g) >= 6, pids={pid, server4.pid})
    exs += rec.settle({pid, server4.pid}, 0.3)  # and nothing more: one exchange per request per end
    pairs = _pairs(exs, pid, server4.pid)
    assert len(pairs) == 3
    assert len({c.conn_id for c, _ in pairs}) == 1, "one connection, kept alive"
    requests = [WHOLE, "".join(SPLIT), EVERY_BYTE]
    fragments = [1, len(SPLIT), len(EVERY_BYTE)]
    for (client, server), req, nfrag, status in zip(pairs, requests, fragments, (200, 200, 201), strict=True):
        for e in (client, server):
            assert e.end == EndReason.COMPLETE, e
            assert e.req_head == req.encode(), e.req_head  # from the first fragment on, all of it
            assert e.req_bytes == len(req)
            assert e.status == status
            assert e.resp_head.startswith(b"HTTP/1.1 %d " % status)
            if nfrag > 1:
                # the request starts at its first fragment: the pauses between fragments are inside it
                assert e.req_end_ns - e.req_start_ns >= (nfrag - 1) * 15_000_000, e
        check_pair(client, server)
    # the unsplit request is recorded as it always was
    first_client, first_server = pairs[0]
    for e in (first_client, first_server):
        assert e.req_head.split(b" ")[:2] == [b"GET", b"/whole"]
        assert e.resp_bytes == e.resp_head.index(b"\r\n\r\n") + 4 + len(BODY)
    assert [c.req_head.split(b" ")[:2] for c, _ in pairs] == [[b"GET", b"/whole"], [b"GET", b"/x"],
                                                              [b"POST", b"/bytes"]]


@pytest.mark.parametrize("raw_server", ["split"], indirect=True)
def test_response_split_in_the_status_line_is_recognised(rec: Recorder, raw_server: Server,
                                                          tmp_module: Path) -> None:
    rec.clear()
    plan = [([WHOLE], True), (SPLIT, True), ([WHOLE], True)]
    pid, statuses = run_raw_client(tmp_module, raw_server.host, raw_server.port, plan)
    assert statuses == [200, 200, 200]
    exs = rec.take(lambda g: len(g) >= 6, pids={pid, raw_server.pid})
    exs += rec.settle({pid, raw_server.pid}, 0.3)
    pairs = _pairs(exs, pid, raw_server.pid)
    assert len(pairs) == 3
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for client, server in pairs:
        for e in (client, server):
            assert e.end == EndReason.COMPLETE, e
            assert e.status == 200
            assert e.resp_head == response and e.resp_bytes == len(response)
            assert e.resp_tail == response[-8:]
            # the response starts at "HT": the pauses between its pieces are inside it
            assert e.resp_end_ns - e.resp_start_ns >= 2 * 40_000_000, e
        check_pair(client, server)
    assert [c.req_head.split(b" ")[:2] for c, _ in pairs] == [[b"GET", b"/whole"], [b"GET", b"/x"],
                                                              [b"GET", b"/whole"]]


@pytest.mark.parametrize("raw_server", ["sink"], indirect=True)
def test_method_prefix_that_is_not_http_is_counted_not_traced(rec: Recorder, raw_server: Server,
                                                                tmp_module: Path) -> None:
    rec.clear()
    before = rec.cap.counters()
    not_http = ["GE", "X / HTTP/1.1\r\n\r\n"]
    pid, _ = run_raw_client(tmp_module, raw_server.host, raw_server.port, [(not_http, False)])
    # a connection closed with only a method's first bytes sent: held, then counted at close
    pid2, _ = run_raw_client(tmp_module, raw_server.host, raw_server.port, [(["P"], False)])
    assert rec.settle({pid, pid2, raw_server.pid}, 0.5) == []
    after = rec.cap.counters()
    # both ends of the first connection saw one segment that starts no request ("GE" + "X / ...")
    assert after["non_http_segments"] - before["non_http_segments"] >= 2
    assert after["unparsed_bytes"] - before["unparsed_bytes"] >= 2 * len("".join(not_http)) + 2 * len("P")

    # a stray method-like byte, then a request in the next write: the request is still one (its
    # own bytes only; the stray byte is counted), at both ends; the sink never answers
    before = rec.cap.counters()
    request = "GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
    pid3, _ = run_raw_client(tmp_module, raw_server.host, raw_server.port, [(["P", request], False)])
    exs = rec.take(lambda g: len(g) >= 2, pids={pid3, raw_server.pid})
    assert sorted((e.pid, e.role) for e in exs) == sorted([(pid3, Role.CLIENT), (raw_server.pid, Role.SERVER)])
    for e in exs:
        assert e.req_head == request.encode() and e.req_bytes == len(request)
        assert e.end == EndReason.CLOSED and e.resp_start_ns == 0
    assert rec.cap.counters()["unparsed_bytes"] - before["unparsed_bytes"] >= 2


HALF_CLOSE_CLIENT = textwrap.dedent("""
    import socket, sys, time
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    c.sendall(b"GET /half HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    c.shutdown(socket.SHUT_WR)  # the request is all: FIN now
    time.sleep(0.3)  # the reply and the server's FIN arrive: FIN_WAIT2 -> TIME_WAIT, TCP_CLOSE
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    c.close()
    print(data.split(b"\\r\\n", 1)[0].decode())
""")


def test_a_reply_read_after_the_socket_reached_tcp_close_completes_the_exchange(rec: Recorder,
                                                                                tmp_module: Path) -> None:
    """The kernel sets TCP_CLOSE on a socket its process still holds (the peer's FIN after the
    process's own shutdown(SHUT_WR), or an RST): data queued before it is still read, so the
    connection must not end there but when the process closes the socket."""
    rec.clear()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        rec.watch(port)
        script = tmp_module / "half_close_client.py"
        script.write_text(HALF_CLOSE_CLIENT)
        proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True)
        s, _ = srv.accept()
        with s:
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(4096)
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        out, _ = proc.communicate(timeout=10)
    assert out.strip() == "HTTP/1.1 200 OK"
    (ex,) = rec.take(lambda g: len(g) >= 1, pids={proc.pid})
    assert ex.role == Role.CLIENT and ex.req_head.startswith(b"GET /half ")
    assert ex.status == 200 and ex.end == EndReason.COMPLETE, ex
