"""The agent's lifecycle and its record/replay, on the real kernel with real processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent import KSPAN, ROOT, free_port, running_agent, service
from tests.support.ebpf import require_ebpf

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"


def _spans_in(path: Path) -> list[dict]:
    spans = []
    for line in path.read_text().splitlines():
        req = json.loads(line)
        for rs in req["resourceSpans"]:
            svc = next(a["value"]["stringValue"] for a in rs["resource"]["attributes"] if a["key"] == "service.name")
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    s["service"] = svc
                    spans.append(s)
    return spans


def _curl(url: str) -> None:
    subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True, timeout=10)


def test_record_then_replay_is_deterministic(tmp_path: Path) -> None:
    require_ebpf()
    port = free_port()
    shutil.copy(CHAIN_SERVER, tmp_path / "recorded_svc.py")
    rec = tmp_path / "session.kspan"
    with service(["python3", str(tmp_path / "recorded_svc.py"), str(port)]):
        with running_agent(["record", str(rec), "--port", str(port)], tmp_path) as agent:
            for path in ("/chain", "/status/500", "/chain?token=s3cret&page=2"):
                subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"], timeout=10)
            time.sleep(0.5)
        assert agent.returncode == 0, agent.stderr
    assert "recorded" in agent.stderr
    outs = []
    for i in range(2):
        out = tmp_path / f"replay{i}.jsonl"
        r = subprocess.run(KSPAN + ["replay", str(rec), "--output", str(out), "--quiet", "--no-metrics"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1], "a replay must give the same spans every time"
    spans = _spans_in(tmp_path / "replay0.jsonl")
    servers = [s for s in spans if s["service"] == "recorded_svc"]
    assert len(servers) == 3
    clients = [s for s in spans if s["service"] == "curl"]
    assert len(clients) == 3
    paths = sorted(
        next(a["value"]["stringValue"] for a in s["attributes"] if a["key"] == "url.path") for s in servers
    )
    assert paths == ["/chain", "/chain", "/status/500"]
    queries = [next((a["value"]["stringValue"] for a in s["attributes"] if a["key"] == "url.query"), None)
               for s in servers]
    assert any(q and "page=2" in q and "s3cret" not in q for q in queries), queries
    assert all("s3cret" not in json.dumps(s) for s in spans), "a token value left the agent"
    for c in clients:
        assert not c.get("parentSpanId"), "curl's client span is a root"
    by_parent = {s.get("parentSpanId", ""): s for s in servers}
    for c in clients:
        assert c["spanId"] in by_parent, "each server span is the child of curl's client span"


def test_duration_stops_by_itself_and_sigterm_flushes(tmp_path: Path) -> None:
    require_ebpf()
    out = tmp_path / "d.jsonl"
    t0 = time.monotonic()
    r = subprocess.run(KSPAN + ["run", "--duration", "2", "--quiet", "--no-metrics", "--output", str(out),
                                "--port", str(free_port())],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "kspan: ready" in r.stderr
    assert time.monotonic() - t0 < 60

    port = free_port()
    shutil.copy(CHAIN_SERVER, tmp_path / "term_svc.py")
    with service(["python3", str(tmp_path / "term_svc.py"), str(port)]):
        with running_agent(["run", "--quiet", "--no-metrics", "--output", str(out), "--port", str(port)],
                           tmp_path) as agent:
            _curl(f"http://127.0.0.1:{port}/chain")
            agent.proc.send_signal(signal.SIGTERM)
            agent.proc.wait(30)
        assert agent.returncode == 0, agent.stderr
    spans = _spans_in(out)
    assert {s["service"] for s in spans} >= {"term_svc", "curl"}, "SIGTERM must flush pending spans"
