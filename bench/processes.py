"""Processes the benchmark starts: output read line by line with timestamps, and always stopped.

Every process started here is registered and stopped by pid in `stop_all()` (run.py calls it in a
finally and at exit), so an interrupted benchmark leaves nothing running.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import IO

_started: list[Managed] = []


def free_port() -> int:
    """A loopback port nothing listens on, for a server the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Managed:
    """A child process whose stdout and stderr lines are kept as (monotonic time, line)."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.lines: list[tuple[float, str, str]] = []
        self._cond = threading.Condition()
        self._log: IO[str] | None = open(log_path, "a") if log_path else None  # noqa: SIM115
        self.launched_s = time.monotonic()
        self.launched_wall_s = time.time()
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env=env, start_new_session=True,
        )
        _started.append(self)
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[str] | None, which: str) -> None:
        if stream is None:
            return
        for line in stream:
            now = time.monotonic()
            with self._cond:
                self.lines.append((now, which, line.rstrip("\n")))
                if self._log is not None:
                    self._log.write(f"{now - self.launched_s:9.3f} {self.name} {which}: {line}")
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout_s: float) -> tuple[float, re.Match[str]] | None:
        """The first line matching `pattern` (time it was read, match), or None on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for t, _, line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return t, m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and all(not r.is_alive() for r in self._readers)):
                    return None
                self._cond.wait(min(left, 0.2))

    def output(self, which: str | None = None) -> str:
        with self._cond:
            return "\n".join(line for _, w, line in self.lines if which is None or w == which)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Signal the process (by pid), wait, then SIGKILL if it has not exited."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # The process leads its own session (start_new_session), so its group holds only what
        # it spawned (nginx workers): end those too, by group id.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for t in self._readers:
            t.join(2)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self in _started:
            _started.remove(self)
        return self.proc.returncode


def stop_all() -> None:
    for m in list(_started):
        m.stop(signal.SIGKILL, timeout_s=5)


atexit.register(stop_all)
