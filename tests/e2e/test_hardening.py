"""Issue 5's hardening on the real kernel: process churn, connection churn, no listening ports."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent import ROOT, free_port, go_binary, running_agent, service
from tests.support.ebpf import require_ebpf

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"


def _summary(stderr: str) -> dict[str, int]:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("kspan: stopped;"))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


def _listening_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                # TCP state 0A is LISTEN; any bound UDP socket would be a listener too.
                if "udp" in table or cols[3] == "0A":
                    inodes.add(cols[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def test_agent_listens_on_no_port(tmp_path: Path) -> None:
    require_ebpf()
    with running_agent(["run", "--quiet", "--port", str(free_port())], tmp_path) as agent:
        time.sleep(1)
        mine = _socket_inodes(agent.proc.pid)
        assert not (mine & _listening_inodes()), "kspan must not listen on any port unless asked"


def test_server_started_after_the_agent_is_traced_within_a_second(tmp_path: Path) -> None:
    require_ebpf()
    port = free_port()
    shutil.copy(CHAIN_SERVER, tmp_path / "late_svc.py")
    out = tmp_path / "late.jsonl"
    with running_agent(["run", "--quiet", "--no-metrics", "--output", str(out), "--exe", "late_svc"],
                       tmp_path) as agent:
        with service(["python3", str(tmp_path / "late_svc.py"), str(port)]):
            started = time.monotonic()
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"GET /chain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b" 200 " in conn.recv(4096)
            conn.close()
            assert time.monotonic() - started < 1.0
            time.sleep(0.5)
    assert agent.returncode == 0
    text = out.read_text()
    assert '"late_svc"' in text, "a process started after the agent and matching --exe is traced"
    assert '"/chain"' in text


def test_connection_churn_leaves_bounded_state(tmp_path: Path) -> None:
    """Many short-lived connections: every one closes its kernel state, the Python tables stay
    capped, and no exchange is lost to a full table."""
    require_ebpf()
    binary = go_binary(ROOT / "tests" / "support" / "gochain", tmp_path / "churn_svc")
    port = free_port()
    target = int(os.environ.get("KSPAN_CHURN_CONNECTIONS", "100000"))
    out = tmp_path / "churn.jsonl"
    with service([str(binary), "-listen", f"127.0.0.1:{port}"]):
        with running_agent(["run", "--quiet", "--no-metrics", "--output", str(out), "--port", str(port)],
                           tmp_path) as agent:
            done = 0
            deadline = time.monotonic() + 240
            while done < target and time.monotonic() < deadline:
                r = subprocess.run(
                    [shutil.which("wrk") or "wrk", "-t2", "-c32", "-d5s", "-H", "Connection: close",
                     f"http://127.0.0.1:{port}/chain"],
                    capture_output=True, text=True, timeout=60,
                )
                m = re.search(r"(\d+) requests in", r.stdout)
                assert m, r.stdout + r.stderr
                done += int(m.group(1))
            time.sleep(2)
            with open(f"/proc/{agent.proc.pid}/status") as f:
                rss_kb = int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])
        assert agent.returncode == 0, agent.stderr
    assert done >= target, f"only {done} connections made in the time allowed"
    s = _summary(agent.stderr)
    assert s.get("live_kernel_connections", -1) >= 0
    assert s["live_kernel_connections"] < 1000, "closed connections must leave no kernel state"
    assert s.get("state_table_full", 0) == 0
    assert s.get("held", 0) == 0
    assert s.get("resolved_remembered", 0) <= 50_000
    assert s.get("live_processes", 0) < 1000
    assert rss_kb < 400_000, f"agent RSS {rss_kb} kB after {done} connections"
    # wrk runs flat out, beyond what the agent can follow on 2 shared cores: records may be lost,
    # but never silently. Each connection is one exchange seen at both ends (wrk and the server):
    # every one is a span or a counted ring-buffer loss.
    accounted = s.get("spans", 0) + s.get("ringbuf_lost", 0)
    assert accounted >= 2 * done * 0.99, (s, done)
