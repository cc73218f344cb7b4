"""HTTP/2 and gRPC over h2c become spans for real: a grpcio server and a grpcio client in two processes, the
agent on the real kernel (the connection is recognised by its HTTP/2 preface and leaves the kernel
as bounded segments), a real OTLP endpoint. Each call gives a server span and a client span named
`{service}/{method}` with the RPC conventions' attributes and the status from the trailers; no
metadata value leaves the agent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import nginx_h2
from tests.support.agent import free_port, running_agent, service
from tests.support.ebpf import fail_or_skip, require_ebpf
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.ebpf

SERVER, CLIENT = 2, 3
SECRET = "grpc-meta-sekrit-31"
SERVICE = "shop.Cart"

GRPC_SERVER = textwrap.dedent('''
    import sys, time
    from concurrent.futures import ThreadPoolExecutor
    import grpc

    def add(request, context):
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such item")
        return b"added:" + request

    handler = grpc.method_handlers_generic_handler("shop.Cart", {"Add": grpc.unary_unary_rpc_method_handler(add)})
    server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()
''')

GRPC_CLIENT = textwrap.dedent('''
    import os, sys
    import grpc

    port, n = sys.argv[1], int(sys.argv[2])
    secret = os.environ["GRPC_SECRET"]  # not on the command line: that is a resource attribute
    with grpc.insecure_channel("127.0.0.1:" + port, options=[("grpc.enable_http_proxy", 0)]) as ch:
        add = ch.unary_unary("/shop.Cart/Add")
        for i in range(n):
            assert add(b"item-%d" % i, metadata=(("x-api-key", secret),), timeout=10) == b"added:item-%d" % i
        try:
            add(b"missing", timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
    print("done", flush=True)
''')


def _attr(span: dict[str, Any], key: str) -> Any:
    return span["attributes"].get(key)


def test_grpc_calls_become_server_and_client_spans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    monkeypatch.setenv("GRPC_SECRET", SECRET)  # the caller inherits it
    n = 4
    port = free_port()
    (tmp_path / "cart_grpc.py").write_text(GRPC_SERVER)
    (tmp_path / "cart_caller.py").write_text(GRPC_CLIENT)
    with OtlpReceiver() as rx, service([sys.executable, str(tmp_path / "cart_grpc.py"), str(port)]):
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--no-metrics", "--port", str(port)]
        with running_agent(args, tmp_path) as agent:
            # the caller starts after the agent: its connection opens with the HTTP/2 preface
            with service([sys.executable, str(tmp_path / "cart_caller.py"), str(port), str(n)],
                         ready="done"):
                pass

            def ready(spans: list[dict[str, Any]]) -> bool:
                rpcs = [s for s in spans if _attr(s, "rpc.system") == "grpc"]
                servers, clients = (sum(s["kind"] == k for s in rpcs) for k in (SERVER, CLIENT))
                return servers >= n + 1 and clients >= n + 1

            spans = rx.wait_for_spans(ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    rpcs = [s for s in spans if _attr(s, "rpc.system") == "grpc"]
    for kind in (SERVER, CLIENT):
        mine = [s for s in rpcs if s["kind"] == kind]
        assert {s["name"] for s in mine} == {f"{SERVICE}/Add"}, [s["name"] for s in mine]
        assert all(_attr(s, "rpc.service") == SERVICE and _attr(s, "rpc.method") == "Add" for s in mine)
        failed = [s for s in mine if s["status_code"] == 2]
        # the status comes from the trailers; a status sent as an index into a header table the
        # bounded copy lost is left out (counted), never guessed
        assert len(failed) <= 1 and all(_attr(s, "rpc.grpc.status_code") == 5 for s in failed), failed
        assert sum(_attr(s, "rpc.grpc.status_code") == 0 for s in mine) >= 1, mine
    assert SECRET not in json.dumps(spans)




def test_curl_http2_prior_knowledge_against_nginx_becomes_http_spans(tmp_path: Path) -> None:
    """Plain HTTP/2 (h2c) follows the HTTP conventions like HTTP/1: nginx's server spans and
    curl's client spans, with the status of each stream; no header value but the conventions'."""
    require_ebpf()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        fail_or_skip("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    conf = nginx_h2.write_conf(tmp_path, port)
    wrapper = tmp_path / "run_nginx.sh"
    wrapper.write_text(f"#!/bin/sh\necho listening\nexec {nginx} -p {tmp_path} -c {conf} -e {tmp_path}/error.log\n")
    wrapper.chmod(0o755)
    with OtlpReceiver() as rx, service([str(wrapper)]):
        time.sleep(0.3)  # nginx binds after printing
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--no-metrics", "--port", str(port)]
        with running_agent(args, tmp_path) as agent:
            # the header from a config file: a command line is a resource attribute
            (tmp_path / "curl.cfg").write_text(f'header = "X-Secret: {SECRET}"\n')
            for path, want in (("/", "200"), ("/missing", "404"), ("/boom", "503")):
                got = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                                      "--http2-prior-knowledge", "-K", str(tmp_path / "curl.cfg"),
                                      f"http://127.0.0.1:{port}{path}"],
                                     capture_output=True, text=True, timeout=20).stdout
                assert got == want, got

            def ready(spans: list[dict[str, Any]]) -> bool:
                h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
                return sum(s["kind"] == SERVER for s in h2) >= 3 and sum(s["kind"] == CLIENT for s in h2) >= 3

            spans = rx.wait_for_spans(ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
    for kind in (SERVER, CLIENT):
        codes = sorted(_attr(s, "http.response.status_code") for s in h2 if s["kind"] == kind)
        assert codes == [200, 404, 503], (kind, codes)
        assert all(_attr(s, "http.request.method") == "GET" for s in h2 if s["kind"] == kind)
    assert {_attr(s, "url.path") for s in h2 if s["kind"] == SERVER} == {"/", "/missing", "/boom"}
    assert SECRET not in json.dumps(spans)
