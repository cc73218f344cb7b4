"""The agent under test: `kspan run` launched, timed to `kspan: ready`, measured, stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Sequence

from bench.bpfcounters import KernelCounters, program_run_time
from bench.processes import Managed
from bench.procstat import ProcSample, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT_S = 120.0


def kspan_binary() -> str | None:
    venv = os.path.join(REPO, ".venv", "bin", "kspan")
    if os.access(venv, os.X_OK):
        return venv
    return shutil.which("kspan")


def parse_summary(stderr: str) -> dict[str, int]:
    """Counters from the agent's last `kspan: stopped; name=value, ...` line (only non-zero
    counters are printed, so a missing name means zero)."""
    counters: dict[str, int] = {}
    for line in stderr.splitlines():
        if line.startswith("kspan: stopped"):
            counters = {}
            for m in re.finditer(r"([\w.]+)=(-?\d+)", line):
                counters[m.group(1)] = int(m.group(2))
    return counters


class Agent:
    def __init__(self, kspan: str, targets: Sequence[str], endpoint: str, protocol: str,
                 extra: Sequence[str] = (), log_path: str | None = None) -> None:
        self.cmd = [kspan, "run", *targets, "--otlp-endpoint", endpoint, "--otlp-protocol", protocol,
                    "--quiet", *extra]
        self.proc = Managed("kspan", self.cmd, log_path=log_path)
        self.ready_s: float | None = None
        self.exit_code: int | None = None
        self.counters: dict[str, int] = {}
        self.last: ProcSample | None = None
        self._kc: KernelCounters | None = None
        self.final_kernel: dict[str, int] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        got = self.proc.wait_line(r"^kspan: ready", timeout_s)
        if got is None:
            err = self.proc.output()[-3000:]
            self.stop()
            raise RuntimeError(f"kspan did not print `kspan: ready` within {timeout_s:.0f} s:\n{err}")
        self.ready_s = got[0] - self.proc.launched_s
        self.compiler_mapped = self._maps_compiler()
        return self.ready_s

    def _maps_compiler(self) -> bool | None:
        """Whether libLLVM or libclang is mapped into the agent (None if unreadable): the agent
        loads precompiled objects and must never carry a compiler."""
        try:
            with open(f"/proc/{self.proc.pid}/maps") as f:
                maps = f.read()
        except OSError:
            return None
        return "libLLVM" in maps or "libclang" in maps

    def kernel_counters(self) -> dict[str, int] | None:
        """The agent's in-kernel counters now (None when they cannot be read)."""
        if not self.alive():
            return None
        try:
            if self._kc is None:
                self._kc = KernelCounters(self.proc.pid)
            return self._kc.read()
        except (OSError, LookupError, ValueError):
            return None

    def bpf_run_time(self) -> tuple[int, int, int] | None:
        """(runs, ns, recursion misses) of the agent's BPF programs so far (runs and ns need
        run-time stats enabled)."""
        return program_run_time(self.proc.pid) if self.alive() else None

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def sample(self) -> ProcSample | None:
        """None once the agent has exited (a zombie's /proc entry would read as zero)."""
        if not self.alive():
            return None
        s = sample(self.proc.pid)
        if s is not None:
            self.last = s
        return s

    def stop(self, timeout_s: float = 60.0) -> dict[str, int]:
        """SIGINT (flush and exit 0), then the counters it printed on the way out."""
        self.sample()
        self.final_kernel = self.kernel_counters()
        if self._kc is not None:
            self._kc.close()
            self._kc = None
        self.exit_code = self.proc.stop(signal.SIGINT, timeout_s=timeout_s)
        self.counters = parse_summary(self.proc.output("err"))
        return self.counters
