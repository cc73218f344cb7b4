"""Database servers from Debian, started by the tests in a temporary directory on a free loopback
port (the decoders' tests and the agent's end-to-end tests share them). A server that cannot start
fails the test with what it printed: CI never skips these."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass
class Server:
    port: int
    password: str | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[Server]:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run scripts/bootstrap.sh (Debian package redis-server)")
    with tempfile.TemporaryDirectory(prefix="kspan-redis-") as tmp:
        port = free_port()
        args = [exe, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1",
                "--dir", tmp, "--enable-debug-command", "yes", "--logfile", f"{tmp}/redis.log"]  # fmt: skip
        if password is not None:
            args += ["--requirepass", password]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    redis.Redis(port=port, password=password, socket_timeout=2).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        logf = f"{tmp}/redis.log"
                        log = open(logf).read() if os.path.exists(logf) else ""
                        pytest.fail(f"redis-server did not start on port {port} (CI never skips this): {log}")
                    time.sleep(0.05)
            yield Server(port, password)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
