"""TLS peers for the e2e tests: a self-signed certificate, nginx, and Python HTTPS server/client.

Run as a program it is the Python side of the chains:
  python -m tests.support.tls serve --port P --cert C --key K [--downstream URL --cafile C]
  python -m tests.support.tls get URL --cafile C [-n N]
The server answers GET /work with 200 (calling --downstream first, on the handler's own thread,
when given); the client prints one status per request, reusing one keep-alive connection.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import os
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from tests.support.nginx_h2 import running

ROOT = Path(__file__).resolve().parents[2]


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 / ::1, made with `openssl req`."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        listen {plain_port};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "hello from nginx\\n"; }}
        location /missing {{ return 404; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(prefix: Path, port: int, plain_port: int, cert: Path, key: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Debian's nginx on 127.0.0.1:port (TLS) and 127.0.0.1:plain_port, all state under `prefix`."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, plain_port=f"127.0.0.1:{plain_port}",
                                      cert=cert, key=key))
    with running(prefix, conf, [port]) as proc:
        yield proc


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.support.tls", *args]


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


# --- the Python HTTPS server and client (run as a program) --------------------------------------

def _client_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    downstream: str = ""
    cafile: str | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status, body = 200, b"hello from python\n"
        if self.downstream:
            status, got = _get_once(self.downstream, self.cafile)
            body = b"via downstream: " + got
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base
        pass


def _get_once(url: str, cafile: str | None) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            u.hostname or "127.0.0.1", u.port, context=_client_context(cafile), timeout=10)
    else:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("GET", u.path or "/")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def serve(port: int, cert: str | None, key: str | None, downstream: str, cafile: str | None) -> None:
    handler = type("Handler", (_Handler,), {"downstream": downstream, "cafile": cafile})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(f"listening {srv.server_address[1]}", flush=True)
    srv.serve_forever()


def get(url: str, cafile: str | None, n: int) -> int:
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            u.hostname or "127.0.0.1", u.port, context=_client_context(cafile), timeout=15)
    else:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=15)
    for _ in range(n):
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        r = conn.getresponse()
        r.read()
        print(r.status, flush=True)
    conn.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.support.tls")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--downstream", default="")
    s.add_argument("--cafile")
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--cafile")
    g.add_argument("-n", type=int, default=1)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.port, a.cert, a.key, a.downstream, a.cafile)
        return 0
    return get(a.url, a.cafile, a.n)


if __name__ == "__main__":
    sys.exit(main())
