"""kspan's in-kernel counters read straight from the running agent's BPF map.

The agent prints its counters when it stops; reading the map while it runs gives them per
measurement window, so a loss can be placed in the kernel (ring buffer full, state table full ...)
or after it. The map is found through the agent's own file descriptors (/proc/PID/fdinfo names
each BPF map's id), duplicated with pidfd_getfd (root), identified by name with
BPF_OBJ_GET_INFO_BY_FD, and read with BPF_MAP_LOOKUP_ELEM: no libbpf and no bpftool needed.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

_SYS_BPF = 321
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_MAP_TYPE_PERCPU_ARRAY = 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    r = _libc.syscall(_SYS_BPF, cmd, attr, len(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def _map_name(fd: int) -> str:
    info = ctypes.create_string_buffer(128)
    attr = ctypes.create_string_buffer(struct.pack("IIQ", fd, len(info), ctypes.addressof(info)), 16)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    # struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16]
    return info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")


def _fdinfos(pid: int) -> Iterator[tuple[str, dict[str, str]]]:
    """(fd, its /proc fdinfo fields) for every open fd of pid; fds that close meanwhile are skipped."""
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                yield name, dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except OSError:
            continue


def counter_names() -> list[str]:
    try:
        from tracer.capture import COUNTER_NAMES

        return list(COUNTER_NAMES)
    except ImportError:
        return []


class KernelCounters:
    """The agent's `counters` per-CPU array, summed over CPUs, by counter name."""

    def __init__(self, pid: int, map_name: str = "counters") -> None:
        self.fd = -1
        pidfd = _libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
        if pidfd < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_open({pid})")
        try:
            for name, info in _fdinfos(pid):
                if int(info.get("map_type", "-1").strip() or -1) != _BPF_MAP_TYPE_PERCPU_ARRAY:
                    continue
                fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
                if fd < 0:
                    continue
                if _map_name(fd) == map_name:
                    self.fd = fd
                    self.entries = int(info["max_entries"])
                    self.value_size = int(info["value_size"])
                    break
                os.close(fd)
        finally:
            os.close(pidfd)
        if self.fd < 0:
            raise LookupError(f"no BPF per-CPU array named {map_name!r} held by pid {pid}")
        self.cpus = _possible_cpus()
        self.names = counter_names()

    def read(self) -> dict[str, int]:
        out: dict[str, int] = {}
        stride = (self.value_size + 7) // 8 * 8
        for i in range(self.entries):
            key = ctypes.create_string_buffer(struct.pack("I", i), 4)
            val = ctypes.create_string_buffer(stride * self.cpus)
            attr = ctypes.create_string_buffer(
                struct.pack("IIQQQ", self.fd, 0, ctypes.addressof(key), ctypes.addressof(val), 0), 32)
            _bpf(_BPF_MAP_LOOKUP_ELEM, attr)
            total = sum(struct.unpack_from("Q", val.raw, c * stride)[0] for c in range(self.cpus))
            out[self.names[i] if i < len(self.names) else f"counter_{i}"] = total
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


def enable_run_time_stats() -> int:
    """Ask the kernel to account BPF program run time (BPF_ENABLE_STATS) for as long as the
    returned fd stays open, so the probes' own cost inside the traced processes can be measured
    without flipping the kernel.bpf_stats_enabled sysctl for good. -1 when not possible."""
    attr = ctypes.create_string_buffer(struct.pack("I", _BPF_STATS_RUN_TIME), 8)
    try:
        return _bpf(_BPF_ENABLE_STATS, attr)
    except OSError:
        return -1


def program_run_time(pid: int) -> tuple[int, int, int] | None:
    """(runs, run time in ns, recursion misses) summed over the BPF programs pid holds, from
    /proc/PID/fdinfo (the kernel counts runs and time while run-time stats are enabled). The probes
    run in the traced processes' context, so this is CPU time the agent's /proc/PID/stat does not
    show. A recursion miss is a probe the kernel skipped because another BPF program was running
    on that CPU: an event lost before any of kspan's own counters could see it."""
    runs = ns = misses = 0
    found = False
    try:
        names = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                text = f.read()
        except OSError:
            continue
        if "prog_type:" not in text:
            continue
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key == "run_time_ns":
                ns += int(val)
                found = True
            elif key == "run_cnt":
                runs += int(val)
            elif key == "recursion_misses":
                misses += int(val)
    return (runs, ns, misses) if found else None


def _prog_name(fd: int) -> str:
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(struct.pack("IIQ", fd, len(info), ctypes.addressof(info)), 16)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    # struct bpf_prog_info: ... name[BPF_OBJ_NAME_LEN] at offset 64
    return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")


def programs_by_name(pid: int) -> dict[str, tuple[int, int]]:
    """(runs, run time in ns) per BPF program name of pid (names are cut to 15 characters by the
    kernel), to tell which probe the kernel-side cost comes from."""
    out: dict[str, tuple[int, int]] = {}
    pidfd = _libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        return out
    try:
        for name, info in _fdinfos(pid):
            if "prog_type" not in info:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            try:
                prog = _prog_name(fd)
            except OSError:
                prog = f"prog_{info.get('prog_id', '?').strip()}"
            finally:
                os.close(fd)
            runs, ns = out.get(prog, (0, 0))
            out[prog] = (runs + int(info.get("run_cnt", 0)), ns + int(info.get("run_time_ns", 0)))
    finally:
        os.close(pidfd)
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
