"""The agent needs no kernel headers and no compiler: `kspan run` in a private mount namespace
where /lib/modules is an empty directory still traces a request end to end, and maps no LLVM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.agent import ROOT, free_port, service
from tests.support.ebpf import fail_or_skip, require_ebpf

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"

# In the new mount namespace: hide the host's kernel modules and headers (and /usr/src, where
# Debian's header packages live), prove it, then become the agent. A host with no /lib/modules at
# all already is that machine (creating the directory would change the host, not the namespace).
WRAPPER = r"""
set -e
mount --make-rprivate /
mkdir -p "$EMPTY"
if [ -d /lib/modules ]; then mount --bind "$EMPTY" /lib/modules; fi
if [ -d /usr/src ]; then mount --bind "$EMPTY" /usr/src; fi
[ -z "$(ls -A /lib/modules 2>/dev/null)" ] || { echo "kspan-test: /lib/modules is not empty" >&2; exit 3; }
[ -z "$(ls -A /usr/src 2>/dev/null)" ] || { echo "kspan-test: /usr/src is not empty" >&2; exit 3; }
[ ! -e "/lib/modules/$(uname -r)" ] || { echo "kspan-test: /lib/modules/$(uname -r) exists" >&2; exit 3; }
echo "kspan-test: /lib/modules hidden" >&2
exec "$@"
"""


def _spans(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                out.extend(ss["spans"])
    return out


def _attr(span: dict, key: str) -> object:
    for a in span["attributes"]:
        if a["key"] == key:
            return next(iter(a["value"].values()))
    return None


def _request_and_wait(port: int, target: str, out: Path) -> None:
    """curl the service, then wait (bounded) for its server span in the agent's output file."""
    subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}{target}"], check=True, timeout=10)
    path = target.split("?")[0]
    deadline = time.monotonic() + 15
    while not [s for s in _spans(out) if _attr(s, "url.path") == path] and time.monotonic() < deadline:
        time.sleep(0.1)


def test_run_traces_with_lib_modules_hidden(tmp_path: Path) -> None:
    require_ebpf()
    if shutil.which("unshare") is None:
        fail_or_skip("unshare (util-linux) is not installed")
    port = free_port()
    svc_path = tmp_path / "headless_svc.py"
    shutil.copy(CHAIN_SERVER, svc_path)
    out = tmp_path / "spans.jsonl"
    err_path = tmp_path / "kspan.stderr"
    env = dict(os.environ, PYTHONPATH=str(ROOT), EMPTY=str(tmp_path / "empty"))
    cmd = ["unshare", "-m", "sh", "-c", WRAPPER, "sh", sys.executable, "-m", "tracer.cli", "run", "--port", str(port),
           "--output", str(out), "--quiet", "--no-metrics"]
    with service([sys.executable, str(svc_path), str(port)]), open(err_path, "wb") as err:
        started = time.monotonic()
        agent = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while "kspan: ready" not in err_path.read_text(errors="replace"):
                assert agent.poll() is None, f"kspan exited {agent.returncode}:\n{err_path.read_text()}"
                assert time.monotonic() - started < 60, f"not ready:\n{err_path.read_text()}"
                time.sleep(0.05)
            # unshare and sh exec in turn, so the agent keeps the pid Popen started
            maps = Path(f"/proc/{agent.pid}/maps").read_text()
            assert "libLLVM" not in maps and "libclang" not in maps, "the agent must not map a compiler"
            _request_and_wait(port, "/leaf?no=headers", out)
        finally:
            agent.send_signal(2)
            agent.wait(30)
    text = err_path.read_text(errors="replace")
    assert "kspan-test: /lib/modules hidden" in text
    assert agent.returncode == 0, text
    servers = [s for s in _spans(out) if _attr(s, "url.path") == "/leaf" and s["kind"] in (2, "SPAN_KIND_SERVER")]
    clients = [s for s in _spans(out) if _attr(s, "url.full") == f"http://127.0.0.1:{port}/leaf?no=headers"]
    assert len(servers) == 1, f"server span for /leaf missing:\n{text[-2000:]}"
    assert _attr(servers[0], "http.response.status_code") in (200, "200")
    assert len(clients) == 1 and clients[0]["traceId"] == servers[0]["traceId"], "curl's span joins the trace"


def test_run_with_an_external_btf_file(tmp_path: Path) -> None:
    """--btf FILE (BTFHub's format is the kernel's raw BTF): CO-RE relocates against that file.
    A copy of this kernel's own BTF stands in for a BTFHub file; a missing file is refused with
    what to do, by `run` and by `doctor`."""
    require_ebpf()
    btf = tmp_path / f"{os.uname().release}.btf"
    shutil.copy("/sys/kernel/btf/vmlinux", btf)
    port = free_port()
    svc_path = tmp_path / "btf_svc.py"
    shutil.copy(CHAIN_SERVER, svc_path)
    out = tmp_path / "spans.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with service([sys.executable, str(svc_path), str(port)]):
        agent = subprocess.Popen([sys.executable, "-m", "tracer.cli", "run", "--btf", str(btf), "--port", str(port),
                                  "--output", str(out), "--quiet", "--no-metrics"],
                                 cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert agent.stderr is not None
        try:
            deadline = time.monotonic() + 60
            for line in agent.stderr:
                if "kspan: ready" in line or time.monotonic() > deadline:
                    break
            _request_and_wait(port, "/leaf?btf=file", out)
        finally:
            agent.send_signal(2)
            rest = agent.communicate(timeout=30)[1]
    assert agent.returncode == 0, rest
    assert [s for s in _spans(out) if _attr(s, "url.path") == "/leaf"], "traced with CO-RE against --btf"
    missing = tmp_path / "no-such.btf"
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "run", "--btf", str(missing)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and str(missing) in r.stderr and "--btf" in r.stderr, r.stderr
    d = subprocess.run([sys.executable, "-m", "tracer.cli", "doctor", "--btf", str(missing)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert d.returncode == 1 and "BTFHub" in d.stdout and str(missing) in d.stdout, d.stdout
