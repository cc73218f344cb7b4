"""A recording TCP relay for the protocol decoders' tests: real clients talk to real servers
through it, and it keeps every chunk each way with its time, as the kernel's socket probes would
see them at either end. `client_segments()` are the client process's view (its writes egress),
`server_segments()` the server's; both are cut to SEGMENT_DATA bytes per transfer like the kernel's
bounded copy, unless `full=True`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from correlator.segments import SEGMENT_DATA, Segment


class Relay:
    def __init__(self, upstream: tuple[str, int], family: int = socket.AF_INET) -> None:
        self.upstream = upstream
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        # (connection index, True = client -> server, monotonic ns, bytes)
        self.chunks: list[tuple[int, bool, int, bytes]] = []
        self._conns = 0
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            with self._lock:
                idx = self._conns
                self._conns += 1
            for src, dst, c2s in ((down, up, True), (up, down, False)):
                t = threading.Thread(target=self._pump, args=(idx, src, dst, c2s), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, idx: int, src: socket.socket, dst: socket.socket, c2s: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    self.chunks.append((idx, c2s, time.monotonic_ns(), data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _segments(self, client_view: bool, full: bool) -> dict[int, list[Segment]]:
        out: dict[int, list[Segment]] = {}
        with self._lock:
            chunks = list(self.chunks)
        for idx, c2s, ts, data in chunks:
            egress = c2s if client_view else not c2s
            conn_id = (idx + 1) * 2 + (0 if client_view else 1)
            kept = data if full else data[:SEGMENT_DATA]
            out.setdefault(idx, []).append(
                Segment(conn_id=conn_id, pid=1 if client_view else 2, tid=1 if client_view else 2,
                        egress=egress, start_ns=ts, end_ns=ts, length=len(data), data=kept))
        return out

    def client_segments(self, full: bool = False) -> dict[int, list[Segment]]:
        """Per relayed connection, the client process's segments in order."""
        return self._segments(True, full)

    def server_segments(self, full: bool = False) -> dict[int, list[Segment]]:
        """Per relayed connection, the server process's segments in order."""
        return self._segments(False, full)


@contextlib.contextmanager
def relaying(upstream: tuple[str, int]) -> Iterator[Relay]:
    r = Relay(upstream)
    try:
        yield r
    finally:
        r.close()
