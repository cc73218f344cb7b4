"""exporters/otlp_http.py's own HTTP/1.1 client against a real local TCP server that answers each
request with scripted bytes (framings, interim answers, closes, silence), every request body
decoded with the official opentelemetry-proto classes."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from exporters.config import load_config
from exporters.otlp_http import OtlpHttpSpanExporter
from tests.support.otlp_receiver import OtlpReceiver, flatten_spans
from tests.support.sample_spans import chain_trace, processes

# What a handler does with one request: the bytes to send back (None: close without answering), and
# whether to close the connection after them.
Reply = tuple[bytes | None, bool]


def _partial(rejected: int) -> bytes:
    resp = ExportTraceServiceResponse()
    resp.partial_success.rejected_spans = rejected
    resp.partial_success.error_message = "scripted"
    return resp.SerializeToString()


class ScriptedServer:
    """Accepts connections and reads whole HTTP/1.1 requests (Content-Length framed, as kspan sends
    them); script(i) gives the answer to the i-th request across all connections."""

    def __init__(self, script: Callable[[int], Reply]) -> None:
        self.script = script
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.stopped = False
        self.trickle = False  # send each answer a byte at a time
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
                n = int(headers["content-length"])
                while len(buf) < n:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:n], buf[n:]
                with self.lock:
                    i = len(self.requests)
                    self.requests.append((lines[0], headers, body))
                answer, close = self.script(i)
                if answer is None:
                    return
                if self.trickle:
                    for j in range(len(answer)):
                        c.sendall(answer[j : j + 1])
                        time.sleep(0.0005)
                else:
                    c.sendall(answer)
                if close:
                    return
        except OSError:
            return
        finally:
            c.close()

    def spans(self) -> list[dict]:
        out = []
        for _, headers, body in self.requests:
            if headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            out += flatten_spans(ExportTraceServiceRequest.FromString(body), "http")
        return out

    def close_idle_connections(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()
        self.close_idle_connections()


def ok(body: bytes = b"", extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[int], Reply]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Callable[[int], Reply]) -> ScriptedServer:
        s = ScriptedServer(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _exporter(endpoint: str, env: dict[str, str] | None = None) -> OtlpHttpSpanExporter:
    return OtlpHttpSpanExporter(load_config(env or {}, endpoint=endpoint, protocol="http/protobuf").traces)


def test_request_is_http11_with_the_configured_headers_and_a_decodable_body(serve) -> None:
    srv = serve(lambda i: (ok(), False))
    exp = _exporter(srv.endpoint, {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer x,Host=collector.example"})
    try:
        assert exp.export(chain_trace(), processes()), exp.last_error
    finally:
        exp.shutdown()
    ((line, headers, body),) = srv.requests
    assert line == "POST /v1/traces HTTP/1.1"
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["authorization"] == "Bearer x"
    assert headers["host"] == "collector.example"  # the user's Host wins
    assert headers["user-agent"].startswith("kspan/")
    assert int(headers["content-length"]) == len(body)
    assert len(srv.spans()) == 3


def test_default_host_header_is_the_endpoints_authority(serve) -> None:
    srv = serve(lambda i: (ok(), False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace(), processes())
    finally:
        exp.shutdown()
    assert srv.requests[0][1]["host"] == f"127.0.0.1:{srv.port}"


def test_keep_alive_reuses_one_connection(serve) -> None:
    srv = serve(lambda i: (ok(), False))
    exp = _exporter(srv.endpoint)
    try:
        for i in range(5):
            assert exp.export(chain_trace(f"k{i}"), processes()), exp.last_error
    finally:
        exp.shutdown()
    assert srv.connections == 1 and len(srv.spans()) == 15


def test_reconnects_after_the_server_closes_an_idle_keep_alive_connection(serve) -> None:
    srv = serve(lambda i: (ok(), False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace("a"), processes())
        srv.close_idle_connections()  # the collector's idle timeout
        time.sleep(0.05)
        assert exp.export(chain_trace("b"), processes()), exp.last_error
        assert exp.last_error == ""
    finally:
        exp.shutdown()
    assert srv.connections == 2 and len(srv.spans()) == 6


def test_a_connection_closed_without_an_answer_is_retried_once_on_a_fresh_one(serve) -> None:
    # The race the idle check cannot see: the server closes as the request arrives.
    srv = serve(lambda i: (None, True) if i == 1 else (ok(), False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace("a"), processes())
        assert exp.export(chain_trace("b"), processes()), exp.last_error
    finally:
        exp.shutdown()
    assert len(srv.requests) == 3 and srv.connections == 2


def test_a_server_that_never_answers_fails_retryably_but_only_after_one_fresh_try(serve) -> None:
    srv = serve(lambda i: (None, True))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace(), processes()) is False
        assert "ServerClosed" in exp.last_error and exp.last_failure_permanent is False
    finally:
        exp.shutdown()
    assert len(srv.requests) == 2  # the one retry, not a loop


def test_timeout_is_reported_retryable_within_the_configured_time(serve) -> None:
    hang = threading.Event()

    def script(i: int) -> Reply:
        hang.wait(5)
        return None, True

    srv = serve(script)
    exp = _exporter(srv.endpoint, {"OTEL_EXPORTER_OTLP_TIMEOUT": "300"})
    try:
        t0 = time.monotonic()
        assert exp.export(chain_trace(), processes()) is False
        took = time.monotonic() - t0
        assert "timed out" in exp.last_error and exp.last_failure_permanent is False
        assert 0.25 <= took < 2.0, took
    finally:
        hang.set()
        exp.shutdown()


def test_chunked_answer_with_extensions_and_trailers(serve) -> None:
    body = _partial(2)
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x;ext=1\r\n" % 3 + body[:3] + b"\r\n"
               + b"%X\r\n" % (len(body) - 3) + body[3:] + b"\r\n"
               + b"0\r\nX-Trailer: t\r\n\r\n")
    srv = serve(lambda i: (chunked, False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace("a"), processes())
        assert exp.rejected_spans == 2
        assert exp.export(chain_trace("b"), processes())  # the framing left the connection usable
        assert exp.rejected_spans == 4
    finally:
        exp.shutdown()
    assert srv.connections == 1


def test_answer_split_across_many_small_writes(serve) -> None:
    srv = serve(lambda i: (ok(_partial(1), "Server: slow\r\n"), False))
    srv.trickle = True
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace("a"), processes()), exp.last_error
        assert exp.export(chain_trace("b"), processes()), exp.last_error
        assert exp.rejected_spans == 2
    finally:
        exp.shutdown()
    assert srv.connections == 1


def test_interim_100_continue_then_the_answer(serve) -> None:
    srv = serve(lambda i: (b"HTTP/1.1 100 Continue\r\n\r\n" + ok(_partial(1)), False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace(), processes()), exp.last_error
        assert exp.rejected_spans == 1
    finally:
        exp.shutdown()


def test_connection_close_and_close_delimited_bodies(serve) -> None:
    def script(i: int) -> Reply:
        if i == 0:
            return ok(b"", "Connection: close\r\n"), True
        if i == 1:  # HTTP/1.0, no length: the body runs to the close
            return b"HTTP/1.0 200 OK\r\nContent-Type: application/x-protobuf\r\n\r\n" + _partial(3), True
        return ok(), False

    srv = serve(script)
    exp = _exporter(srv.endpoint)
    try:
        for i in range(3):
            assert exp.export(chain_trace(f"c{i}"), processes()), exp.last_error
    finally:
        exp.shutdown()
    assert exp.rejected_spans == 3
    assert srv.connections == 3 and len(srv.requests) == 3  # no request sent into a closed connection


def test_429_with_retry_after_and_a_chunked_error_body(serve) -> None:
    msg = b"slow down"
    srv = serve(lambda i: (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"%x\r\n" % len(msg) + msg + b"\r\n0\r\n\r\n", False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_failure_permanent is False and exp.retry_after_s == 3.0
        assert exp.last_error == "HTTP 429: slow down"
    finally:
        exp.shutdown()


@pytest.mark.parametrize(("status", "permanent", "hint"), [
    (400, True, ""), (404, True, "/v1/traces"), (403, True, "OTEL_EXPORTER_OTLP_HEADERS"),
    (500, True, ""), (502, False, ""), (503, False, ""), (504, False, ""),
])
def test_status_codes_follow_the_otlp_retry_rules(serve, status: int, permanent: bool, hint: str) -> None:
    srv = serve(lambda i: (f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode(), False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace(), processes()) is False
        assert exp.last_failure_permanent is permanent
        assert exp.last_error.startswith(f"HTTP {status}") and hint in exp.last_error
        assert exp.retry_after_s == 0.0
    finally:
        exp.shutdown()


def test_retry_after_in_http_date_form_is_not_a_number_of_seconds(serve) -> None:
    srv = serve(lambda i: (b"HTTP/1.1 503 X\r\nRetry-After: Fri, 31 Dec 1999 23:59:59 GMT\r\n"
                           b"Content-Length: 0\r\n\r\n", False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace(), processes()) is False
        assert exp.retry_after_s == 0.0 and exp.last_failure_permanent is False
    finally:
        exp.shutdown()


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then closed mid-body
])
def test_malformed_answers_fail_retryably_and_the_next_export_reconnects(serve, answer: bytes) -> None:
    srv = serve(lambda i: (answer, True) if i == 0 else (ok(), False))
    exp = _exporter(srv.endpoint)
    try:
        assert exp.export(chain_trace("a"), processes()) is False
        assert exp.last_error.startswith("HttpProtocolError: ") and exp.last_failure_permanent is False
        assert exp.export(chain_trace("b"), processes()), exp.last_error
    finally:
        exp.shutdown()
    assert srv.connections == 2


def test_gzip_request_body_and_gzip_answer(serve) -> None:
    body = gzip.compress(_partial(2))
    srv = serve(lambda i: (ok(body, "Content-Encoding: gzip\r\n"), False))
    exp = _exporter(srv.endpoint, {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    try:
        assert exp.export(chain_trace(), processes())
    finally:
        exp.shutdown()
    assert srv.requests[0][1]["content-encoding"] == "gzip"
    assert len(srv.spans()) == 3 and exp.rejected_spans == 2


def test_collector_down_is_retryable_and_recovers_when_it_starts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exp = _exporter(f"http://127.0.0.1:{port}")
    try:
        assert exp.export(chain_trace("a"), processes()) is False
        assert "ConnectionRefusedError" in exp.last_error and exp.last_failure_permanent is False
        with OtlpReceiver(http_port=port) as rx:
            assert exp.export(chain_trace("b"), processes()), exp.last_error
            assert len(rx.wait_for_spans(lambda ss: len(ss) == 3)) == 3
    finally:
        exp.shutdown()


def test_large_batches_arrive_whole(serve) -> None:
    from tests.support.sample_spans import many_traces

    srv = serve(lambda i: (ok(), False))
    exp = _exporter(srv.endpoint)
    spans = many_traces(3000)  # a multi-megabyte body: partial sends on the socket
    try:
        assert exp.export(spans, processes()), exp.last_error
    finally:
        exp.shutdown()
    assert len(srv.spans()) == 9000


def test_a_configured_path_is_sent_as_ascii_and_framing_headers_stay_the_clients(serve) -> None:
    srv = serve(lambda i: (ok(), False))
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{srv.endpoint}/tenant/é b/v1/traces?x=1",
           "OTEL_EXPORTER_OTLP_HEADERS": "Content-Length=5,Connection=close,X-Ok=1"}
    exp = OtlpHttpSpanExporter(load_config(env, protocol="http/protobuf").traces)
    try:
        for i in range(2):
            assert exp.export(chain_trace(f"p{i}"), processes()), exp.last_error
    finally:
        exp.shutdown()
    (line, headers, body) = srv.requests[0]
    assert line == "POST /tenant/%C3%A9%20b/v1/traces?x=1 HTTP/1.1"
    assert int(headers["content-length"]) == len(body) and "connection" not in headers
    assert headers["x-ok"] == "1"
    assert srv.connections == 1 and len(srv.spans()) == 6
