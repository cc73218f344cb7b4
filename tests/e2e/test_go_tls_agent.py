"""Go over TLS through the real `kspan run` to a real OTLP endpoint: a Go HTTPS client -> A -> B
where A calls B from a new goroutine with three requests in flight (only goroutine parentage can
pair them), and a mixed chain Python -> Go (TLS) -> Python HTTPS."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ROOT, free_port, go_binary, running_agent, service
from tests.support.ebpf import require_ebpf
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.tls import child_env, make_cert, python_cmd

pytestmark = pytest.mark.ebpf
SERVER, CLIENT = 2, 3
GOSRC = ROOT / "tests" / "support" / "gosrc"


def _traces(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["trace_id"], []).append(s)
    return out


def _query_id(s: dict[str, Any]) -> str:
    a = s["attributes"]
    text = str(a.get("url.query") or a.get("url.full", ""))
    return text.rsplit("id=", 1)[-1] if "id=" in text else ""


def _port(s: dict[str, Any]) -> int:
    return int(s["attributes"].get("server.port", 0))


def _assert_linked_chain(trace: list[dict[str, Any]], ports: list[int]) -> None:
    """client -> ports[0] -> ports[1]: the root client calls ports[0]; that server's process calls
    ports[1] (a client span, its child); that call's server is the leaf. One request id throughout."""
    assert len(trace) == 4, trace
    by = {(s["kind"], _port(s)): s for s in trace}
    root, srv_a, cli_a, srv_b = by[(CLIENT, ports[0])], by[(SERVER, ports[0])], by[(CLIENT, ports[1])], \
        by[(SERVER, ports[1])]
    pid = lambda s: s["resource"]["process.pid"]  # noqa: E731
    assert root["parent_span_id"] == ""
    assert srv_a["parent_span_id"] == root["span_id"] and pid(srv_a) != pid(root)
    assert cli_a["parent_span_id"] == srv_a["span_id"] and pid(cli_a) == pid(srv_a), "goroutine parentage"
    assert srv_b["parent_span_id"] == cli_a["span_id"] and pid(srv_b) != pid(cli_a)
    for s in (srv_a, srv_b):
        assert s["attributes"]["url.scheme"] == "https" and s["attributes"]["url.path"] == "/work"
    for s in (root, cli_a):
        assert s["attributes"]["url.full"].startswith("https://127.0.0.1:")
    ids = {_query_id(s) for s in trace}
    assert len(ids) == 1 and ids != {""}, f"spans of different requests in one trace: {ids}"


def test_go_https_chain_with_goroutines_and_mixed_chain_arrive_whole(tmp_path: Path) -> None:
    require_ebpf()
    cert, key = make_cert(tmp_path)
    # One binary file for every Go role: Go probes attach per file, so the short-lived client
    # (started after the servers) is traced from its first instruction.
    gochain = go_binary(GOSRC, tmp_path / "gochain", "1.27")
    pa, pb, pm, pp = free_port(), free_port(), free_port(), free_port()
    tls = ["-cert", str(cert), "-key", str(key)]
    with OtlpReceiver() as rx:
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet", "--no-metrics"]
        for p in (pa, pb, pm, pp):
            args += ["--port", str(p)]
        with running_agent(args, tmp_path) as agent:
            with (
                service([str(gochain), "-listen", f"127.0.0.1:{pb}", *tls, "-delay", "20ms"]),
                service([str(gochain), "-listen", f"127.0.0.1:{pa}", *tls,
                         "-downstream", f"https://127.0.0.1:{pb}/work"]),
                service(python_cmd("serve", "--port", str(pp), "--cert", str(cert), "--key", str(key)), cwd=ROOT),
                service([str(gochain), "-listen", f"127.0.0.1:{pm}", *tls,
                         "-downstream", f"https://127.0.0.1:{pp}/work"]),
            ):
                # Go probes attach once the agent has read the binary's DWARF (1-2 s): it says when.
                agent.wait_for_log(f"{gochain} (pid")
                out = subprocess.run([str(gochain), "-client", f"https://127.0.0.1:{pa}/work",
                                      "-n", "3", "-c", "3"], capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, out.stderr
                mixed = subprocess.run(python_cmd("get", f"https://127.0.0.1:{pm}/work?id=7", "--cafile",
                                                  str(cert)), env=child_env(), capture_output=True, text=True,
                                       timeout=30)
                assert mixed.stdout.split() == ["200"], mixed.stderr

                def whole(spans: list[dict[str, Any]]) -> bool:
                    return sum(1 for t in _traces(spans).values() if len(t) >= 4) >= 4

                try:
                    spans = rx.wait_for_spans(whole, timeout_s=40)
                except TimeoutError:
                    shape = [sorted((s["resource"].get("service.name"), s["kind"], _query_id(s)) for s in t)
                             for t in _traces(rx.spans()).values()]
                    raise AssertionError(f"traces so far: {shape}\n{agent.stderr[-2000:]}") from None
        assert agent.returncode == 0, agent.stderr
    traces = [t for t in _traces(spans).values() if len(t) >= 4]
    go = [t for t in traces if any(s["kind"] == CLIENT and _port(s) == pa and not s["parent_span_id"] for s in t)]
    assert len(go) == 3, "three concurrent requests, three separate traces"
    for t in go:
        _assert_linked_chain(t, [pa, pb])
    (mixed,) = [t for t in traces if any(_port(s) == pm for s in t)]
    _assert_linked_chain(mixed, [pm, pp])
    (py_root,) = [s for s in mixed if not s["parent_span_id"]]
    assert py_root["resource"]["service.name"] != "gochain", "the mixed chain starts in Python"


def test_go_http2_over_tls_becomes_http_spans(tmp_path: Path) -> None:
    """Go's net/http negotiates h2 over TLS (ALPN): the plaintext the crypto/tls probes see opens
    with the HTTP/2 preface, and the agent gives HTTP/2 server and client spans."""
    require_ebpf()
    cert, key = make_cert(tmp_path)
    gochain = go_binary(GOSRC, tmp_path / "gochain", "1.27")
    port = free_port()
    with OtlpReceiver() as rx:
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet", "--no-metrics",
                "--port", str(port)]
        with running_agent(args, tmp_path) as agent, service([str(gochain), "-listen", f"127.0.0.1:{port}", "-h2",
                                                              "-cert", str(cert), "-key", str(key)]):
            agent.wait_for_log(f"{gochain} (pid")
            out = subprocess.run([str(gochain), "-h2", "-client", f"https://127.0.0.1:{port}/work", "-n", "4",
                                  "-c", "2"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr

            def ready(spans: list[dict[str, Any]]) -> bool:
                h2 = [s for s in spans if s["attributes"].get("network.protocol.version") == "2"]
                return sum(s["kind"] == 2 for s in h2) >= 4 and sum(s["kind"] == 3 for s in h2) >= 4

            try:
                spans = rx.wait_for_spans(ready, timeout_s=40)
            except TimeoutError:
                got = [(s["kind"], s["name"], s["attributes"].get("network.protocol.version")) for s in rx.spans()]
                raise AssertionError(f"spans so far: {got}\n{agent.stderr[-2000:]}") from None
        assert agent.returncode == 0, agent.stderr
    h2 = [s for s in spans if s["attributes"].get("network.protocol.version") == "2"]
    servers = [s for s in h2 if s["kind"] == 2]
    assert {s["attributes"].get("url.path") for s in servers} == {"/work"}
    assert all(s["attributes"].get("http.response.status_code") == 200 for s in h2)
