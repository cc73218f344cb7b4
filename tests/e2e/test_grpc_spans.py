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
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.support import h2c_upgrade, nginx_h2
from tests.support.agent import free_port, running_agent, service
from tests.support.ebpf import fail_or_skip, require_ebpf
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.tls import make_cert

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
        if request == b"big":
            return b"z" * 40000  # several DATA frames: the trailers come 40 KB into the reply
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
        for _ in range(2):
            assert len(add(b"big", timeout=10)) == 40000
        try:
            add(b"missing", timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
    print("done", flush=True)
''')


def _attr(span: dict[str, Any], key: str) -> Any:
    return span["attributes"].get(key)


def _path(span: dict[str, Any]) -> str:
    """A server span's url.path, a client span's from its url.full."""
    return str(_attr(span, "url.path") or urllib.parse.urlsplit(str(_attr(span, "url.full") or "")).path)


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
                return servers >= n + 3 and clients >= n + 3

            spans = rx.wait_for_spans(ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    rpcs = [s for s in spans if _attr(s, "rpc.system") == "grpc"]
    for kind in (SERVER, CLIENT):
        mine = [s for s in rpcs if s["kind"] == kind]
        assert {s["name"] for s in mine} == {f"{SERVICE}/Add"}, [s["name"] for s in mine]
        assert all(_attr(s, "rpc.service") == SERVICE and _attr(s, "rpc.method") == "Add" for s in mine)
        # the status comes from the trailers, which the kernel's frame walk copies wherever they
        # fall (after a 40 KB message too, whose DATA payload it never copies)
        assert sorted(_attr(s, "rpc.grpc.status_code") for s in mine) == [0] * (n + 2) + [5], mine
        failed = [s for s in mine if s["status_code"] == 2]
        assert [_attr(s, "rpc.grpc.status_code") for s in failed] == [5], failed
    assert SECRET not in json.dumps(spans)



def _need_nginx() -> None:
    if not Path(shutil.which("nginx") or "/usr/sbin/nginx").exists():
        fail_or_skip("nginx is not installed (apt-get install nginx-light)")


def _curl(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """curl with a planted secret header (from a config file: a command line is a resource
    attribute), printing `{status} {HTTP version}` and its -v trace on stderr."""
    (tmp_path / "curl.cfg").write_text(f'header = "X-Secret: {SECRET}"\n')
    return subprocess.run(["curl", "-sv", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", "10",
                           "-K", str(tmp_path / "curl.cfg"), *args], capture_output=True, text=True, timeout=20)


def _agent_args(rx: OtlpReceiver, *ports: int) -> list[str]:
    return ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet", "--no-metrics",
            *(a for p in ports for a in ("--port", str(p)))]


def _h2_ready(spans: list[dict[str, Any]]) -> bool:
    h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
    return sum(s["kind"] == SERVER for s in h2) >= 3 and sum(s["kind"] == CLIENT for s in h2) >= 3


def _assert_h2_spans(spans: list[dict[str, Any]], scheme: str, port: int) -> None:
    h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
    for kind in (SERVER, CLIENT):
        codes = sorted(_attr(s, "http.response.status_code") for s in h2 if s["kind"] == kind)
        assert codes == [200, 404, 503], (kind, codes)
        assert all(_attr(s, "http.request.method") == "GET" for s in h2 if s["kind"] == kind)
    servers = [s for s in h2 if s["kind"] == SERVER]
    assert {_attr(s, "url.path") for s in servers} == {"/", "/missing", "/boom"}
    assert {_attr(s, "url.scheme") for s in servers} == {scheme}
    assert {_attr(s, "url.full") for s in h2 if s["kind"] == CLIENT} == \
        {f"{scheme}://127.0.0.1:{port}{p}" for p in ("/", "/missing", "/boom")}
    # 5xx fails both ends, 4xx only the client's
    failed = sorted((s["kind"], _attr(s, "http.response.status_code")) for s in h2 if s["status_code"] == 2)
    assert failed == [(SERVER, 503), (CLIENT, 404), (CLIENT, 503)], failed
    assert SECRET not in json.dumps(spans)


def test_curl_http2_prior_knowledge_against_nginx_becomes_http_spans(tmp_path: Path) -> None:
    """Plain HTTP/2 (h2c) follows the HTTP conventions like HTTP/1: nginx's server spans and
    curl's client spans, with the status of each stream; no header value but the conventions'."""
    require_ebpf()
    _need_nginx()
    port = free_port()
    conf = nginx_h2.write_conf(tmp_path, port)
    with OtlpReceiver() as rx, nginx_h2.running(tmp_path, conf, [port]):
        with running_agent(_agent_args(rx, port), tmp_path) as agent:
            for path, want in (("/", "200 2"), ("/missing", "404 2"), ("/boom", "503 2")):
                got = _curl(tmp_path, "--http2-prior-knowledge", f"http://127.0.0.1:{port}{path}")
                assert got.stdout == want, got.stderr
            spans = rx.wait_for_spans(_h2_ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    _assert_h2_spans(spans, "http", port)


def test_curl_http2_over_tls_against_nginx_becomes_http_spans(tmp_path: Path) -> None:
    """h2 over TLS, chosen by ALPN, OpenSSL at both ends (Debian's curl and nginx): the OpenSSL
    probes' plaintext opens with the HTTP/2 preface and gives the same spans as h2c, with the
    https scheme."""
    require_ebpf()
    _need_nginx()
    port = free_port()
    cert, key = make_cert(tmp_path)
    conf = nginx_h2.write_conf(tmp_path, free_port(), tls_port=port, cert=cert, key=key)
    with OtlpReceiver() as rx, nginx_h2.running(tmp_path, conf, [port]):
        with running_agent(_agent_args(rx, port), tmp_path) as agent:
            for path, want in (("/", "200 2"), ("/missing", "404 2"), ("/boom", "503 2")):
                got = _curl(tmp_path, "--http2", "--cacert", str(cert), f"https://127.0.0.1:{port}{path}")
                assert got.stdout == want, got.stderr
                assert "ALPN: server accepted h2" in got.stderr, got.stderr
            spans = rx.wait_for_spans(_h2_ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    _assert_h2_spans(spans, "https", port)


def test_curl_http2_upgrade_offer_over_plain_http_stays_http1(tmp_path: Path) -> None:
    """curl --http2 on plain http sends an HTTP/1.1 request offering `Upgrade: h2c`. nginx 1.22
    never upgrades: its HTTP/1.1 listener answers in HTTP/1.1, so both ends' spans are HTTP/1.1
    with the status; its h2c listener (prior knowledge only) answers the HTTP/1.1 request with
    HTTP/2 frames (SETTINGS, then GOAWAY) that are no HTTP/1 response, and curl fails: HTTP/1.1
    spans ended by the close, with no status. Neither is taken for HTTP/2."""
    require_ebpf()
    _need_nginx()
    h2c, plain = free_port(), free_port()
    conf = nginx_h2.write_conf(tmp_path, h2c, plain_port=plain)
    with OtlpReceiver() as rx, nginx_h2.running(tmp_path, conf, [h2c, plain]):
        with running_agent(_agent_args(rx, h2c, plain), tmp_path) as agent:
            for path, want in (("/", "200 1.1"), ("/missing", "404 1.1"), ("/boom", "503 1.1")):
                got = _curl(tmp_path, "--http2", f"http://127.0.0.1:{plain}{path}")
                assert got.stdout == want and "> Upgrade: h2c" in got.stderr, got.stderr
            got = _curl(tmp_path, "--http2", f"http://127.0.0.1:{h2c}/")
            assert "> Upgrade: h2c" in got.stderr and "Received HTTP/0.9" in got.stderr, got.stderr
            assert got.returncode == 1 and got.stdout == "000 0", (got.returncode, got.stdout)

            def ready(spans: list[dict[str, Any]]) -> bool:
                ends = [s for s in spans if _attr(s, "network.protocol.version") == "1.1"]
                return sum(s["kind"] == SERVER for s in ends) >= 4 and sum(s["kind"] == CLIENT for s in ends) >= 4

            spans = rx.wait_for_spans(ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    mine = [s for s in spans if h2c in (_attr(s, "server.port"), _attr(s, "network.peer.port"))
            or plain in (_attr(s, "server.port"), _attr(s, "network.peer.port"))]
    assert not [s for s in spans if _attr(s, "network.protocol.version") == "2"], mine
    assert all(_attr(s, "network.protocol.version") == "1.1" for s in mine), mine
    for kind in (SERVER, CLIENT):
        ends = [s for s in mine if s["kind"] == kind]
        on_plain = sorted(_attr(s, "http.response.status_code") for s in ends if plain in
                          (_attr(s, "server.port"), _attr(s, "network.peer.port")))
        assert on_plain == [200, 404, 503], (kind, on_plain)
        on_h2c = [s for s in ends if h2c in (_attr(s, "server.port"), _attr(s, "network.peer.port"))]
        assert [(_attr(s, "http.response.status_code"), _attr(s, "error.type"), s["status_code"]) for s in on_h2c] \
            == [(None, "connection_closed", 2)], on_h2c
    assert SECRET not in json.dumps(spans)


PICKUP_CLIENT = textwrap.dedent('''
    import sys
    import grpc

    port, n = sys.argv[1], int(sys.argv[2])
    with grpc.insecure_channel("127.0.0.1:" + port, options=[("grpc.enable_http_proxy", 0)]) as ch:
        add = ch.unary_unary("/shop.Cart/Add")
        # before the agent: it never sees the preface, nor the headers this call puts in HPACK's table
        assert add(b"before", timeout=10) == b"added:before"
        print("connected", flush=True)
        sys.stdin.readline()
        for i in range(n):
            assert add(b"later-%d" % i, timeout=10) == b"added:later-%d" % i
    print("done", flush=True)
''')


def test_an_http2_connection_picked_up_after_its_start(tmp_path: Path) -> None:
    """A gRPC connection open before the agent started: no preface to go by, so a transfer of whole
    HTTP/2 frames says what it is. Its spans carry what can be decoded without the HPACK table's
    history (the method and status, from the static table), the rest is counted, never guessed."""
    require_ebpf()
    n = 4
    port = free_port()
    (tmp_path / "cart_grpc.py").write_text(GRPC_SERVER)
    (tmp_path / "pickup.py").write_text(PICKUP_CLIENT)
    with OtlpReceiver() as rx, service([sys.executable, str(tmp_path / "cart_grpc.py"), str(port)]):
        client = subprocess.Popen([sys.executable, str(tmp_path / "pickup.py"), str(port), str(n)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None and client.stdin is not None
            assert client.stdout.readline().strip() == "connected"
            args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                    "--no-metrics", "--port", str(port)]
            with running_agent(args, tmp_path) as agent:
                client.stdin.write("go\n")
                client.stdin.flush()
                assert client.stdout.readline().strip() == "done"

                def ready(spans: list[dict[str, Any]]) -> bool:
                    h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
                    return all(sum(s["kind"] == k for s in h2) >= n for k in (SERVER, CLIENT))

                spans = rx.wait_for_spans(ready, timeout_s=30)
        finally:
            client.kill()
            client.wait()
        assert agent.returncode == 0, agent.stderr
    h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
    for kind in (SERVER, CLIENT):
        mine = [s for s in h2 if s["kind"] == kind]
        assert len(mine) == n, mine
        assert all(_attr(s, "http.request.method") == "POST" and _attr(s, "http.response.status_code") == 200
                   for s in mine), mine
        # the path went into HPACK's table before the agent: never guessed, so no gRPC name
        assert all(s["name"] in ("POST", f"{SERVICE}/Add") for s in mine), [s["name"] for s in mine]
    summary = next(ln for ln in agent.stderr.splitlines() if ln.startswith("kspan: stopped;"))
    assert "http2_header_fields_unknown=" in summary, summary


@pytest.mark.parametrize("together", [False, True], ids=["101-apart", "101-with-frames"])
def test_curl_http2_upgrade_h2c_through_the_agent(tmp_path: Path, together: bool) -> None:
    """curl's `Upgrade: h2c` against a server that takes it (hyper-h2): the upgrade request is an
    HTTP/1.1 exchange answered `101 Switching Protocols` (its HTTP/2 answer, stream 1, rides on the
    server's first transfer after the 101, which the HTTP/1 path ends on), and the requests after it
    on the upgraded connection are HTTP/2 streams. The server's first frames may share the 101's
    transfer (together), at either end: they are walked from the 101's head on."""
    require_ebpf()
    with h2c_upgrade.serving(SECRET, together) as port, OtlpReceiver() as rx:
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--no-metrics", "--port", str(port)]
        with running_agent(args, tmp_path) as agent:
            # the URLs and a secret header from a config file: a command line is a resource attribute
            cfg = tmp_path / "curl.cfg"
            cfg.write_text(f'header = "X-Secret: {SECRET}"\n' + "".join(
                f'url = "http://127.0.0.1:{port}{path}"\noutput = "/dev/null"\n'
                for path in (f"/up?token={SECRET}", "/next", "/missing")))
            out = subprocess.run(["curl", "-s", "--http2", "-w", "%{http_code} ", "--max-time", "10", "-K", str(cfg)],
                                 capture_output=True, text=True, timeout=20).stdout
            assert out.split() == ["200", "200", "404"], out

            def ready(spans: list[dict[str, Any]]) -> bool:
                h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
                return sum(s["kind"] == SERVER for s in h2) >= 2 and sum(s["kind"] == CLIENT for s in h2) >= 2

            spans = rx.wait_for_spans(ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    h2 = [s for s in spans if _attr(s, "network.protocol.version") == "2"]
    for kind in (SERVER, CLIENT):
        got = sorted((_path(s), _attr(s, "http.response.status_code")) for s in h2 if s["kind"] == kind)
        assert got == [("/missing", 404), ("/next", 200)], (kind, got)
    up = [s for s in spans if _attr(s, "network.protocol.version") == "1.1"]
    assert {s["kind"] for s in up} == {SERVER, CLIENT}, up
    assert all(_path(s) == "/up" and _attr(s, "http.response.status_code") == 101 for s in up), up
    assert SECRET not in json.dumps(spans)
