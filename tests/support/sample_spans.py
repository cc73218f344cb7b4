"""Correlator spans built by hand for exporter tests (a client -> A -> B chain, like the e2e tests)."""

from __future__ import annotations

import hashlib

from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode

T0 = 1_700_000_000_000_000_000  # wall-clock ns


def _id(seed: str, n: int) -> bytes:
    return hashlib.sha256(seed.encode()).digest()[:n]


def processes() -> dict[int, ProcessInfo]:
    return {
        101: ProcessInfo(pid=101, service_name="frontend", executable_name="python3",
                         command_line="python3 frontend.py --port 8080",
                         attributes={"host.name": "node-1", "k8s.pod.name": "frontend-abc"}),
        202: ProcessInfo(pid=202, service_name="backend", executable_name="backend",
                         command_line="./backend", attributes={"host.name": "node-1"}),
    }


def chain_trace(seed: str = "t1", status: int = 200, offset_ns: int = 0) -> list[Span]:
    """frontend SERVER GET /api -> frontend CLIENT GET -> backend SERVER GET /items (3 spans)."""
    trace = _id(seed, 16)
    root, client, server = _id(seed + "a", 8), _id(seed + "b", 8), _id(seed + "c", 8)
    t = T0 + offset_ns
    err = StatusCode.ERROR if status >= 500 else StatusCode.UNSET
    return [
        Span(trace_id=trace, span_id=server, parent_span_id=client, name="GET /items",
             kind=SpanKind.SERVER, start_ns=t + 2_000_000, end_ns=t + 7_000_000, pid=202,
             attributes={"http.request.method": "GET", "url.path": "/items/42", "url.scheme": "http",
                         "http.route": "/items", "http.response.status_code": status,
                         "server.port": 8081, "network.protocol.version": "1.1",
                         "client.address": "127.0.0.1"},
             status=err, peer_pid=101),
        Span(trace_id=trace, span_id=client, parent_span_id=root, name="GET", kind=SpanKind.CLIENT,
             start_ns=t + 1_000_000, end_ns=t + 8_000_000, pid=101,
             attributes={"http.request.method": "GET", "url.full": "http://127.0.0.1:8081/items/42",
                         "server.address": "127.0.0.1", "server.port": 8081,
                         "http.response.status_code": status, "network.protocol.version": "1.1"},
             status=err, peer_pid=202),
        Span(trace_id=trace, span_id=root, parent_span_id=None, name="GET /api", kind=SpanKind.SERVER,
             start_ns=t, end_ns=t + 10_000_000, pid=101,
             attributes={"http.request.method": "GET", "url.path": "/api", "url.scheme": "http",
                         "http.response.status_code": status, "server.port": 8080,
                         "network.protocol.version": "1.1", "user_agent.original": "curl/8.0"},
             status=err),
    ]


def many_traces(n: int, prefix: str = "m") -> list[Span]:
    out: list[Span] = []
    for i in range(n):
        out.extend(chain_trace(f"{prefix}{i}", offset_ns=i * 1000))
    return out
