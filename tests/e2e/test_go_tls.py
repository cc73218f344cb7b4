"""Go crypto/tls and net/http uprobes on the real kernel: Go chains, a mixed Python/Go chain, and
binaries from each supported Go toolchain."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from correlator.records import Exchange, ParentKind, Role, Source
from correlator.spans import Span, SpanKind
from tests.support.agent import free_port, go_binary, service
from tests.support.tls import child_env, make_cert, python_cmd
from tests.support.uprobe_capture import Traced

pytestmark = pytest.mark.ebpf

ROOT = Path(__file__).resolve().parents[2]
GOSRC = ROOT / "tests" / "support" / "gosrc"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def gobin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gobin")
    return {v: go_binary(GOSRC, out / f"chain-{v}", v) for v in ("1.21", "1.23", "1.25", "1.27")}


@pytest.fixture(scope="module")
def traced() -> Iterator[Traced]:
    t = Traced()
    with t:
        yield t


def _path(e: Exchange) -> str:
    parts = e.req_head.split(b"\r\n", 1)[0].decode(errors="replace").split(" ")
    return parts[1] if len(parts) > 1 else ""


def _of(exs: list[Exchange], pid: int, role: Role) -> list[Exchange]:
    return [e for e in exs if e.pid == pid and e.role == role]


def _serve(binary: Path, cert: Path, key: Path, *extra: str) -> tuple[list[str], int]:
    port = free_port()
    return [str(binary), "-listen", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key), *extra], port


def _trace_of(spans: list[Span], leaf: Span) -> list[Span]:
    """leaf, its parent, its parent's parent ... up to the root."""
    by_id = {s.span_id: s for s in spans}
    chain = [leaf]
    while chain[-1].parent_span_id is not None:
        parent = by_id.get(chain[-1].parent_span_id)
        seen = [(x.name, x.pid, x.kind, x.attributes.get("kspan.parent.source")) for x in chain]
        assert parent is not None, f"{chain[-1].name} names a parent that is not among the spans: {seen}"
        chain.append(parent)
    return chain


def test_go_https_chain_with_goroutine_parentage(traced: Traced, gobin: dict[str, Path],
                                                 certs: tuple[Path, Path]) -> None:
    cert, key = certs
    b_cmd, b_port = _serve(gobin["1.27"], cert, key, "-delay", "150ms")
    with service(b_cmd) as b:
        a_cmd, a_port = _serve(gobin["1.27"], cert, key, "-downstream", f"https://127.0.0.1:{b_port}/work")
        with service(a_cmd) as a:
            traced.wait_go_traced(a.pid)
            traced.wait_go_traced(b.pid)
            # Three requests in flight at once through A: thread or "one in flight" guesses cannot
            # pair them; only goroutine ancestry can.
            out = subprocess.run([str(gobin["1.27"]), "-client", f"https://127.0.0.1:{a_port}/work", "-n", "6",
                                  "-c", "3"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert sorted(out.stdout.split("\n")[:-1]) == ["200 via downstream"] * 6
            # every exchange of the chain, the caller's too (it arrives last and is the root)
            exs = traced.wait_for(lambda xs: len(_of(xs, a.pid, Role.CLIENT)) >= 6
                                  and len(_of(xs, b.pid, Role.SERVER)) >= 6
                                  and len(_of(xs, a.pid, Role.SERVER)) >= 6
                                  and sum(e.role == Role.CLIENT and e.remote_port == a_port for e in xs) >= 6)
    a_srv, a_cli, b_srv = _of(exs, a.pid, Role.SERVER), _of(exs, a.pid, Role.CLIENT), _of(exs, b.pid, Role.SERVER)
    assert len(a_srv) == 6 and len(a_cli) == 6 and len(b_srv) == 6, [(e.pid, e.role, _path(e)) for e in exs]
    for e in a_srv + a_cli + b_srv:
        assert e.tls and e.source == Source.GO and e.status == 200, e
        assert e.family == 2 and e.local_port and e.remote_port
    # Each downstream call is the child of the server exchange it was made for (same id).
    srv_by_id = {e.id: e for e in a_srv}
    for c in a_cli:
        assert c.parent is not None and c.parent.kind == ParentKind.GOROUTINE, (c.parent, _path(c))
        parent = srv_by_id[c.parent.exchange]
        assert _path(parent).split("id=")[1] == _path(c).split("id=")[1]
    # B's server exchanges link to A's client exchanges through the TCP connection.
    cli_ids = {e.id for e in a_cli}
    assert all(e.parent is not None and e.parent.kind == ParentKind.PEER and e.parent.exchange in cli_ids
               for e in b_srv)

    spans = traced.spans([e for e in exs if e.pid in (a.pid, b.pid) or e.remote_port == a_port])
    leaves = [s for s in spans if s.pid == b.pid and s.kind == SpanKind.SERVER]
    assert len(leaves) == 6
    traces = set()
    for leaf in leaves:
        chain = _trace_of(spans, leaf)
        kinds = [(s.pid, s.kind) for s in chain]
        assert kinds[:3] == [(b.pid, SpanKind.SERVER), (a.pid, SpanKind.CLIENT), (a.pid, SpanKind.SERVER)], kinds
        assert len({s.trace_id for s in chain}) == 1
        assert all(s.attributes.get("url.scheme") == "https" for s in chain if s.kind == SpanKind.SERVER)
        assert all(str(s.attributes.get("url.full")).startswith("https://") for s in chain
                   if s.kind == SpanKind.CLIENT)
        traces.add(chain[0].trace_id)
    assert len(traces) == 6


def test_mixed_chain_python_go_python(traced: Traced, gobin: dict[str, Path], certs: tuple[Path, Path]) -> None:
    cert, key = certs
    py_port = free_port()
    with service(python_cmd("serve", "--port", str(py_port), "--cert", str(cert), "--key", str(key)),
                 cwd=ROOT) as py_srv:
        go_cmd, go_port = _serve(gobin["1.27"], cert, key, "-downstream", f"https://127.0.0.1:{py_port}/work")
        with service(go_cmd) as go:
            traced.wait_go_traced(go.pid)
            out = subprocess.run(python_cmd("get", f"https://127.0.0.1:{go_port}/work?id=7", "--cafile", str(cert)),
                                 env=child_env(), capture_output=True, text=True, timeout=30)
            assert out.stdout.split() == ["200"], out.stderr
            exs = traced.wait_for(lambda xs: len(_of(xs, py_srv.pid, Role.SERVER)) >= 1
                                  and any(e.remote_port == go_port and e.role == Role.CLIENT for e in xs))
    py_client = [e for e in exs if e.remote_port == go_port and e.role == Role.CLIENT]
    go_srv, go_cli = _of(exs, go.pid, Role.SERVER), _of(exs, go.pid, Role.CLIENT)
    py_server = _of(exs, py_srv.pid, Role.SERVER)
    assert len(py_client) == 1 and len(go_srv) == 1 and len(go_cli) == 1 and len(py_server) == 1, exs
    assert py_client[0].source == Source.OPENSSL and py_server[0].source == Source.OPENSSL
    assert go_srv[0].source == Source.GO and go_cli[0].source == Source.GO
    assert go_cli[0].parent is not None and go_cli[0].parent.kind == ParentKind.GOROUTINE
    assert go_cli[0].parent.exchange == go_srv[0].id
    spans = traced.spans(py_client + go_srv + go_cli + py_server)
    assert len(spans) == 4 and len({s.trace_id for s in spans}) == 1, [(s.name, s.trace_id.hex()) for s in spans]
    leaf = next(s for s in spans if s.pid == py_srv.pid)
    chain = _trace_of(spans, leaf)
    assert [(s.kind, s.pid) for s in chain] == [
        (SpanKind.SERVER, py_srv.pid), (SpanKind.CLIENT, go.pid), (SpanKind.SERVER, go.pid),
        (SpanKind.CLIENT, py_client[0].pid)]


@pytest.mark.parametrize("version", ["1.21", "1.23", "1.25"])
def test_go_versions_tls_server_and_client(traced: Traced, gobin: dict[str, Path], certs: tuple[Path, Path],
                                           version: str) -> None:
    cert, key = certs
    cmd, port = _serve(gobin[version], cert, key)
    with service(cmd) as srv:
        traced.wait_go_traced(srv.pid)
        out = subprocess.run([str(gobin[version]), "-client", f"https://127.0.0.1:{port}/work", "-n", "2"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        exs = traced.wait_for(lambda xs: len([e for e in xs if port in (e.local_port, e.remote_port)]) >= 4)
    mine = [e for e in exs if port in (e.local_port, e.remote_port)]
    assert sorted(e.role for e in mine) == [Role.CLIENT, Role.CLIENT, Role.SERVER, Role.SERVER], mine
    assert all(e.source == Source.GO and e.tls and e.status == 200 for e in mine), [
        (e.role, e.source, e.status, e.end, e.req_head[:20], e.resp_head[:20]) for e in mine]
    assert {e.pid for e in mine if e.role == Role.SERVER} == {srv.pid}


def test_closing_the_attacher_kills_an_inspection_in_progress(traced: Traced, gobin: dict[str, Path],
                                                              certs: tuple[Path, Path], tmp_path: Path) -> None:
    """A Go binary never seen before is inspected in a child process (1-2.5 s here); the agent's
    stop must not wait for it (the pool's exit hook would): close() kills the child at once."""
    import multiprocessing
    import shutil
    import time

    from tracer.uprobes import GoAttacher

    exe = tmp_path / "chain-fresh"
    shutil.copy(gobin["1.27"], exe)  # a new mtime: no cached inspection
    cmd, _ = _serve(exe, *certs)
    with service(cmd) as srv:
        before = set(multiprocessing.active_children())
        att = GoAttacher(traced.capture, inspect_in_child=True)
        assert att.on_exec(srv.pid) == 0  # submitted to the child, nothing attached yet
        workers = [p for p in multiprocessing.active_children() if p not in before]
        assert workers, "no inspection child was started"
        t0 = time.monotonic()
        att.close()
        for w in workers:
            w.join(2.5)
        assert not any(w.is_alive() for w in workers), [(w, w.exitcode) for w in workers]
        assert time.monotonic() - t0 < 3.0
