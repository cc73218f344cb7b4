"""OTLP/HTTP (binary protobuf) span exporter over one keep-alive connection."""

from __future__ import annotations

import gzip
import logging
import select
import socket
import ssl
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlsplit

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from correlator.spans import ProcessInfo, Span
from exporters.config import OtlpTarget
from exporters.otlp_proto import KSPAN_VERSION, ResourceOverrides, WireEncoder

log = logging.getLogger("kspan.exporters")

# The OTLP/HTTP spec: only these answers mean "try the same request again later".
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_TLS_HINT = (" (for a private CA set OTEL_EXPORTER_OTLP_CERTIFICATE to its PEM file; "
             "use http:// if the collector does not speak TLS)")
# A collector's answer is a small protobuf; more than this is not an OTLP endpoint talking.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_BODY = 16 * 1024 * 1024
_RECV = 65536


class HttpProtocolError(Exception):
    """The endpoint's answer is not HTTP/1.1 that this client can read."""


class ServerClosed(ConnectionError):
    """The server closed the connection before any byte of its answer (as http.client's
    RemoteDisconnected): on a reused keep-alive connection that is its idle timeout, not an outage."""


class Http11Connection:
    """One persistent HTTP/1.1 connection that POSTs and reads the answer by hand.

    http.client costs ~300 us of CPU per request here, most of it parsing the answer's headers with
    the email package; an OTLP answer is a status line, a few headers and a small body. Framing
    follows RFC 9112: Content-Length or chunked bodies, a close-delimited body without either, no
    body for 1xx/204/304, 1xx interim answers skipped, and the connection closed after
    `Connection: close` or an HTTP/1.0 answer."""

    def __init__(self, host: str, port: int, timeout_s: float, tls: ssl.SSLContext | None) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.tls = tls
        self.sock: socket.socket | None = None
        self._poll = select.poll()
        self._buf = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self._buf.clear()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), self.timeout_s)
        try:
            # The request goes out in two writes at most: Nagle would hold the last segment for the
            # previous one's (delayed) ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _idle_closed(self) -> bool:
        # Between requests the server has nothing to say: readable means it closed the connection
        # (its keep-alive timeout) or broke the protocol. One poll beats sending a batch into it.
        # (poll, not select: the agent's descriptors can pass select's FD_SETSIZE.)
        if self._buf:
            return True  # bytes past the last answer's framing
        try:
            return bool(self._poll.poll(0))
        except OSError:
            return True

    def post(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request (head: through the blank line) and return (status, headers, body);
        header names are lower case. Raises OSError, ServerClosed or HttpProtocolError, after
        which the connection is closed."""
        sock = self.sock
        if sock is not None and self._idle_closed():
            self.close()
            sock = None
        if sock is None:
            sock = self.sock = self._connect()
            self._poll = select.poll()
            self._poll.register(sock, select.POLLIN)
        try:
            if self.tls is None:
                # Scatter-gather: the batch is not copied to prepend the head.
                sent = sock.sendmsg([head, body])
                if sent < len(head):
                    sock.sendall(head[sent:])
                    sent = len(head)
                if sent - len(head) < len(body):
                    sock.sendall(memoryview(body)[sent - len(head):])
            else:
                sock.sendall(head + body)
            return self._read_response()
        except BaseException:
            self.close()
            raise

    def _fill(self, first: bool = False) -> None:
        assert self.sock is not None
        data = self.sock.recv(_RECV)
        if not data:
            if first:
                raise ServerClosed("the server closed the connection without answering")
            raise HttpProtocolError("the server closed the connection mid-answer")
        self._buf += data

    def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        while True:
            status, version, headers = self._read_head()
            if 100 <= status < 200 and status != 101:
                continue  # interim (100 Continue, 103 Early Hints): the real answer follows
            break
        body = self._read_body(status, headers)
        conn = headers.get("connection", "").lower()
        if "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn):
            self.close()
        return status, headers, body

    def _read_head(self) -> tuple[int, str, dict[str, str]]:
        buf = self._buf
        first = not buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_RESPONSE_HEAD:
                raise HttpProtocolError(f"answer head longer than {MAX_RESPONSE_HEAD} bytes")
            self._fill(first)
            first = False
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit() or rest[3:4] not in ("", " "):
            raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HttpProtocolError(f"malformed header line: {line[:80]!r}")
            name = name.lower()
            value = value.strip()
            old = headers.get(name)
            headers[name] = value if old is None else f"{old}, {value}"
        return int(code), version, headers

    def _read_exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            self._fill()
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _read_line(self) -> bytes:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 2]
                return line
            if len(buf) > MAX_RESPONSE_HEAD:
                raise HttpProtocolError("chunk line too long")
            self._fill()

    def _read_body(self, status: int, headers: dict[str, str]) -> bytes:
        if status in (204, 304) or 100 <= status < 200:
            return b""
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower().rsplit(",", 1)[-1].strip() != "chunked":
                raise HttpProtocolError(f"unsupported Transfer-Encoding {te!r}")
            return self._read_chunked()
        cl = headers.get("content-length")
        if cl is not None:
            values = {v.strip() for v in cl.split(",")}
            if len(values) != 1 or not (n := values.pop()).isdigit():
                raise HttpProtocolError(f"bad Content-Length {cl!r}")
            length = int(n)
            if length > MAX_RESPONSE_BODY:
                raise HttpProtocolError(f"answer body of {length} bytes")
            return self._read_exact(length)
        # Neither: the body runs until the server closes the connection.
        assert self.sock is not None
        while True:
            data = self.sock.recv(_RECV)
            if not data:
                break
            self._buf += data
            if len(self._buf) > MAX_RESPONSE_BODY:
                raise HttpProtocolError("answer body too long")
        out = bytes(self._buf)
        self.close()
        return out

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise HttpProtocolError(f"bad chunk size {size_text[:20]!r}")
            if size == 0:
                while self._read_line():  # trailer fields, up to the blank line
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_RESPONSE_BODY:
                raise HttpProtocolError("answer body too long")
            parts.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise HttpProtocolError("chunk not followed by CRLF")


def _rpc_status_message(body: bytes) -> str:
    """Error bodies are google.rpc.Status protobufs; show their message when there is one."""
    if not body:
        return ""
    try:
        from google.rpc import status_pb2

        st = status_pb2.Status.FromString(body)
        if st.message:
            return st.message
    except (ImportError, DecodeError):
        pass
    return body[:200].decode("utf-8", "replace")


class OtlpHttpSpanExporter:
    """POSTs ExportTraceServiceRequest protobufs. Never raises; False means "not delivered"."""

    def __init__(self, target: OtlpTarget, resource: ResourceOverrides | None = None) -> None:
        self.target = target
        self.url = target.endpoint
        u = urlsplit(self.url)
        https = u.scheme == "https"
        host = u.hostname or "localhost"
        port = u.port or (443 if https else 80)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        # Header names are case-insensitive: the user's (OTEL_EXPORTER_OTLP_HEADERS) replace kspan's.
        headers = {
            "content-type": ("Content-Type", "application/x-protobuf"),
            "user-agent": ("User-Agent", f"kspan/{KSPAN_VERSION}"),
        }
        if target.compression == "gzip":
            headers["content-encoding"] = ("Content-Encoding", "gzip")
        for k, v in target.headers:
            headers[k.lower()] = (k, v)
        for framing in ("content-length", "transfer-encoding", "connection"):  # this client's, per request
            headers.pop(framing, None)
        authority = u.netloc.rpartition("@")[2] or host
        if not authority.isascii():  # an internationalized host name goes on the wire in IDNA form
            authority = host.encode("idna").decode() + (f":{u.port}" if u.port else "")
        host_line = headers.pop("host", ("Host", authority))
        # The request target as ASCII: anything else in the configured path is percent-encoded.
        path = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
        lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in (host_line, *headers.values())]
        # Everything but the length is the same for every request: encoded once.
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._encoder = WireEncoder(resource or ResourceOverrides())
        tls = ssl.create_default_context(cafile=target.certificate) if https else None
        self._conn = Http11Connection(host, port, target.timeout_s, tls)
        self.last_error = ""
        # Set when the endpoint refused the batch for good (a 4xx other than 429): retrying the same
        # bytes cannot succeed, so the pipeline drops and counts it instead of blocking the queue.
        self.last_failure_permanent = False
        self.outage_hint = "check --otlp-endpoint / that the collector is running"
        self.rejected_spans = 0  # partial-success rejections reported by the endpoint
        self.retry_after_s = 0.0  # the endpoint's Retry-After on the last failure (0: none)

    def describe(self) -> str:
        return f"OTLP/HTTP endpoint {self.url}"

    def _close(self) -> None:
        self._conn.close()

    def export_bytes(self, body: bytes, n_spans: int) -> bool:
        self.last_failure_permanent = False
        self.retry_after_s = 0.0
        if self.target.compression == "gzip":
            body = gzip.compress(body, compresslevel=5)
        head = self._head + str(len(body)).encode() + b"\r\n\r\n"
        # One retry on a fresh connection: a keep-alive connection the server closed while idle fails
        # on first use, and that is not an outage.
        for attempt in (0, 1):
            try:
                status, headers, data = self._conn.post(head, body)
            except (OSError, HttpProtocolError) as e:
                if attempt == 0 and isinstance(e, (ServerClosed, BrokenPipeError, ConnectionResetError)):
                    continue
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, ssl.SSLError):
                    self.last_error += _TLS_HINT
                return False
            break
        if headers.get("content-encoding", "").lower() == "gzip":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                data = b""
        retry_after = headers.get("retry-after", "")
        if 200 <= status < 300:
            self._partial_success(data)
            self.last_error = ""
            return True
        msg = _rpc_status_message(data)
        self.last_error = f"HTTP {status}" + (f": {msg}" if msg else "")
        # The OTLP/HTTP spec: honour Retry-After (delay-seconds form) on 429 and 503.
        self.retry_after_s = float(retry_after) if retry_after.strip().isdigit() else 0.0
        if status not in RETRYABLE_STATUS:
            self.last_failure_permanent = True
            hint = ""
            if status in (401, 403):
                hint = " (check OTEL_EXPORTER_OTLP_HEADERS for the credentials the endpoint expects)"
            elif status == 404:
                hint = " (check the URL path: OTLP/HTTP traces go to /v1/traces)"
            self.last_error += hint
        return False

    def _partial_success(self, data: bytes) -> None:
        if not data:
            return
        try:
            resp = ExportTraceServiceResponse.FromString(data)
        except DecodeError:
            return
        ps = resp.partial_success
        if ps.rejected_spans or ps.error_message:
            self.rejected_spans += ps.rejected_spans
            # Partial success is not retryable (spec): count it and tell the user why.
            log.warning(
                "kspan: %s rejected %d spans: %s",
                self.describe(), ps.rejected_spans, ps.error_message or "(no reason given)",
            )

    def encode_spans(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bytes:
        """One ExportTraceServiceRequest; requests concatenate into one (the pipeline joins them)."""
        return self._encoder.encode(spans, processes)

    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        try:
            body = self.encode_spans(spans, processes)
        except Exception as e:  # a span the encoder cannot represent must not kill the exporter thread
            self.last_error = f"cannot encode spans: {e!r}"
            self.last_failure_permanent = True
            log.exception("kspan: bug: could not encode %d spans for OTLP", len(spans))
            return False
        return self.export_bytes(body, len(spans))

    def shutdown(self) -> None:
        self._close()
