"""End to end on the real kernel: real services in a chain, the real agent, a real OTLP endpoint.

The client is this test process itself, so the client-measured duration of each request can be
compared with the span kspan reports for it.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import KSPAN, ROOT, free_port, go_binary, running_agent, service
from tests.support.ebpf import require_ebpf
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"
SERVER, CLIENT = 2, 3  # OTLP span kinds
SEND_SKEW_NS = 1_000_000
ERROR = 2


def _get(host: str, port: int, path: str) -> tuple[int, float]:
    """One request on a fresh connection; returns (status, client-measured milliseconds)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.connect()
    t0 = time.monotonic_ns()
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    t1 = time.monotonic_ns()
    conn.close()
    return resp.status, (t1 - t0) / 1e6


def _traces(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["trace_id"], []).append(s)
    return out


def _complete_traces(n_traces: int, size: int):
    def pred(spans: list[dict[str, Any]]) -> bool:
        return sum(1 for t in _traces(spans).values() if len(t) >= size) >= n_traces
    return pred


def _wait_traces(receiver: OtlpReceiver, n_traces: int, size: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    try:
        return receiver.wait_for_spans(_complete_traces(n_traces, size), timeout_s=timeout_s)
    except TimeoutError:
        shape = [
            sorted((_svc(s), s["kind"], s["span_id"], s["parent_span_id"]) for s in t)
            for t in _traces(receiver.spans()).values()
        ]
        raise AssertionError(f"wanted {n_traces} traces of {size} spans; got {shape}") from None


def _svc(span: dict[str, Any]) -> str:
    return span["resource"]["service.name"]


def _only(spans: list[dict[str, Any]], service: str, kind: int) -> dict[str, Any]:
    found = [s for s in spans if _svc(s) == service and s["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} span of {service}, got {found}"
    return found[0]


def _assert_chain(trace: list[dict[str, Any]], client_service: str, hops: list[str], ports: list[int]) -> None:
    """client -> hops[0] -> hops[1] ...: each hop has a server span whose parent is the previous
    client span, and (except the last) a client span whose parent is its own server span."""
    by_id = {s["span_id"]: s for s in trace}
    assert len(by_id) == len(trace), "duplicate span ids in one trace"
    root = _only(trace, client_service, CLIENT)
    assert root["parent_span_id"] == "", "the outermost client span is the root"
    parent = root
    for i, (svc, port) in enumerate(zip(hops, ports, strict=True)):
        server = _only(trace, svc, SERVER)
        assert server["parent_span_id"] == parent["span_id"], f"{svc} server span's parent"
        assert server["name"] == "GET /chain"  # the route heuristic: no --route given
        a = server["attributes"]
        assert a["http.request.method"] == "GET"
        assert a["url.path"] == a["http.route"] == "/chain"
        assert a["url.scheme"] == "http"
        assert a["http.response.status_code"] == 200
        assert a["server.port"] == port
        assert a["network.protocol.version"] == "1.1"
        assert a["network.peer.address"] in ("127.0.0.1", "::1")
        assert "client.address" in a
        assert server["status_code"] != ERROR
        # The server's work lies inside its caller's span. Its end is stamped when its send
        # returns, but loopback delivers the bytes inside that send, so the client's read (on the
        # other core) may finish a few microseconds earlier: allow that skew, not more.
        assert parent["start_ns"] <= server["start_ns"] <= server["end_ns"] <= parent["end_ns"] + SEND_SKEW_NS
        if i + 1 < len(hops):
            client = _only(trace, svc, CLIENT)
            assert client["parent_span_id"] == server["span_id"], f"{svc} client span's parent"
            assert client["name"] == "GET"
            ca = client["attributes"]
            assert ca["url.full"] == f"http://127.0.0.1:{ports[i + 1]}/chain"
            assert ca["server.port"] == ports[i + 1]
            assert ca["http.response.status_code"] == 200
            assert server["start_ns"] <= client["start_ns"] <= client["end_ns"] <= server["end_ns"]
            parent = client
    assert len(trace) == 2 * len(hops)


def _assert_durations(trace_roots: list[dict[str, Any]], measured_ms: list[float]) -> None:
    """Each root client span lasts what the client measured, within a few milliseconds; the
    kernel sees the exchange from the first write to the last read, inside the client's window."""
    roots = sorted(trace_roots, key=lambda s: s["start_ns"])
    assert len(roots) == len(measured_ms)
    for root, ms in zip(roots, measured_ms, strict=True):
        span_ms = (root["end_ns"] - root["start_ns"]) / 1e6
        assert span_ms <= ms + 0.5, (span_ms, ms)
        assert ms - span_ms < 5.0, (span_ms, ms)


BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
GRAPH_EDGES = {("svc_a", "svc_b"), ("svc_b", "svc_c")}


def _latest(metrics: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The newest point of each attribute set (metrics are cumulative and re-exported)."""
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for m in metrics:
        if m["name"] == name:
            key = (m["resource"].get("service.name"), tuple(sorted(m["attributes"].items())))
            if key not in newest or m["time_ns"] >= newest[key]["time_ns"]:
                newest[key] = m
    return list(newest.values())


def _has_chain_metrics(metrics: list[dict[str, Any]]) -> bool:
    edges = {(m["attributes"].get("client"), m["attributes"].get("server"))
             for m in _latest(metrics, "traces_service_graph_request_total") if m["value"] >= 3}
    served = {m["resource"].get("service.name") for m in _latest(metrics, "http.server.request.duration")
              if m["count"] >= 3}
    return GRAPH_EDGES <= edges and {"svc_a", "svc_b", "svc_c"} <= served


def _assert_chain_metrics(metrics: list[dict[str, Any]]) -> None:
    server = [m for m in _latest(metrics, "http.server.request.duration")
              if m["resource"].get("service.name") in ("svc_a", "svc_b", "svc_c")]
    assert server
    for m in server:
        assert m["type"] == "histogram" and m["unit"] == "s"
        assert m["explicit_bounds"] == BUCKETS
        assert m["attributes"]["http.request.method"] == "GET"
        assert m["attributes"]["http.response.status_code"] == 200
        assert m["attributes"]["http.route"] == "/chain"  # metrics carry the heuristic route
        assert "url.path" not in m["attributes"] and "process.pid" not in m["attributes"], "cardinality"
        assert m["count"] == 3 and 0 < m["sum"] < 10
    client = _latest(metrics, "http.client.request.duration")
    assert {m["resource"].get("service.name") for m in client} >= {"svc_a", "svc_b"}
    assert all(m["unit"] == "s" and m["explicit_bounds"] == BUCKETS for m in client)
    for name in ("traces_service_graph_request_server_seconds", "traces_service_graph_request_client_seconds"):
        edges = {(m["attributes"]["client"], m["attributes"]["server"]) for m in _latest(metrics, name)}
        assert GRAPH_EDGES <= edges, (name, edges)


def _assert_topology(tmp_path: Path, jsonl: Path) -> None:
    svg, png = tmp_path / "topo.svg", tmp_path / "topo.png"
    r = subprocess.run(KSPAN + ["topology", "--input", str(jsonl), "--svg", str(svg), "--png", str(png)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for client, server in GRAPH_EDGES:
        assert any(client in line and server in line for line in lines), r.stdout
    assert svg.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "svc_c" in svg.read_text()


@pytest.fixture()
def receiver():
    with OtlpReceiver() as rx:
        yield rx


def test_python_chain_is_one_trace_of_six_spans_over_otlp_grpc(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    ports = [free_port() for _ in range(3)]
    names = ["svc_a", "svc_b", "svc_c"]
    for n in names:
        shutil.copy(CHAIN_SERVER, tmp_path / f"{n}.py")
    py = shutil.which("python3") or "python3"
    with (
        service([py, str(tmp_path / "svc_c.py"), str(ports[2])]),
        service([py, str(tmp_path / "svc_b.py"), str(ports[1]), f"http://127.0.0.1:{ports[2]}/chain"]),
        service([py, str(tmp_path / "svc_a.py"), str(ports[0]), f"http://127.0.0.1:{ports[1]}/chain"]),
    ):
        jsonl = tmp_path / "chain.jsonl"
        args = ["run", "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--output", str(jsonl), "--metrics-interval", "1"]
        for p in ports:
            args += ["--port", str(p)]
        with running_agent(args, tmp_path) as agent:
            measured = []
            for _ in range(3):
                status, ms = _get("127.0.0.1", ports[0], "/chain")
                assert status == 200
                measured.append(ms)
            spans = _wait_traces(receiver, 3, 6)
            metrics = receiver.wait_for_metrics(_has_chain_metrics, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    _assert_chain_metrics(metrics)
    _assert_topology(tmp_path, jsonl)
    traces = [t for t in _traces(spans).values() if len(t) >= 6]
    assert len(traces) == 3, f"{len(traces)} complete traces: {_traces(spans)}"
    client_service = _svc([s for s in traces[0] if s["parent_span_id"] == ""][0])
    for t in traces:
        _assert_chain(t, client_service, names, ports)
        for s in t:
            assert s["transport"] == "grpc"
            assert s["resource"]["process.pid"] > 0
            assert s["resource"]["host.name"] == socket.gethostname()
    _assert_durations([s for t in traces for s in t if s["parent_span_id"] == ""], measured)
    # Each span exactly once.
    assert len({s["span_id"] for s in spans}) == len(spans)


def test_go_chain_is_one_trace_over_otlp_http(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    binary = go_binary(ROOT / "tests" / "support" / "gochain", tmp_path / "goa")
    shutil.copy(binary, tmp_path / "gob")
    pa, pb = free_port(), free_port()
    with (
        service([str(tmp_path / "gob"), "-listen", f"127.0.0.1:{pb}"]),
        service([str(tmp_path / "goa"), "-listen", f"127.0.0.1:{pa}", "-next", f"http://127.0.0.1:{pb}/chain"]),
    ):
        args = ["run", "--otlp-endpoint", receiver.http_endpoint, "--otlp-protocol", "http/protobuf", "--quiet",
                "--port", str(pa), "--port", str(pb)]
        with running_agent(args, tmp_path) as agent:
            measured = []
            for _ in range(3):
                status, ms = _get("127.0.0.1", pa, "/chain")
                assert status == 200
                measured.append(ms)
            spans = _wait_traces(receiver, 3, 4)
        assert agent.returncode == 0, agent.stderr
    traces = [t for t in _traces(spans).values() if len(t) >= 4]
    assert len(traces) == 3
    client_service = _svc([s for s in traces[0] if s["parent_span_id"] == ""][0])
    for t in traces:
        _assert_chain(t, client_service, ["goa", "gob"], [pa, pb])
        assert all(s["transport"] == "http" for s in t)
    _assert_durations([s for t in traces for s in t if s["parent_span_id"] == ""], measured)


def test_status_rules_ipv6_and_network_metrics(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    port = free_port(socket.AF_INET6)
    shutil.copy(CHAIN_SERVER, tmp_path / "svc_v6.py")
    py = shutil.which("python3") or "python3"
    closed = free_port()  # nothing listens there: connecting to it is a failed TCP connect
    with service([py, str(tmp_path / "svc_v6.py"), str(port), "", "6"]):
        args = ["run", "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--port", str(port), "--port", str(closed), "--metrics-interval", "1"]
        with running_agent(args, tmp_path):
            assert _get("::1", port, "/status/503")[0] == 503
            assert _get("::1", port, "/status/404")[0] == 404
            for _ in range(3):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", closed), timeout=2)
            spans = receiver.wait_for_spans(lambda ss: len(ss) >= 4, timeout_s=30)
            failures = receiver.wait_for_metrics(
                lambda ms: any(m["name"] == "kspan.network.tcp.connect_failures"
                               and m["attributes"].get("destination") == f"127.0.0.1:{closed}"
                               and m["value"] >= 3 for m in ms),
                timeout_s=30,
            )
    assert any(m["name"] == "kspan.network.tcp.connect_failures" and m["monotonic"] for m in failures)
    by = {(s["kind"], s["attributes"].get("http.response.status_code")): s for s in spans}
    assert by[(SERVER, 503)]["status_code"] == ERROR
    assert by[(SERVER, 503)]["attributes"]["error.type"] == "503"
    assert by[(CLIENT, 503)]["status_code"] == ERROR
    assert by[(SERVER, 404)]["status_code"] != ERROR, "4xx is not a server error"
    assert by[(CLIENT, 404)]["status_code"] == ERROR, "4xx is a client error"
    srv = by[(SERVER, 404)]
    assert srv["attributes"]["network.peer.address"] == "::1"
    assert srv["attributes"]["url.path"] == "/status/404"
    assert by[(CLIENT, 404)]["attributes"]["url.full"] == f"http://[::1]:{port}/status/404"
    assert srv["parent_span_id"] == by[(CLIENT, 404)]["span_id"]
