"""OpenSSL uprobes on the real kernel: Python and curl/nginx over TLS, and plaintext beside it."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from correlator.records import Exchange, ParentKind, Role, Source
from correlator.spans import Span, SpanKind
from tests.support.agent import free_port, service
from tests.support.tls import child_env, make_cert, nginx, python_cmd
from tests.support.uprobe_capture import Traced

pytestmark = pytest.mark.ebpf


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def traced() -> Iterator[Traced]:
    t = Traced(modules=("openssl",))
    with t:
        yield t


def _on_port(exs: list[Exchange], port: int) -> list[Exchange]:
    """Exchanges of connections to `port`, either end."""
    return [e for e in exs if port in (e.local_port, e.remote_port)]


def _path(e: Exchange) -> str:
    line = e.req_head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = line.split(" ")
    return parts[1] if len(parts) > 1 else ""


def _scheme(s: Span) -> str:
    """url.scheme of a server span; the scheme of url.full on a client span (semantic conventions)."""
    if s.kind == SpanKind.SERVER:
        return str(s.attributes.get("url.scheme"))
    return str(s.attributes.get("url.full", "")).split("://")[0]


def test_python_https_client_to_python_https_server(traced: Traced, certs: tuple[Path, Path]) -> None:
    cert, key = certs
    port = free_port()
    with service(python_cmd("serve", "--port", str(port), "--cert", str(cert), "--key", str(key)),
                 cwd=Path(__file__).parents[2]) as srv:
        out = subprocess.run(python_cmd("get", f"https://127.0.0.1:{port}/work?x=1", "--cafile", str(cert), "-n",
                                        "3"), env=child_env(), capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["200"] * 3, out.stderr
        exs = traced.wait_for(lambda xs: len(_on_port(xs, port)) >= 6)
    mine = _on_port(exs, port)
    servers = [e for e in mine if e.role == Role.SERVER]
    clients = [e for e in mine if e.role == Role.CLIENT]
    assert len(servers) == 3 and len(clients) == 3, mine
    for e in mine:
        assert e.tls and e.source == Source.OPENSSL, e
        assert e.status == 200 and _path(e) == "/work?x=1"
        assert e.family == 2 and e.local_addr == "127.0.0.1" and e.remote_addr == "127.0.0.1"
    assert {e.pid for e in servers} == {srv.pid}
    # One keep-alive connection: one conn_id per side, and the server's local port is `port`.
    assert len({e.conn_id for e in servers}) == 1 and len({e.conn_id for e in clients}) == 1
    assert all(e.local_port == port for e in servers) and all(e.remote_port == port for e in clients)
    # The server side names its client through the TCP connection (both ends traced locally).
    client_ids = {e.id for e in clients}
    assert all(e.parent is not None and e.parent.kind == ParentKind.PEER and e.parent.exchange in client_ids
               for e in servers), [e.parent for e in servers]

    spans = traced.spans(mine)
    assert len(spans) == 6
    for s in spans:
        assert _scheme(s) == "https", s.attributes
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        if s.kind == SpanKind.SERVER:
            parent = by_id[s.parent_span_id] if s.parent_span_id else None
            assert parent is not None and parent.kind == SpanKind.CLIENT and parent.trace_id == s.trace_id


def test_curl_to_nginx_tls_and_plaintext_each_once(traced: Traced, certs: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    cert, key = certs
    tls_port, plain_port = free_port(), free_port()
    with nginx(tmp_path / "nginx", tls_port, plain_port, cert, key):
        # nginx started after the probes: its libssl is the host's, attached at start.
        procs = []
        for i in range(3):
            # Two URLs on one curl: one keep-alive TLS connection carries both requests.
            procs.append(subprocess.Popen(["curl", "-s", "-w", "%{http_code}\n", "--http1.1",
                                           "--cacert", str(cert), "-o", "/dev/null",
                                           f"https://127.0.0.1:{tls_port}/tls/{i}", "-o", "/dev/null",
                                           f"https://127.0.0.1:{tls_port}/missing"],
                                          stdout=subprocess.PIPE, text=True))
            procs.append(subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\n",
                                           f"http://127.0.0.1:{plain_port}/plain/{i}"],
                                          stdout=subprocess.PIPE, text=True))
        codes = [p.communicate(timeout=30)[0].split() for p in procs]
        assert sorted(c for cs in codes for c in cs) == ["200"] * 6 + ["404"] * 3
        exs = traced.wait_for(lambda xs: len(_on_port(xs, tls_port)) >= 12 and len(_on_port(xs, plain_port)) >= 6)

    tls = _on_port(exs, tls_port)
    plain = _on_port(exs, plain_port)
    # Exactly once each: 3 connections x 2 requests x 2 ends over TLS, 3 x 1 x 2 in plaintext.
    assert len(tls) == 12, [(e.role, _path(e), e.source) for e in tls]
    assert len(plain) == 6, [(e.role, _path(e), e.source) for e in plain]
    assert all(e.tls and e.source == Source.OPENSSL for e in tls)
    assert all(not e.tls and e.source == Source.SOCKET for e in plain)
    for role in (Role.CLIENT, Role.SERVER):
        got = sorted((_path(e), e.status) for e in tls if e.role == role)
        want = sorted([(f"/tls/{i}", 200) for i in range(3)] + [("/missing", 404)] * 3)
        assert got == want, (role, got)
        got_plain = sorted((_path(e), e.status) for e in plain if e.role == role)
        assert got_plain == sorted((f"/plain/{i}", 200) for i in range(3)), (role, got_plain)
    assert traced.ssl.attached_probes > 0
    spans = traced.spans(tls + plain)
    schemes = sorted(_scheme(s) for s in spans)
    assert schemes == ["http"] * 6 + ["https"] * 12


def test_uprobe_transfers_are_counted_when_the_state_machine_program_is_missing(certs: tuple[Path, Path]) -> None:
    """The uprobes reach the exchange state machine by a tail call into kspan_exchange_kp
    (bpf/uprobe_exchange.bpf.c, through the kspan_exchange_progs program array). With that entry
    missing the tail call falls through: every TLS transfer must then be counted
    (exchange_tail_call_missed), neither crash anything nor vanish silently."""
    cert, key = certs
    zero = struct.pack("<I", 0)
    with Traced(modules=("openssl",)) as t:  # a capture of its own: the module's keeps its entry
        progs = t.capture.map("kspan_exchange_progs")
        assert progs.lookup(zero) is not None, "the capture did not install kspan_exchange_kp"
        assert progs.delete(zero)
        before = t.capture.counters()["exchange_tail_call_missed"]
        port = free_port()
        with service(python_cmd("serve", "--port", str(port), "--cert", str(cert), "--key", str(key)),
                     cwd=Path(__file__).parents[2]):
            out = subprocess.run(python_cmd("get", f"https://127.0.0.1:{port}/work", "--cafile", str(cert), "-n",
                                            "2"), env=child_env(), capture_output=True, text=True, timeout=30)
            assert out.stdout.split() == ["200"] * 2, out.stderr
            # per request: the client's write and read, the server's read and write
            deadline = time.monotonic() + 10
            while t.capture.counters()["exchange_tail_call_missed"] - before < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
        missed = t.capture.counters()["exchange_tail_call_missed"] - before
        assert missed >= 8, missed
        assert not _on_port(t.exchanges(), port), "an exchange without the state machine program?"
