"""Database calls become spans in their caller's trace, for real: the agent on the real kernel, a
real server from Debian, a real client library in a Python service that makes the calls while it
serves an HTTP request, and a real OTLP endpoint. The database spans are children of the caller's
server span (the kernel's thread rule), the database server's own spans are children of those
(both ends of a local connection), and no value the workload planted leaves the agent.
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

PG_PASSWORD = "pg-login-sekrit-77"

# A thread-per-request HTTP service whose handler makes database calls: {setup} runs once,
# {calls} per request (with `secret`, `password` and `db_port` in scope). The secrets come from the
# environment: the command line is a resource attribute.
CALLER = """
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
{imports}

port, db_port = int(sys.argv[1]), int(sys.argv[2])
secret, password = os.environ["CALLER_SECRET"], os.environ.get("DB_PASSWORD", "")
{setup}

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        key = self.path.rsplit("/", 1)[-1]
{calls}
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

srv = ThreadingHTTPServer(("127.0.0.1", port), H)
print("listening", flush=True)
srv.serve_forever()
"""


def _caller(imports: str, setup: str, calls: str) -> str:
    return CALLER.format(imports=imports, setup=textwrap.dedent(setup).strip(),
                         calls=textwrap.indent(textwrap.dedent(calls).strip(), " " * 8))


REDIS_CALLER = _caller("import redis", 'pool = redis.ConnectionPool(host="127.0.0.1", port=db_port)', """
    r = redis.Redis(connection_pool=pool)
    r.set("cart:" + key, secret)
    body = r.get("cart:" + key) or b""
""")

PG_CALLER = _caller("import psycopg", """
    def connect():
        return psycopg.connect(host="127.0.0.1", port=db_port, user="kspan", password=password,
                               dbname="kspandb", autocommit=True)
    connect().execute("CREATE TABLE IF NOT EXISTS items (id int, name text)")
""", """
    with connect() as c:
        c.execute("INSERT INTO items VALUES (%s, %s)", (7, secret))
        rows = c.execute("SELECT name FROM items WHERE name = '" + secret + "'").fetchall()
    body = str(len(rows)).encode()
""")

MY_CALLER = _caller("import pymysql", """
    def connect():
        return pymysql.connect(host="127.0.0.1", port=db_port, user="app", password=password,
                               database="kspandb", autocommit=True)
    with connect() as c, c.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS stock (sku varchar(64), n int)")
""", """
    with connect() as c, c.cursor() as cur:
        cur.execute("INSERT INTO stock VALUES (%s, 3)", (secret,))
        cur.execute("SELECT n FROM stock WHERE sku = '" + secret + "'")
        rows = cur.fetchall()
    body = str(len(rows)).encode()
""")


def _attr(span: dict[str, Any], key: str) -> Any:
    return span["attributes"].get(key)


def _traced_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, db_port: int, systems: set[str],
                  last_op: str, n: int) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Run the caller under the real agent, make n requests, and check what every database test
    asserts: each database call's parent is one of the n server spans, in its trace, and no
    planted secret is exported. Returns the spans and each server span's operations in order."""
    monkeypatch.setenv("CALLER_SECRET", SECRET)
    monkeypatch.setenv("DB_PASSWORD", PG_PASSWORD)
    port = free_port()
    (tmp_path / "caller_svc.py").write_text(source)
    with OtlpReceiver() as rx, service([sys.executable, str(tmp_path / "caller_svc.py"), str(port), str(db_port)]):
        args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
                "--no-metrics", "--port", str(port), "--port", str(db_port)]
        with running_agent(args, tmp_path) as agent:
            for i in range(n):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/item/{i}", timeout=20) as r:
                    assert r.status == 200

            def ready(spans: list[dict[str, Any]]) -> bool:
                db = [s for s in spans if _attr(s, "db.system.name") in systems]
                calls = sum(s["kind"] == CLIENT for s in db)
                return calls == sum(s["kind"] == SERVER for s in db) and sum(
                    s["kind"] == CLIENT and _attr(s, "db.operation.name") == last_op for s in db) >= n

            spans = rx.wait_for_spans(ready, timeout_s=30)
        assert agent.returncode == 0, agent.stderr
    servers = {s["span_id"]: s for s in spans if s["kind"] == SERVER and _attr(s, "server.port") == port}
    assert len(servers) == n, [s["name"] for s in spans]
    ops: dict[str, list[tuple[int, str]]] = {}
    for c in (s for s in spans if s["kind"] == CLIENT and _attr(s, "db.system.name") in systems):
        parent = servers.get(c["parent_span_id"])
        assert parent is not None and c["trace_id"] == parent["trace_id"], f"not in its caller's trace: {c}"
        assert _attr(c, "kspan.parent.source") == "thread" and _attr(c, "server.port") == db_port
        ops.setdefault(c["parent_span_id"], []).append((c["start_ns"], str(_attr(c, "db.operation.name"))))
    assert len(ops) == n
    # the database server is traced too: each call's server span is the client span's child (the
    # kernel tied the server's read to the client's write); a call it could not tie links nothing
    # and is counted: a command the client pipelined behind another (redis-py's two
    # `CLIENT SETINFO` at connect) may be read together with it, and a read names only the latest
    # write's trace (README, "Both ends on one host")
    clients = {c["span_id"]: c for c in spans if c["kind"] == CLIENT and _attr(c, "db.system.name") in systems}
    served = [s for s in spans if s["kind"] == SERVER and _attr(s, "db.system.name") in systems]
    unlinked = []
    for s in served:
        if not s.get("parent_span_id"):
            assert _attr(s, "kspan.parent.source") == "none", s
            unlinked.append(s)
            continue
        c = clients.get(s["parent_span_id"])
        assert c is not None, f"a server span whose parent is not a client call: {s}"
        assert c["trace_id"] == s["trace_id"] and _attr(s, "kspan.parent.source") == "peer"
        assert _attr(s, "db.operation.name") == _attr(c, "db.operation.name"), (s, c)
    assert len(served) == len(clients), (len(served), len(clients))
    summary = next(line for line in agent.stderr.splitlines() if line.startswith("kspan: stopped; "))
    counts = dict(kv.split("=", 1) for kv in summary.removeprefix("kspan: stopped; ").split(", "))
    assert len(unlinked) == int(counts.get("peer_unlinked", 0)), (summary, unlinked)
    # the test's own calls, one at a time on the connection, are every one tied
    assert not [s for s in unlinked if _attr(s, "db.operation.name") == last_op], unlinked
    exported = json.dumps(spans)
    assert SECRET not in exported and PG_PASSWORD not in exported
    return spans, {k: [op for _, op in sorted(v)] for k, v in ops.items()}


def test_redis_calls_are_children_of_the_callers_server_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    with redis_server() as db:
        spans, ops = _traced_calls(tmp_path, monkeypatch, REDIS_CALLER, db.port, {"redis"}, "GET", 5)
    # each request's calls end SET, GET (the first one also opens the pooled connection: HELLO ...)
    assert all(v[-2:] == ["SET", "GET"] for v in ops.values()), ops
    assert "cart:3" not in json.dumps(spans), "keys are values too"


def test_postgres_calls_are_children_of_the_callers_server_span(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    with postgres_server(PG_PASSWORD) as db:
        spans, ops = _traced_calls(tmp_path, monkeypatch, PG_CALLER, db.port, {"postgresql"}, "SELECT", 3)
    assert all({"INSERT", "SELECT"} <= set(v) for v in ops.values()), ops
    select = next(s for s in spans if _attr(s, "db.operation.name") == "SELECT")
    assert _attr(select, "db.namespace") == "kspandb" and _attr(select, "db.collection.name") == "items"
    assert "?" in str(_attr(select, "db.query.text"))


def test_mysql_calls_are_children_of_the_callers_server_span(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    require_ebpf()
    with mariadb_server(PG_PASSWORD) as db:
        spans, ops = _traced_calls(tmp_path, monkeypatch, MY_CALLER, db.port, {"mysql", "mariadb"}, "SELECT", 3)
    assert all({"INSERT", "SELECT"} <= set(v) for v in ops.values()), ops
    select = next(s for s in spans if _attr(s, "db.operation.name") == "SELECT")
    assert _attr(select, "db.namespace") == "kspandb" and _attr(select, "db.collection.name") == "stock"
