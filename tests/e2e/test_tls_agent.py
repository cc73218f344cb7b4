"""HTTPS through the real `kspan run` to a real OTLP endpoint: curl -> nginx over TLS with a
plaintext request beside it, and a Python HTTPS client -> Python HTTPS server. Each exchange is
one span, with url.scheme https, linked across the two processes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ROOT, free_port, running_agent, service
from tests.support.ebpf import require_ebpf
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.tls import child_env, make_cert, nginx, python_cmd

pytestmark = pytest.mark.ebpf
SERVER, CLIENT = 2, 3


def _pairs(spans: list[dict[str, Any]], port: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(client span, server span) pairs linked by parent id, for calls to `port`."""
    servers = [s for s in spans if s["kind"] == SERVER and s["attributes"].get("server.port") == port]
    by_id = {s["span_id"]: s for s in spans}
    return [(by_id[s["parent_span_id"]], s) for s in servers if s["parent_span_id"] in by_id]


def test_https_spans_arrive_at_the_endpoint_linked_and_once(tmp_path: Path) -> None:
    require_ebpf()
    cert, key = make_cert(tmp_path)
    tls_port, plain_port, py_port = free_port(), free_port(), free_port()
    with OtlpReceiver() as rx, nginx(tmp_path / "nginx", tls_port, plain_port, cert, key):
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet", "--no-metrics",
                "--port", str(tls_port), "--port", str(plain_port), "--port", str(py_port)]
        with running_agent(args, tmp_path) as agent:
            with service(python_cmd("serve", "--port", str(py_port), "--cert", str(cert), "--key", str(key)),
                         cwd=ROOT):
                for url in (f"https://127.0.0.1:{tls_port}/secure?n=1", f"http://127.0.0.1:{plain_port}/plain",
                            f"https://127.0.0.1:{tls_port}/secure?n=2"):
                    r = subprocess.run(["curl", "-sf", "--cacert", str(cert), "-o", "/dev/null", url],
                                       timeout=30)
                    assert r.returncode == 0, url
                out = subprocess.run(python_cmd("get", f"https://127.0.0.1:{py_port}/work?x=1", "--cafile",
                                                str(cert), "-n", "2"),
                                     env=child_env(), capture_output=True, text=True, timeout=30)
                assert out.stdout.split() == ["200"] * 2, out.stderr

                def done(spans: list[dict[str, Any]]) -> bool:
                    return (len(_pairs(spans, tls_port)) >= 2 and len(_pairs(spans, plain_port)) >= 1
                            and len(_pairs(spans, py_port)) >= 2)

                try:
                    spans = rx.wait_for_spans(done, timeout_s=40)
                except TimeoutError:
                    got = [(s["kind"], s["resource"].get("service.name"), s["attributes"].get("server.port"),
                            s["span_id"], s["parent_span_id"],
                            s["attributes"].get("url.path") or s["attributes"].get("url.full"))
                           for s in rx.spans()]
                    raise AssertionError(f"spans so far: {got}\n{agent.stderr[-3000:]}") from None
        assert agent.returncode == 0, agent.stderr

    tls = _pairs(spans, tls_port)
    assert len(tls) == 2, "each HTTPS exchange exactly once"
    for client, server in tls:
        assert server["attributes"]["url.scheme"] == "https"
        assert server["attributes"]["url.path"] == "/secure"
        assert client["attributes"]["url.full"].startswith(f"https://127.0.0.1:{tls_port}/secure")
        assert server["resource"]["service.name"] == "nginx" and client["resource"]["service.name"] == "curl"
        assert server["attributes"]["http.response.status_code"] == 200
        assert server["trace_id"] == client["trace_id"]
    (pc, ps), = _pairs(spans, plain_port)
    assert ps["attributes"]["url.scheme"] == "http" and pc["attributes"]["url.full"].startswith("http://")
    py = _pairs(spans, py_port)
    assert len(py) == 2
    for client, server in py:
        assert server["attributes"]["url.scheme"] == "https" and server["attributes"]["url.path"] == "/work"
        assert client["attributes"]["url.full"].startswith("https://")
    # Encrypted bytes never make spans of their own: every span on these ports is one of the pairs.
    on_ports = [s for s in spans if s["attributes"].get("server.port") in (tls_port, plain_port, py_port)]
    assert len(on_ports) == 2 * (len(tls) + 1 + len(py)), [s["attributes"] for s in on_ports]
