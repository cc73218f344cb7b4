"""The agent's kernel side with its uprobe attachers, in the test process (TLS and Go e2e tests).

Real pieces only: tracer.capture.Capture loads and attaches the socket backend plus the TLS/Go
families, tracer.ssl_libs.SslAttacher and tracer.uprobes.GoAttacher attach to running and newly
started processes (fed by the kernel's exec records, as the agent does), records are decoded by
tracer.records and turned into spans by correlator.Correlator.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.records import Exchange
from correlator.spans import Span
from tests.support.ebpf import fail_or_skip, in_ci, require_ebpf
from tracer import records

CI = in_ci()
MODULES = ("openssl", "go_tls", "go_http")


def unavailable(reason: str) -> None:
    """With CI=true an eBPF test that cannot load or attach fails; elsewhere it is skipped."""
    fail_or_skip(reason)


class Traced:
    def __init__(self, modules: tuple[str, ...] = MODULES, pids: set[int] | None = None) -> None:
        """Traces this test process's descendants only (the kernel's pid filter follows forks), so
        other load on the host neither fills the ring buffer nor keeps the attachers busy."""
        self.modules = modules
        self.pids = pids if pids is not None else {os.getpid()}
        self.capture: Any = None
        self.ssl: Any = None
        self.go: Any = None
        self.raw: list[bytes] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Traced:
        require_ebpf()
        from tracer.capabilities import probe
        from tracer.capture import Capture, CaptureConfig, CaptureError
        from tracer.ssl_libs import SslAttacher
        from tracer.uprobes import GoAttacher

        # self_pid=0: the filter must keep this process (the parent of every service and client it
        # starts, which inherit the filter on fork); it makes no HTTP calls of its own.
        cap = Capture(CaptureConfig(families=list(self.modules), pids=set(self.pids), self_pid=0), probe())
        try:
            cap.start()
        except CaptureError as e:
            unavailable(str(e))
        self.capture = cap
        try:
            if "openssl" in self.modules:
                self.ssl = SslAttacher(cap, strict=CI)
                self.ssl.scan_existing(self.pids or None)
            if "go_tls" in self.modules:
                self.go = GoAttacher(cap, strict=CI)
                self.go.scan_existing(self.pids or None)
        except RuntimeError as e:
            self.close()
            unavailable(str(e))
        self._thread = threading.Thread(target=self._loop, name="kspan-test-poll", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self.capture.poll(50)
            for data in batch:
                kind = records.record_type(data)
                if kind == records.REC_PROC and len(data) >= ctypes.sizeof(records.RawProc):
                    proc = records.RawProc.from_buffer_copy(data)
                    if not self._ours(proc.pid):
                        continue
                    try:
                        if proc.event == 1:  # exec
                            if self.ssl is not None:
                                self.ssl.on_exec(proc.pid)
                            if self.go is not None:
                                self.go.on_exec(proc.pid)
                        elif proc.event == 2 and self.go is not None:
                            self.go.on_exit(proc.pid)
                    except Exception as e:  # noqa: BLE001 - record it, the test asserts on it
                        self.errors.append(f"pid {proc.pid}: {e}")
                elif kind == records.REC_EXCHANGE:
                    with self._lock:
                        self.raw.append(data)
            if self.ssl is not None:
                self.ssl.rescan_pending()

    def _ours(self, pid: int) -> bool:
        """Is `pid` one of self.pids or a descendant of one (the kernel filter's view)?"""
        for _ in range(64):
            if pid in self.pids:
                return True
            try:
                stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - tiny procfs read
                pid = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                return False
            if pid <= 1:
                return False
        return False

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            raw = list(self.raw)
        return [records.decode_exchange(r) for r in raw]

    def wait_for(self, pred: Callable[[list[Exchange]], bool], timeout: float = 10.0) -> list[Exchange]:
        deadline = time.monotonic() + timeout
        while True:
            exs = self.exchanges()
            if pred(exs) or time.monotonic() > deadline:
                return exs
            time.sleep(0.05)

    def wait_go_traced(self, pid: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while pid not in self.go.traced_pids:
            if time.monotonic() > deadline:
                raise AssertionError(f"Go pid {pid} not traced after {timeout}s: {self.go.errors} {self.errors}")
            time.sleep(0.05)

    def spans(self, exchanges: list[Exchange]) -> list[Span]:
        c = Correlator(WallClock.now(), CorrelatorConfig())
        out: list[Span] = []
        for ex in exchanges:
            out.extend(c.feed(ex))
        out.extend(c.flush())
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    def __enter__(self) -> Traced:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
