"""Builders for synthetic correlator.records.Exchange values with realistic HTTP/1.x heads.

The kernel keeps the first 512 bytes of the request, the first 256 of the response and the last
8; these builders apply the same limits and flags, so a test states the bytes on the wire and
gets the record the kernel would emit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from correlator.records import EndReason, Exchange, ExchangeId, ParentHint, ParentKind, Role, Source

REQ_HEAD = 512
RESP_HEAD = 256
TAIL = 8

_REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content",
    301: "Moved Permanently", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 418: "I'm a teapot", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable",
}  # fmt: skip

Headers = Sequence[tuple[str, str]]


def chunk(body: bytes, size: int = 16) -> bytes:
    """body in Transfer-Encoding: chunked framing, `size` bytes per chunk, with the final chunk."""
    out = b""
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


def request_bytes(
    method: str = "GET",
    target: str = "/",
    *,
    host: str | None = "127.0.0.1:8080",
    headers: Headers = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    chunked: bool = False,
    content_length: bool | None = None,
    user_agent: str | None = "test-client/1.0",
) -> bytes:
    """A request as a client writes it: request line, headers, blank line, body."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if user_agent is not None:
        lines.append(f"User-Agent: {user_agent}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    payload = body
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = chunk(body)
    elif content_length or (content_length is None and body):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def response_bytes(
    status: int = 200,
    *,
    headers: Headers = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    chunked: bool = False,
    content_length: bool | None = None,
    interim: Iterable[int] = (),
    head_only: bool = False,
) -> bytes:
    """A response as a server writes it. `interim` 1xx heads come first (100 Continue);
    head_only: a HEAD response (headers describe a body that is not sent)."""
    out = b""
    for s in interim:
        out += f"{version} {s} {_REASONS.get(s, 'Info')}\r\n\r\n".encode()
    lines = [f"{version} {status} {_REASONS.get(status, 'Status')}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    payload = body
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = chunk(body)
    elif content_length or (content_length is None and status not in (204, 304) and status >= 200):
        lines.append(f"Content-Length: {len(body)}")
    out += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + payload


def final_status(response: bytes) -> int:
    """The final status as the kernel parses it (the first non-1xx status line), 0 if none."""
    pos = 0
    while response.startswith(b"HTTP/1.", pos) and len(response) >= pos + 12:
        digits = response[pos + 9 : pos + 12]
        if not digits.isdigit():
            return 0
        s = int(digits)
        if s >= 200 or s == 101:
            return s
        e = response.find(b"\r\n\r\n", pos)
        if e < 0:
            return 0
        pos = e + 4
    return 0


def hint(kind: ParentKind, parent: Exchange, pid: int | None = None) -> ParentHint:
    """A parent hint naming `parent` (by its identity), as the kernel would give it."""
    return ParentHint(kind, parent.pid if pid is None else pid, ExchangeId(parent.conn_id, parent.req_start_ns))


def make_exchange(
    request: bytes,
    response: bytes | None = None,
    *,
    role: Role = Role.SERVER,
    pid: int = 1000,
    tid: int | None = None,
    conn_id: int = 0xFFFF_8880_0000_1000,
    req_start_ns: int = 1_000_000_000,
    req_duration_ns: int = 20_000,
    latency_ns: int = 1_000_000,
    resp_duration_ns: int = 30_000,
    end: EndReason = EndReason.COMPLETE,
    delivered: int | None = None,
    parent: ParentHint | None = None,
    family: int = 2,
    local: tuple[str, int] = ("192.0.2.1", 8080),  # TEST-NET-1: the client is on another host by default
    remote: tuple[str, int] = ("192.0.2.10", 40000),
    tls: bool = False,
    source: Source = Source.SOCKET,
    interim: bool | None = None,
    status: int | None = None,
) -> Exchange:
    """The record the kernel emits for one exchange.

    response None: no response byte was seen (resp_start_ns 0). delivered: how many response
    bytes arrived before the end (a response cut short); default all of them."""
    req_end = req_start_ns + req_duration_ns
    if response is None:
        resp = b""
        resp_start = resp_end = 0
    else:
        resp = response if delivered is None else response[:delivered]
        resp_start = req_end + latency_ns
        resp_end = resp_start + resp_duration_ns
    if interim is None:
        interim = resp.startswith(b"HTTP/1.1 1") and not resp.startswith(b"HTTP/1.1 101")
    if family == 0:
        local, remote = ("", 0), ("", 0)
    return Exchange(
        pid=pid,
        tid=pid if tid is None else tid,
        role=role,
        end=end,
        source=source,
        tls=tls,
        conn_id=conn_id,
        family=family,
        local_addr=local[0],
        local_port=local[1],
        remote_addr=remote[0],
        remote_port=remote[1],
        req_start_ns=req_start_ns,
        req_end_ns=req_end,
        resp_start_ns=resp_start,
        resp_end_ns=resp_end,
        req_bytes=len(request),
        resp_bytes=len(resp),
        status=final_status(resp) if status is None else status,
        parent=parent,
        req_head=request[:REQ_HEAD],
        resp_head=resp[:RESP_HEAD],
        resp_tail=resp[-TAIL:] if resp else b"",
        req_head_truncated=len(request) > REQ_HEAD,
        resp_head_truncated=len(resp) > RESP_HEAD,
        interim_response=interim,
    )


@dataclass
class Chain:
    """A cross-process chain client -> svc1 -> ... -> svcN on one host, as kspan sees it."""

    exchanges: list[Exchange] = field(default_factory=list)  # in the kernel's emission order
    by_name: dict[str, Exchange] = field(default_factory=dict)  # "client", "A.server", "A.client", ...


def make_chain(
    services: Sequence[str] = ("A", "B"),
    *,
    client_pid: int = 500,
    start_ns: int = 5_000_000_000,
    conn_base: int = 0xFFFF_8880_1000_0000,
    path: str = "/chain",
    client_headers: Headers = (),
) -> Chain:
    """client -> services[0] -> services[1] ... Each service serves one request and makes one
    call to the next while serving it (THREAD hint); each server end has a PEER hint to the
    client end of its connection. Emission order is innermost first, the client's span last."""
    # Timeline: each hop's request starts 100 µs after the previous, responses unwind outward.
    n = len(services)
    step = 100_000
    ports = [8000 + i for i in range(n)]
    client_ports = [40000 + i for i in range(n)]
    pids = [client_pid + 1 + i for i in range(n)]
    # client-side connection ids and server-side ones differ: two struct socks per TCP connection.
    c_conn = [conn_base + 0x100 * i + 1 for i in range(n)]
    s_conn = [conn_base + 0x100 * i + 2 for i in range(n)]
    starts = [start_ns + step * i for i in range(n)]
    resp_body = b'{"ok": true}'
    total = 2 * step * (n + 1)

    def req(i: int) -> bytes:
        hdrs = client_headers if i == 0 else ()
        return request_bytes("GET", f"{path}/{i}", host=f"127.0.0.1:{ports[i]}", headers=hdrs)

    client_ex: list[Exchange] = []
    server_ex: list[Exchange] = []
    for i in range(n):
        caller_pid = client_pid if i == 0 else pids[i - 1]
        # The call i lasts from starts[i] until it unwinds: inner calls end first.
        dur = total - 2 * step * i
        client_ex.append(
            make_exchange(
                req(i), response_bytes(200, body=resp_body), role=Role.CLIENT, pid=caller_pid,
                conn_id=c_conn[i], req_start_ns=starts[i], latency_ns=dur, resp_duration_ns=10_000,
                local=("127.0.0.1", client_ports[i]), remote=("127.0.0.1", ports[i]),
            )
        )  # fmt: skip
        # Server side sees the request 10 µs later and answers 10 µs before the client reads it.
        server_ex.append(
            make_exchange(
                req(i), response_bytes(200, body=resp_body), role=Role.SERVER, pid=pids[i],
                conn_id=s_conn[i], req_start_ns=starts[i] + 10_000, latency_ns=dur - 30_000,
                resp_duration_ns=10_000, local=("127.0.0.1", ports[i]), remote=("127.0.0.1", client_ports[i]),
            )
        )  # fmt: skip
    # Hints: server i <- PEER client i; client i (i >= 1) <- THREAD server i-1.
    linked_servers = [_with_parent(server_ex[i], hint(ParentKind.PEER, client_ex[i])) for i in range(n)]
    linked_clients = [client_ex[0]] + [
        _with_parent(client_ex[i], hint(ParentKind.THREAD, linked_servers[i - 1])) for i in range(1, n)
    ]
    chain = Chain()
    chain.by_name["client"] = linked_clients[0]
    for i, name in enumerate(services):
        chain.by_name[f"{name}.server"] = linked_servers[i]
        if i + 1 < n:
            chain.by_name[f"{name}.client"] = linked_clients[i + 1]
    # Emission: innermost server, then its caller's client end, that caller's server end, ...
    order: list[Exchange] = [linked_servers[n - 1]]
    for i in range(n - 1, 0, -1):
        order.append(linked_clients[i])
        order.append(linked_servers[i - 1])
    order.append(linked_clients[0])
    chain.exchanges = order
    return chain


def _with_parent(ex: Exchange, parent: ParentHint) -> Exchange:
    from dataclasses import replace

    return replace(ex, parent=parent)
