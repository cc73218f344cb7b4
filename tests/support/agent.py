"""Run the real `kspan` agent as a subprocess for end-to-end tests, and the processes and ports
of the services the tests run beside it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KSPAN = [sys.executable, "-m", "tracer.cli"]


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it outlives timeout: a hung service must not hang the test run."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class AgentProcess:
    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.returncode: int | None = None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the agent's stderr contains text (e.g. its line about attaching to a binary)."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"kspan never logged {text!r}:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"kspan did not stop within {timeout}s of SIGINT:\n{self.stderr}") from None
        self.returncode = self.proc.returncode
        return self.returncode


@contextlib.contextmanager
def running_agent(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
                  ready_timeout: float = 60.0) -> Iterator[AgentProcess]:
    """Start `kspan run ARGS`, wait for `kspan: ready` on stderr, stop it with SIGINT on exit."""
    err_path = tmp_path / f"kspan-{time.monotonic_ns()}.stderr"
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(KSPAN + args, cwd=tmp_path, env=full_env, stdout=subprocess.DEVNULL,
                                stderr=err)
    agent = AgentProcess(proc, err_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while "kspan: ready" not in agent.stderr:
            if proc.poll() is not None:
                raise AssertionError(f"kspan exited with {proc.returncode} before ready:\n{agent.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kspan not ready within {ready_timeout}s:\n{agent.stderr}")
            time.sleep(0.05)
        yield agent
    finally:
        agent.stop()


@contextlib.contextmanager
def service(cmd: list[str], cwd: Path | None = None, ready: str = "listening",
            timeout: float = 20.0) -> Iterator[subprocess.Popen[bytes]]:
    """Start a test service and wait until it prints its ready word."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while ready.encode() not in seen:
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} exited early: {seen.decode(errors='replace')}")
            r, _, _ = select.select([proc.stdout], [], [], 0.2)
            if r:
                seen += os.read(proc.stdout.fileno(), 4096)
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd} not ready in {timeout}s: {seen.decode(errors='replace')}")
        yield proc
    finally:
        stop_process(proc, 5)


def go_binary(src_dir: Path, out: Path, version: str = "1.27") -> Path:
    """Build a stdlib-only Go program from source with the toolchain scripts/install-go.sh installed."""
    go = ROOT / ".cache" / "go" / version / "go" / "bin" / "go"
    if not go.exists():
        raise AssertionError(f"Go {version} is not installed at {go}: run `make go`")
    cache = ROOT / ".cache" / "gobuild"
    env = dict(os.environ, GOCACHE=str(cache / "cache"), GOPATH=str(cache / "path"), GOTOOLCHAIN="local",
               GOFLAGS="-mod=mod", GO111MODULE="off", CGO_ENABLED="0")
    subprocess.run([str(go), "build", "-o", str(out), "."], cwd=src_dir, env=env, check=True,
                   capture_output=True, timeout=300)
    return out
