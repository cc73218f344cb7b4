"""Two "hosts" on one machine for the cross-host tests: each a network namespace (joined to the other
by a veth pair, addresses inside the namespaces only) and a cgroup v2 directory holding its
processes, so a sock_ops program attached to one host's cgroup sees only that host's sockets.

    with two_hosts() as (a, b):
        srv = b.popen([sys.executable, "svc.py", "serve", "--host", b.addr, "--port", "8080"])

Run as a program (stdlib only, so a test can copy this file under a service's name: kspan names a
Python service after its script) it is the peers of those tests:
  python netns.py serve --host H --port P [--downstream URL] [--cert C --key K] [--cafile CA] [--md5 KEY]
  python netns.py client URL [--cafile CA] [--md5 KEY] [--body N]   driven by stdin: connect, go, exit
  python netns.py sniff --iface IF --port P              one JSON line per TCP segment seen on IF
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ADDR_A, ADDR_B = "198.18.0.1", "198.18.0.2"  # RFC 2544 benchmarking range: never routed
ADDR6_A, ADDR6_B = "2001:2::1", "2001:2::2"  # RFC 5180, its IPv6 counterpart
TCP_MD5SIG = 14  # linux/tcp.h
CTX_OPTION_KIND = 25


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def cgroup2_root() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise AssertionError("no cgroup v2 hierarchy is mounted")


@dataclass
class Host:
    name: str
    netns: str
    addr: str
    addr6: str
    iface: str
    cgroup: Path

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host: the shell joins the cgroup, then `ip netns exec` (which
        execs without forking) enters the namespace, so the process keeps the shell's pid."""
        return ["sh", "-c", 'echo $$ > "$0" && exec ip netns exec "$@"', str(self.cgroup / "cgroup.procs"),
                self.netns, *argv]

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(argv), **kw)  # type: ignore[call-overload]

    def run(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]

    def link(self, state: str) -> None:
        """Set this host's end of the veth up or down (down: segments to and from it are lost)."""
        _sh("ip", "-n", self.netns, "link", "set", self.iface, state)

    def pids(self) -> list[int]:
        return [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]


def _kill_cgroup(cg: Path) -> None:
    if not cg.is_dir():
        return
    with contextlib.suppress(OSError):
        (cg / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 10
    while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    cg.rmdir()


@contextlib.contextmanager
def two_hosts(tag: str = "") -> Iterator[tuple[Host, Host]]:
    """Hosts A (198.18.0.1) and B (198.18.0.2). On exit every process still in their cgroups is
    killed and the namespaces, the veth pair and the cgroups are removed."""
    suffix = f"{os.getpid() % 100000}{tag}"
    root = cgroup2_root()
    hosts = [Host(n, f"kspan-{n}-{suffix}", addr, addr6, f"kv{n}{suffix}"[:15], root / f"kspan-test-{n}-{suffix}")
             for n, addr, addr6 in (("a", ADDR_A, ADDR6_A), ("b", ADDR_B, ADDR6_B))]
    try:
        for h in hosts:
            h.cgroup.mkdir()
            _sh("ip", "netns", "add", h.netns)
            _sh("ip", "-n", h.netns, "link", "set", "lo", "up")
        a, b = hosts
        _sh("ip", "link", "add", a.iface, "netns", a.netns, "type", "veth", "peer", "name", b.iface, "netns", b.netns)
        for h in hosts:
            _sh("ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.iface)
            _sh("ip", "-n", h.netns, "addr", "add", f"{h.addr6}/64", "dev", h.iface, "nodad")
            # One MSS per skb (no GSO): veth drops a non-GSO packet longer than its MTU, so a
            # segment the option pushed past the MTU would stall the connection, not pass unseen.
            _sh("ip", "-n", h.netns, "link", "set", h.iface, "gso_max_segs", "1", "up")
        yield a, b
    finally:
        for h in hosts:
            with contextlib.suppress(OSError, AssertionError):
                _kill_cgroup(h.cgroup)
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True, timeout=30)


def program_copy(directory: Path, name: str) -> Path:
    """This file as `directory/name.py`: the service name kspan gives the process."""
    dst = directory / f"{name}.py"
    shutil.copyfile(__file__, dst)
    return dst


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for both hosts' addresses."""
    cert, key = directory / "hosts-cert.pem", directory / "hosts-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=kspan-hosts",
         "-addext", f"subjectAltName=IP:{ADDR_A},IP:{ADDR_B}"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def read_line(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """The next line a peer prints (its stdout is a pipe); AssertionError if it exits or stalls."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line from {proc.args} within {timeout}s (got {buf!r})")
        r, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if r:
            ch = os.read(proc.stdout.fileno(), 1)
            if not ch:
                raise AssertionError(f"{proc.args} exited ({proc.poll()}) before a full line: {buf!r}")
            buf += ch
    return buf.decode().strip()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the peers (run as a program) -------------------------------------------------------------


def md5_key(peer: str, key: str) -> bytes:
    """struct tcp_md5sig for an IPv4 peer: sockaddr_storage, flags, prefixlen, keylen, ifindex, key."""
    addr = struct.pack("<H", socket.AF_INET) + struct.pack(">H", 0) + socket.inet_aton(peer)
    return addr.ljust(128, b"\0") + struct.pack("<BBHi", 0, 0, len(key), 0) + key.encode().ljust(80, b"\0")


def _connection(url: str, cafile: str | None, md5: str | None) -> http.client.HTTPConnection:
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or ADDR_A, u.port or 80
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if md5:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5_key(host, md5))
    sock.settimeout(15)
    sock.connect((host, port))
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=15)
        conn.sock = ctx.wrap_socket(sock, server_hostname=host)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=15)
        conn.sock = sock
    return conn


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    downstream = ""
    cafile: str | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status, body = 200, f"hello from {os.path.basename(sys.argv[0])}\n".encode()
        if self.downstream:
            conn = _connection(self.downstream, self.cafile, None)
            try:
                conn.request("GET", urllib.parse.urlsplit(self.downstream).path or "/")
                r = conn.getresponse()
                body += r.read()
                status = 200 if r.status == 200 else 502
            finally:
                conn.close()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        got = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = f"{len(got)}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's signature
        pass


def serve(a: argparse.Namespace) -> None:
    handler = type("Handler", (_Handler,), {"downstream": a.downstream, "cafile": a.cafile})
    server_cls = http.server.ThreadingHTTPServer
    if ":" in a.host:  # "::" is dual-stack: IPv4 peers arrive as ::ffff:a.b.c.d
        server_cls = type("Server6", (server_cls,), {"address_family": socket.AF_INET6})
    srv = server_cls((a.host, a.port), handler, bind_and_activate=False)
    if a.md5:
        srv.socket.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5_key(a.md5_peer, a.md5))
    srv.server_bind()
    srv.server_activate()
    if a.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"listening {srv.server_address[1]}", flush=True)
    srv.serve_forever()


def client(a: argparse.Namespace) -> None:
    """One keep-alive connection driven by stdin, so a test can act between connect and request:
    `connect` connects and says `connected LOCAL_PORT`; `go` sends one GET (connecting first if
    needed) and prints its status; `exit` closes."""
    conn: http.client.HTTPConnection | None = None
    path = urllib.parse.urlsplit(a.url).path or "/"
    for line in sys.stdin:
        word = line.strip()
        if word == "exit":
            break
        if conn is None:
            conn = _connection(a.url, a.cafile, a.md5)
            assert conn.sock is not None
            if word == "connect":
                print(f"connected {conn.sock.getsockname()[1]}", flush=True)
                continue
        if a.body:
            # Head and body in one write (http.client would send the head alone first), so the
            # request's first segment is a full one.
            head = f"POST {path} HTTP/1.1\r\nHost: {conn.host}\r\nContent-Length: {a.body}\r\n\r\n".encode()
            assert conn.sock is not None
            conn.sock.sendall(head + b"x" * a.body)
            r = http.client.HTTPResponse(conn.sock, method="POST")
            r.begin()
        else:
            conn.request("GET", path)
            r = conn.getresponse()
        r.read()
        print(r.status, flush=True)
    if conn is not None:
        conn.close()


def _tcp_options(raw: bytes) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(raw):
        kind = raw[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(raw) or raw[i + 1] < 2:
            out.append((kind, "malformed"))
            break
        n = raw[i + 1]
        out.append((kind, raw[i + 2 : i + n].hex()))
        i += n
    return out


def sniff(a: argparse.Namespace) -> None:
    """Every IPv4 TCP segment to or from port a.port on a.iface: seq, payload size and options."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((a.iface, 0))
    print("sniffing", flush=True)
    while True:
        frame = s.recv(65535)
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        tcp = ip[ihl:]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        if a.port not in (sport, dport):
            continue
        doff = (tcp[12] >> 4) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        print(json.dumps({"sport": sport, "dport": dport, "seq": seq, "payload": total - ihl - doff,
                          "options": _tcp_options(tcp[20:doff])}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--downstream", default="")
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--cafile")
    s.add_argument("--md5")
    s.add_argument("--md5-peer", default=ADDR_A)
    c = sub.add_parser("client")
    c.add_argument("url")
    c.add_argument("--cafile")
    c.add_argument("--md5")
    c.add_argument("--body", type=int, default=0, help="POST this many bytes instead of a GET")
    f = sub.add_parser("sniff")
    f.add_argument("--iface", required=True)
    f.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    {"serve": serve, "client": client, "sniff": sniff}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
