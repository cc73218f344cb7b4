"""A Python HTTP service for chain tests: GET /chain answers 200 after calling the next hop (if any)
on the same thread, GET /status/<code> answers <code>, GET /slow?ms=N sleeps first.

Run: python chain_server.py PORT [NEXT_URL]. Prints "listening" once bound. The service name
kspan derives is this script's file name, so tests copy it to svc_a.py, svc_b.py ...
"""

from __future__ import annotations

import http.client
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    next_url: str | None = None

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/status/"):
            self._reply(int(url.path.rsplit("/", 1)[1]), b"status\n")
            return
        if url.path == "/slow":
            ms = int(urllib.parse.parse_qs(url.query).get("ms", ["100"])[0])
            time.sleep(ms / 1000)
        body = b"hello from " + sys.argv[0].encode() + b"\n"
        if self.next_url:
            nxt = urllib.parse.urlsplit(self.next_url)
            conn = http.client.HTTPConnection(nxt.hostname, nxt.port, timeout=10)
            conn.request("GET", nxt.path + ("?" + nxt.query if nxt.query else ""))
            resp = conn.getresponse()
            body += resp.read()
            conn.close()
            if resp.status >= 500:
                self._reply(502, body)
                return
        self._reply(200, body)

    do_HEAD = do_GET


def main() -> None:
    port = int(sys.argv[1])
    Handler.next_url = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    host = "::1" if len(sys.argv) > 3 and sys.argv[3] == "6" else "127.0.0.1"
    server_cls = ThreadingHTTPServer
    if host == "::1":
        import socket

        class V6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_cls = V6
    srv = server_cls((host, port), Handler)
    print("listening", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
