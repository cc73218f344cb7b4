"""nginx from Debian on a loopback port, with a throw-away configuration."""

from __future__ import annotations

import os
import time

from bench.processes import Managed


def nginx_config(port: int, prefix: str, workers: int = 1) -> str:
    """The smallest nginx that answers every path with 200 and no disk I/O (no access log, a
    literal body), so the benchmark measures the tracer rather than the file system."""
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def worker_pids(master: int) -> list[int]:
    """The master's children: the workers that accept and serve connections."""
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


class Nginx:
    def __init__(self, port: int, workdir: str, workers: int = 1, log_path: str | None = None) -> None:
        self.port = port
        self.workdir = workdir
        self.workers = workers
        self.log_path = log_path
        self.proc: Managed | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        conf = os.path.join(self.workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(self.port, self.workdir, self.workers))
        errlog = os.path.join(self.workdir, "error.log")
        self.proc = Managed("nginx", ["nginx", "-p", self.workdir, "-c", conf, "-e", errlog], log_path=self.log_path)
        deadline = time.monotonic() + timeout_s
        while len(worker_pids(self.proc.pid)) < self.workers:
            if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.workdir, "error.log")) as f:
                    raise RuntimeError(f"nginx did not start: {f.read()[-2000:]}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *worker_pids(self.proc.pid)]

    def stop(self) -> None:
        # SIGQUIT is nginx's graceful stop; Managed.stop falls back to SIGKILL.
        if self.proc is not None:
            import signal

            self.proc.stop(signal.SIGQUIT, timeout_s=10)
            self.proc = None
