"""CPU time and memory of a process, from /proc (the agent's own cost, as the kernel accounts it)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def parse_stat_ticks(stat: str) -> int:
    """utime + stime in clock ticks from /proc/PID/stat. They cover every thread of the process,
    including threads that have exited. The command name (field 2) may hold spaces and
    parentheses, so fields are counted from the last ')'."""
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def parse_status_kb(status: str, key: str) -> int | None:
    """A `Key:   1234 kB` line of /proc/PID/status, in kB; None when absent (a zombie has no Vm*)."""
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


@dataclass(frozen=True)
class ProcSample:
    monotonic_s: float
    cpu_s: float
    rss_kb: int | None
    hwm_kb: int | None
    # RSS split: anonymous memory (the agent's own heap) and file pages (mapped libraries such
    # as LLVM, shared with other processes and reclaimable).
    anon_kb: int | None = None
    file_kb: int | None = None


def sample(pid: int) -> ProcSample | None:
    """None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return ProcSample(
        monotonic_s=time.monotonic(),
        cpu_s=parse_stat_ticks(stat) / ticks,
        rss_kb=parse_status_kb(status, "VmRSS"),
        hwm_kb=parse_status_kb(status, "VmHWM"),
        anon_kb=parse_status_kb(status, "RssAnon"),
        file_kb=parse_status_kb(status, "RssFile"),
    )
