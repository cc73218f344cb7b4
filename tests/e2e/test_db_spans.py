"""Database calls become spans in their caller's trace, for real: the agent on the real kernel, a
real server from Debian, a real client library in a Python service that makes the calls while it
serves an HTTP request, and a real OTLP endpoint. The database spans are children of the caller's
server span (the kernel's thread rule), and no value the workload planted leaves the agent.
"""

from __future__ import annotations

import json
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import free_port, running_agent, service
from tests.support.dbservers import mariadb_server, postgres_server, redis_server
from tests.support.ebpf import require_ebpf
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.ebpf

SERVER, CLIENT = 2, 3
SECRET = "sekrit-cart-value-9f3a"

REDIS_CALLER = textwrap.dedent('''
    import os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import redis

    port, db_port = int(sys.argv[1]), int(sys.argv[2])
    secret = os.environ["CART_SECRET"]  # not on the command line: that is a resource attribute
    pool = redis.ConnectionPool(host="127.0.0.1", port=db_port)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            r = redis.Redis(connection_pool=pool)
            r.set("cart:" + self.path.rsplit("/", 1)[-1], secret)
            body = r.get("cart:" + self.path.rsplit("/", 1)[-1]) or b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    print("listening", flush=True)
    srv.serve_forever()
''')


def _attr(span: dict[str, Any], key: str) -> Any:
    return span["attributes"].get(key)


def test_redis_calls_are_children_of_the_callers_server_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    monkeypatch.setenv("CART_SECRET", SECRET)  # the service inherits it
    n = 5
    with OtlpReceiver() as rx, redis_server() as db:
        port = free_port()
        (tmp_path / "cart_svc.py").write_text(REDIS_CALLER)
        with service([sys.executable, str(tmp_path / "cart_svc.py"), str(port), str(db.port)]):
            args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                    "--no-metrics", "--port", str(port), "--port", str(db.port)]
            with running_agent(args, tmp_path) as agent:
                for i in range(n):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/cart/{i}", timeout=10) as r:
                        assert r.read() == SECRET.encode()

                def ready(spans: list[dict[str, Any]]) -> bool:
                    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "db.system.name") == "redis"]
                    return len(calls) >= 2 * n

                spans = rx.wait_for_spans(ready, timeout_s=30)
            assert agent.returncode == 0, agent.stderr
    servers = {s["span_id"]: s for s in spans if s["kind"] == SERVER and _attr(s, "server.port") == port}
    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "db.system.name") == "redis"]
    assert len(servers) == n, [s["name"] for s in spans]
    by_parent_t: dict[str, list[tuple[int, str]]] = {}
    for c in calls:
        parent = servers.get(c["parent_span_id"])
        assert parent is not None, f"a Redis call without its caller's span as parent: {c}"
        assert c["trace_id"] == parent["trace_id"]
        assert _attr(c, "kspan.parent.source") == "thread"
        assert _attr(c, "server.port") == db.port
        by_parent_t.setdefault(c["parent_span_id"], []).append((c["start_ns"], _attr(c, "db.operation.name")))
    by_parent = {k: [op for _, op in sorted(v)] for k, v in by_parent_t.items()}
    # each request's calls end SET, GET (the first one also opens the pooled connection: HELLO ...)
    assert len(by_parent) == n
    assert all(ops[-2:] == ["SET", "GET"] for ops in by_parent.values()), by_parent
    # the value (and the keys) the workload wrote never leave the agent
    exported = json.dumps(spans)
    assert SECRET not in exported and "cart:3" not in exported


PG_PASSWORD = "pg-login-sekrit-77"
PG_CALLER = textwrap.dedent('''
    import os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import psycopg

    port, db_port = int(sys.argv[1]), int(sys.argv[2])
    secret, password = os.environ["CART_SECRET"], os.environ["PG_PASSWORD"]
    setup = psycopg.connect(host="127.0.0.1", port=db_port, user="kspan", password=password, dbname="kspandb",
                            autocommit=True)
    setup.execute("CREATE TABLE IF NOT EXISTS items (id int, name text)")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            with psycopg.connect(host="127.0.0.1", port=db_port, user="kspan", password=password,
                                 dbname="kspandb", autocommit=True) as c:
                c.execute("INSERT INTO items VALUES (%s, %s)", (7, secret))
                rows = c.execute("SELECT name FROM items WHERE name = '" + secret + "'").fetchall()
            body = str(len(rows)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    print("listening", flush=True)
    srv.serve_forever()
''')


def test_postgres_calls_are_children_of_the_callers_server_span(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    monkeypatch.setenv("CART_SECRET", SECRET)
    monkeypatch.setenv("PG_PASSWORD", PG_PASSWORD)
    n = 3
    with OtlpReceiver() as rx, postgres_server(PG_PASSWORD) as db:
        port = free_port()
        (tmp_path / "orders_svc.py").write_text(PG_CALLER)
        with service([sys.executable, str(tmp_path / "orders_svc.py"), str(port), str(db.port)]):
            args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                    "--no-metrics", "--port", str(port), "--port", str(db.port)]
            with running_agent(args, tmp_path) as agent:
                for i in range(n):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/orders/{i}", timeout=20) as r:
                        assert r.status == 200

                def ready(spans: list[dict[str, Any]]) -> bool:
                    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "db.system.name") == "postgresql"
                             and _attr(s, "db.operation.name") == "SELECT"]
                    return len(calls) >= n

                spans = rx.wait_for_spans(ready, timeout_s=30)
            assert agent.returncode == 0, agent.stderr
    servers = {s["span_id"]: s for s in spans if s["kind"] == SERVER and _attr(s, "server.port") == port}
    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "db.system.name") == "postgresql"]
    assert len(servers) == n
    ops: dict[str, list[str]] = {}
    for c in calls:
        parent = servers.get(c["parent_span_id"])
        assert parent is not None and c["trace_id"] == parent["trace_id"], c
        assert _attr(c, "db.namespace") == "kspandb" and _attr(c, "server.port") == db.port
        ops.setdefault(c["parent_span_id"], []).append(str(_attr(c, "db.operation.name")))
    assert len(ops) == n and all({"INSERT", "SELECT"} <= set(v) for v in ops.values()), ops
    select = next(c for c in calls if _attr(c, "db.operation.name") == "SELECT")
    assert _attr(select, "db.collection.name") == "items" and "?" in str(_attr(select, "db.query.text"))
    exported = json.dumps(spans)
    assert SECRET not in exported and PG_PASSWORD not in exported


MY_CALLER = textwrap.dedent('''
    import os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import pymysql

    port, db_port = int(sys.argv[1]), int(sys.argv[2])
    secret, password = os.environ["CART_SECRET"], os.environ["PG_PASSWORD"]

    def connect():
        return pymysql.connect(host="127.0.0.1", port=db_port, user="app", password=password, database="kspandb",
                               autocommit=True)

    with connect() as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS stock (sku varchar(64), n int)")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            with connect() as c, c.cursor() as cur:
                cur.execute("INSERT INTO stock VALUES (%s, 3)", (secret,))
                cur.execute("SELECT n FROM stock WHERE sku = '" + secret + "'")
                rows = cur.fetchall()
            body = str(len(rows)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    print("listening", flush=True)
    srv.serve_forever()
''')


def test_mysql_calls_are_children_of_the_callers_server_span(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    monkeypatch.setenv("CART_SECRET", SECRET)
    monkeypatch.setenv("PG_PASSWORD", PG_PASSWORD)
    n = 3
    with OtlpReceiver() as rx, mariadb_server(PG_PASSWORD) as db:
        port = free_port()
        (tmp_path / "stock_svc.py").write_text(MY_CALLER)
        with service([sys.executable, str(tmp_path / "stock_svc.py"), str(port), str(db.port)]):
            args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                    "--no-metrics", "--port", str(port), "--port", str(db.port)]
            with running_agent(args, tmp_path) as agent:
                for i in range(n):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stock/{i}", timeout=20) as r:
                        assert r.status == 200

                def ready(spans: list[dict[str, Any]]) -> bool:
                    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "db.operation.name") == "SELECT"
                             and _attr(s, "db.system.name") in ("mysql", "mariadb")]
                    return len(calls) >= n

                spans = rx.wait_for_spans(ready, timeout_s=30)
            assert agent.returncode == 0, agent.stderr
    servers = {s["span_id"]: s for s in spans if s["kind"] == SERVER and _attr(s, "server.port") == port}
    calls = [s for s in spans if s["kind"] == CLIENT and _attr(s, "db.system.name") in ("mysql", "mariadb")]
    assert len(servers) == n
    ops: dict[str, list[str]] = {}
    for c in calls:
        parent = servers.get(c["parent_span_id"])
        assert parent is not None and c["trace_id"] == parent["trace_id"], c
        assert _attr(c, "server.port") == db.port
        ops.setdefault(c["parent_span_id"], []).append(str(_attr(c, "db.operation.name")))
    assert len(ops) == n and all({"INSERT", "SELECT"} <= set(v) for v in ops.values()), ops
    select = next(c for c in calls if _attr(c, "db.operation.name") == "SELECT")
    assert _attr(select, "db.namespace") == "kspandb" and _attr(select, "db.collection.name") == "stock"
    exported = json.dumps(spans)
    assert SECRET not in exported and PG_PASSWORD not in exported
