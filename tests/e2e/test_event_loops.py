"""Event-loop servers under concurrency: never a wrong parent, and a link where evidence names one.

A Node.js server, a Python asyncio (aiohttp) server and nginx as a reverse proxy with upstream
keep-alive each serve 24 (nginx: 16) concurrent requests, and make one downstream call per
request. A thread serving several requests at once cannot tell the kernel which request a call
belongs to: each downstream client span must then have either the right parent (the server span
of the request whose unique id it forwards) or none, counted as ambiguous. A thread-per-request
Python server keeps full linking. The agent runs for real and exports to a real OTLP endpoint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ROOT, free_port, running_agent, service
from tests.support.ebpf import fail_or_skip, require_ebpf
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.ebpf

SERVER, CLIENT = 2, 3
CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"
CONCURRENCY = 24

NODE_SERVER = textwrap.dedent("""
    const http = require("http");
    const [port, downstream] = [Number(process.argv[2]), Number(process.argv[3])];
    const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
    http.createServer((req, res) => {
      const id = new URL(req.url, "http://x").searchParams.get("id");
      http.get({ host: "127.0.0.1", port: downstream, path: "/slow?ms=30&id=" + id, agent }, (r) => {
        r.resume();
        r.on("end", () => { res.writeHead(200, { "Content-Type": "text/plain" }); res.end("ok " + id); });
      });
    }).listen(port, "127.0.0.1", () => console.log("listening"));
""")

# The same service, forwarding each request's X-Request-ID on its downstream call (as request-id
# middleware and proxies do): that evidence names the request the call belongs to.
NODE_RID_SERVER = NODE_SERVER.replace(
    'path: "/slow?ms=30&id=" + id, agent }',
    'path: "/slow?ms=30&id=" + id, agent, headers: { "x-request-id": req.headers["x-request-id"] } }')

AIOHTTP_SERVER = textwrap.dedent("""
    import sys
    from aiohttp import ClientSession, TCPConnector, web

    port, downstream = int(sys.argv[1]), int(sys.argv[2])

    async def handle(request):
        rid = request.query["id"]
        async with request.app["session"].get(f"http://127.0.0.1:{downstream}/slow?ms=30&id={rid}") as r:
            await r.read()
        return web.Response(text="ok " + rid)

    async def session(app):
        app["session"] = ClientSession(connector=TCPConnector(limit=64))
        yield
        await app["session"].close()

    app = web.Application()
    app.router.add_get("/work", handle)
    app.cleanup_ctx.append(session)
    print("listening", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None)
""")

THREADED_SERVER = textwrap.dedent("""
    import http.client, sys, urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, downstream = int(sys.argv[1]), int(sys.argv[2])

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a):
            pass
        def do_GET(self):
            rid = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["id"][0]
            c = http.client.HTTPConnection("127.0.0.1", downstream, timeout=10)
            c.request("GET", f"/slow?ms=30&id={rid}")
            c.getresponse().read()
            c.close()
            body = ("ok " + rid).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    print("listening", flush=True)
    srv.serve_forever()
""")

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{
        server 127.0.0.1:{downstream};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend/slow?ms=30&$args;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@pytest.fixture()
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def _attr(span: dict[str, Any], key: str) -> Any:
    return span["attributes"].get(key)


def _id_of(span: dict[str, Any]) -> str | None:
    """The request id a span carries in its query (server spans) or URL (client spans)."""
    text = _attr(span, "url.query") or _attr(span, "url.full") or ""
    for part in str(text).split("?")[-1].split("&"):
        if part.startswith("id="):
            return part[3:]
    return None


def _drive(port: int, path: str, n: int, echoes_id: bool = True) -> None:
    """n requests at once, each on its own connection, each with a unique id in its query and its
    X-Request-ID (which the service echoes back, unless it is a proxy)."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            start.wait(10)
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}?id=r{i}",
                                         headers={"X-Request-ID": f"rid-{i:04d}-kspan"})
            with urllib.request.urlopen(req, timeout=20) as r:
                body = r.read()
                assert r.status == 200 and (not echoes_id or body.endswith(f"r{i}".encode())), body
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


def _check(receiver: OtlpReceiver, service_port: int, downstream_port: int, n: int,
           want_full_linking: bool) -> dict[str, int]:
    """Wait for the n server spans and n downstream calls of the service; assert no wrong parent."""
    def ready(spans: list[dict[str, Any]]) -> bool:
        servers = [s for s in spans if s["kind"] == SERVER and _attr(s, "server.port") == service_port]
        calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "network.peer.port") == downstream_port]
        return len(servers) >= n and len(calls) >= n

    try:
        spans = receiver.wait_for_spans(ready, timeout_s=30)
    except TimeoutError:
        raise AssertionError(f"spans missing: {[(s['kind'], _attr(s, 'server.port')) for s in receiver.spans()]}")\
            from None
    servers = {s["span_id"]: s for s in spans if s["kind"] == SERVER and _attr(s, "server.port") == service_port}
    # by the TCP peer: a proxy names its upstream in Host (nginx: `backend`, port 80)
    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "network.peer.port") == downstream_port]
    wrong, linked, unlinked, evidence = [], 0, 0, 0
    for c in calls:
        src = _attr(c, "kspan.parent.source")
        assert src, f"every span says how its parent was found: {c['attributes']}"
        if not c["parent_span_id"]:
            unlinked += 1
            assert src == "none", src
            continue
        parent = servers.get(c["parent_span_id"])
        if parent is None or _id_of(parent) != _id_of(c):
            wrong.append((_id_of(parent) if parent else c["parent_span_id"], _id_of(c), src))
        else:
            linked += 1
            evidence += src == "evidence"
    assert not wrong, f"{len(wrong)} of {len(calls)} calls were given another request's parent: {wrong[:5]}"
    if want_full_linking:
        assert linked == n, f"thread-per-request: every call linked, got {linked} of {n}"
    return {"linked": linked, "unlinked": unlinked, "evidence": evidence}


def _ambiguous_in_summary(stderr: str) -> int:
    line = next((ln for ln in stderr.splitlines() if ln.startswith("kspan: stopped;")), "")
    for part in line.split(";", 1)[-1].split(","):
        k, _, v = part.strip().partition("=")
        if k == "ambiguous_parents":
            return int(v)
    return 0


def _run_case(tmp_path: Path, receiver: OtlpReceiver, server_cmd: list[str], port: int, downstream: int,
              path: str, n: int, want_full_linking: bool, echoes_id: bool = True) -> tuple[dict[str, int], int]:
    shutil.copy(CHAIN_SERVER, tmp_path / "downstream.py")
    with service([sys.executable, str(tmp_path / "downstream.py"), str(downstream)]), service(server_cmd):
        args = ["run", "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--no-metrics", "--port", str(port), "--port", str(downstream)]
        with running_agent(args, tmp_path) as agent:
            _drive(port, path, n, echoes_id)
            counts = _check(receiver, port, downstream, n, want_full_linking)
        assert agent.returncode == 0, agent.stderr
    ambiguous = _ambiguous_in_summary(agent.stderr)
    # every call left without a parent was counted as ambiguous: none was dropped silently
    assert ambiguous >= counts["unlinked"], (counts, ambiguous, agent.stderr[-1500:])
    return counts, ambiguous


def _script_case(tmp_path: Path, receiver: OtlpReceiver, interpreter: str, name: str, source: str,
                 want_full_linking: bool) -> tuple[dict[str, int], int]:
    """A service written to `name` and run as `interpreter name PORT DOWNSTREAM`, driven with
    CONCURRENCY requests at once on /work."""
    (tmp_path / name).write_text(source)
    port, downstream = free_port(), free_port()
    return _run_case(tmp_path, receiver, [interpreter, str(tmp_path / name), str(port), str(downstream)],
                     port, downstream, "/work", CONCURRENCY, want_full_linking=want_full_linking)


def test_node_event_loop_never_gets_a_wrong_parent(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        fail_or_skip("Node.js is not installed (apt-get install nodejs)")
    counts, ambiguous = _script_case(tmp_path, receiver, node, "server.js", NODE_SERVER, want_full_linking=False)
    assert counts["unlinked"] > 0 and ambiguous > 0, "24 requests at once on one thread: ambiguity is expected"


def test_node_forwarding_x_request_id_links_by_evidence(tmp_path: Path, receiver: OtlpReceiver) -> None:
    """The event loop forwards each request's X-Request-ID downstream: every call is linked to its
    own request, by evidence."""
    require_ebpf()
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        fail_or_skip("Node.js is not installed (apt-get install nodejs)")
    assert NODE_RID_SERVER != NODE_SERVER
    counts, _ = _script_case(tmp_path, receiver, node, "rid_server.js", NODE_RID_SERVER, want_full_linking=True)
    assert counts["evidence"] > 0, counts


def test_asyncio_event_loop_never_gets_a_wrong_parent(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    counts, ambiguous = _script_case(tmp_path, receiver, sys.executable, "aio_server.py", AIOHTTP_SERVER,
                                     want_full_linking=False)
    assert counts["unlinked"] > 0 and ambiguous > 0


def test_nginx_proxy_with_upstream_keepalive_never_gets_a_wrong_parent(tmp_path: Path,
                                                                        receiver: OtlpReceiver) -> None:
    require_ebpf()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        fail_or_skip("nginx is not installed (apt-get install nginx-light)")
    port, downstream = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, port=port, downstream=downstream))
    subprocess.run([nginx, "-t", "-c", str(conf)], check=True, capture_output=True, timeout=10)
    wrapper = tmp_path / "run_nginx.sh"
    wrapper.write_text(f"#!/bin/sh\necho listening\nexec {nginx} -c {conf}\n")
    wrapper.chmod(0o755)
    # the proxy rewrites the target (/work?id=r1 -> /slow?ms=30&id=r1): no evidence names the
    # request, so a call made while several are in flight has no parent
    _run_case(tmp_path, receiver, [str(wrapper)], port, downstream, "/work", 16, want_full_linking=False,
              echoes_id=False)


def test_nginx_proxy_forwarding_the_request_line_links_by_evidence(tmp_path: Path,
                                                                   receiver: OtlpReceiver) -> None:
    """`proxy_pass` without a URI forwards each request's line unchanged; every request's target
    is unique (?id=rN), so that evidence names the request of every upstream call."""
    require_ebpf()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        fail_or_skip("nginx is not installed (apt-get install nginx-light)")
    port, downstream = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, port=port, downstream=downstream)
                    .replace("proxy_pass http://backend/slow?ms=30&$args;", "proxy_pass http://backend;"))
    subprocess.run([nginx, "-t", "-c", str(conf)], check=True, capture_output=True, timeout=10)
    wrapper = tmp_path / "run_nginx.sh"
    wrapper.write_text(f"#!/bin/sh\necho listening\nexec {nginx} -c {conf}\n")
    wrapper.chmod(0o755)
    counts, _ = _run_case(tmp_path, receiver, [str(wrapper)], port, downstream, "/slow", 16,
                          want_full_linking=True, echoes_id=False)
    assert counts["evidence"] > 0, counts


def test_thread_per_request_server_keeps_full_linking(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    counts, _ = _script_case(tmp_path, receiver, sys.executable, "threaded.py", THREADED_SERVER,
                             want_full_linking=True)
    assert counts["unlinked"] == 0
