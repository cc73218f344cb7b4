"""An HTTP/2 server that takes curl's `Upgrade: h2c` (hyper-h2): nginx does not upgrade, so this
one answers the upgrade request as stream 1 and later requests on the same connection as
HTTP/2 streams, each with a planted secret header; /missing... gives 404."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import h2.config
import h2.connection
import h2.events


@contextmanager
def serving(secret: str, together: bool = False) -> Iterator[int]:
    """The server on a loopback port, for the block's duration. together: the 101 and the first
    HTTP/2 frames (stream 1's answer) in one write, as a buffered server sends them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()
    threading.Thread(target=_accept, args=(listener, stop, secret, together), daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


def _accept(listener: socket.socket, stop: threading.Event, secret: str, together: bool) -> None:
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_serve, args=(sock, secret, together), daemon=True).start()


def _respond(conn: h2.connection.H2Connection, sid: int, path: str, secret: str) -> None:
    status = "404" if path.startswith("/missing") else "200"
    conn.send_headers(sid, [(":status", status), ("content-type", "text/plain"), ("x-server-secret", secret)])
    conn.send_data(sid, f"hello {path}\n".encode(), end_stream=True)


def _serve(sock: socket.socket, secret: str, together: bool) -> None:
    with sock:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        path = lines[0].split(b" ")[1].decode()
        settings = next(line.split(b":", 1)[1].strip() for line in lines if line.lower().startswith(b"http2-settings:"))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_upgrade_connection(settings)
        switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        if not together:
            sock.sendall(switching)
            switching = b""
        _respond(conn, 1, path, secret)
        sock.sendall(switching + conn.data_to_send())
        data = rest
        while True:
            if data:
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        hdrs = dict(ev.headers)
                        _respond(conn, ev.stream_id, hdrs[b":path"].decode(), secret)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
