"""A typed ctypes layer over libbpf.so.1: open, configure, load and attach CO-RE BPF objects, and
read and write their maps. This is the only module that touches libbpf.

Written against Debian's libbpf 1.1 (headers in /usr/include/bpf). Pitfalls handled here:

- ctypes defaults every foreign function to `int(int, ...)`: a pointer returned through that
  default is cut to 32 bits and crashes later, far from the cause. Every function is declared in
  `_PROTOTYPES` (pointers as c_void_p) and only declared functions can be called (`_Api`).
- The `*_opts` structs are versioned by their `sz` member: libbpf reads only `sz` bytes and
  rejects non-zero bytes past the end of the struct it knows. The layouts below are the 1.1
  headers' (unnamed bitfields included, since they take space) and `sz` is set to their sizeof;
  tests/unit/test_loader.py compares them with the C compiler's view of the installed headers.
- libbpf 1.x reports pointer-returning failures as NULL with errno set (strict mode, forced at
  import for libbpfs that still default to the 0.x ERR_PTR convention) and int-returning ones as
  -errno. The library is opened with use_errno=True, so errno is read from ctypes' copy, which
  ctypes captures as the call returns, before Python code can clobber it.
- libbpf writes its messages (and the verifier's log on a failed load) to stderr by default. A
  print callback captures them per thread instead: a failing call raises LoaderError ending with
  the last lines, and WARN lines of calls that succeed go to `logging`. The callback gets a
  va_list; glibc's vasprintf formats it in one pass (a va_list can be consumed only once). The
  ctypes callback object stays referenced at module level: libbpf keeps only the raw pointer.
- The .rodata image (`const volatile` globals) is an anonymous mapping that libbpf remaps
  read-only at load (the map is frozen), so a write after load would fault: set_global refuses.
- Map keys and values are passed as raw pointers; the kernel copies key_size / value_size bytes
  from them, so every buffer length is checked first. Per-CPU maps move round_up(value_size, 8)
  bytes per *possible* CPU. A program array (value_size 4) is written with a program *fd* as the
  value (the kernel takes its own reference: the fd may be closed afterwards) and reads back the
  program's *id*; the kernel empties it when the last user-space fd of the map closes.
- The number of instructions the verifier walked is not kept by libbpf; the kernel (5.16+) keeps
  it in bpf_prog_info.verified_insns, and load(stats=True) also captures each program's
  "processed N insns" line through a per-program log buffer at BPF_LOG_STATS. Level 1 (the full
  trace) is avoided there: a log that overflows its buffer fails the load with ENOSPC.
- Attachments are bpf_links over perf events owned by this process (tracepoints; uprobes and
  kprobes through their PMUs), so a SIGKILLed agent leaves nothing attached. libbpf falls back to
  tracefs-created probes only where the uprobe/kprobe PMU is missing (pre-4.17 kernels).
  Cgroup programs (sock_ops) are attached the same way, by BPF_LINK_CREATE on a cgroup v2
  directory, never by BPF_PROG_ATTACH: that kind of attachment belongs to the cgroup and would
  outlive a killed agent.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BpfObject",
    "Link",
    "LoaderError",
    "Map",
    "ProgInfo",
    "enable_run_stats",
    "file_offset",
    "num_possible_cpus",
    "prog_info",
]

# Map update flags (uapi linux/bpf.h).
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_map_type values (uapi, append-only).
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY = 1, 2, 5, 6
MAP_LRU_HASH, MAP_LRU_PERCPU_HASH, MAP_PERCPU_CGROUP_STORAGE, MAP_RINGBUF = 9, 10, 21, 27
_PERCPU_TYPES = frozenset({MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH, MAP_PERCPU_CGROUP_STORAGE})

_LIBBPF_STRICT_ALL = 0xFFFFFFFF
_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2
_BPF_LOG_STATS = 4
_BPF_STATS_RUN_TIME = 0

_BTF_KIND_INT, _BTF_KIND_STRUCT, _BTF_KIND_UNION, _BTF_KIND_ENUM = 1, 4, 5, 6
_BTF_KIND_DATASEC, _BTF_KIND_ENUM64 = 15, 19
_BTF_INT_SIGNED, _BTF_INT_BOOL = 1, 4

# Lines of libbpf/verifier output carried by a LoaderError.
LOG_TAIL_LINES = 40
# Per-program log buffer for load(stats=True): BPF_LOG_STATS output is the error (if any) plus
# one statistics line, so this never fills up the way a level-1 trace would.
_STATS_LOG_SIZE = 64 * 1024
_PROCESSED_RE = re.compile(r"processed (\d+) insns")
# What the kernel's print_verification_stats() writes at BPF_LOG_STATS.
_STATS_LINE_PREFIXES = ("processed ", "verification time ", "stack depth ")


class LoaderError(Exception):
    """libbpf or the kernel refused an operation; the message ends with libbpf's last lines."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


# --- struct layouts (libbpf 1.1 headers; uapi linux/bpf.h and linux/btf.h) -------------------


class _ObjectOpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        # `__u32 :32;` where attach_prog_fd was: an unnamed bitfield still occupies its 4 bytes.
        ("_removed_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_void_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
        # `size_t :0;` pads the tail to 8 bytes, which ctypes does by itself (pointer alignment).
    ]


class _UprobeOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ref_ctr_offset", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", ctypes.c_char_p),
    ]


class _BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _BpfProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),  # 1-bit field + 31 bits of padding
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *, va_list). On x86_64 a va_list
# parameter decays to a pointer (it is an array type); on aarch64 the 32-byte struct is passed
# by reference. Either way a c_void_p carries it unchanged to vasprintf.
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

_P = ctypes.c_void_p
_STR = ctypes.c_char_p
_INT = ctypes.c_int
_U32 = ctypes.c_uint32

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_major_version": (_U32, []),
    "libbpf_minor_version": (_U32, []),
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "libbpf_set_strict_mode": (_INT, [ctypes.c_uint]),
    "libbpf_strerror": (_INT, [_INT, _P, ctypes.c_size_t]),
    "libbpf_num_possible_cpus": (_INT, []),
    "bpf_object__open_file": (_P, [_STR, ctypes.POINTER(_ObjectOpenOpts)]),
    "bpf_object__load": (_INT, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__name": (_STR, [_P]),
    "bpf_object__btf": (_P, [_P]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_object__find_program_by_name": (_P, [_P, _STR]),
    "bpf_object__find_map_by_name": (_P, [_P, _STR]),
    "bpf_program__name": (_STR, [_P]),
    "bpf_program__section_name": (_STR, [_P]),
    "bpf_program__fd": (_INT, [_P]),
    "bpf_program__autoload": (ctypes.c_bool, [_P]),
    "bpf_program__set_autoload": (_INT, [_P, ctypes.c_bool]),
    "bpf_program__set_log_level": (_INT, [_P, _U32]),
    "bpf_program__set_log_buf": (_INT, [_P, _P, ctypes.c_size_t]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_program__attach_tracepoint": (_P, [_P, _STR, _STR]),
    "bpf_program__attach_kprobe": (_P, [_P, ctypes.c_bool, _STR]),
    "bpf_program__attach_uprobe_opts": (_P, [_P, _INT, _STR, ctypes.c_size_t, ctypes.POINTER(_UprobeOpts)]),
    "bpf_program__attach_cgroup": (_P, [_P, _INT]),
    "bpf_link__destroy": (_INT, [_P]),
    "bpf_link__fd": (_INT, [_P]),
    "bpf_map__name": (_STR, [_P]),
    "bpf_map__type": (_INT, [_P]),
    "bpf_map__key_size": (_U32, [_P]),
    "bpf_map__value_size": (_U32, [_P]),
    "bpf_map__max_entries": (_U32, [_P]),
    "bpf_map__set_max_entries": (_INT, [_P, _U32]),
    "bpf_map__fd": (_INT, [_P]),
    "bpf_map__is_internal": (ctypes.c_bool, [_P]),
    "bpf_map__initial_value": (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_map__reuse_fd": (_INT, [_P, _INT]),
    "btf__find_by_name_kind": (ctypes.c_int32, [_P, _STR, _U32]),
    "btf__type_by_id": (_P, [_P, _U32]),
    "btf__resolve_size": (ctypes.c_int64, [_P, _U32]),
    "btf__resolve_type": (_INT, [_P, _U32]),
    "btf__name_by_offset": (_STR, [_P, _U32]),
    "bpf_map_lookup_elem": (_INT, [_INT, _P, _P]),
    "bpf_map_update_elem": (_INT, [_INT, _P, _P, ctypes.c_uint64]),
    "bpf_map_delete_elem": (_INT, [_INT, _P]),
    "bpf_map_get_next_key": (_INT, [_INT, _P, _P]),
    "bpf_obj_get_info_by_fd": (_INT, [_INT, _P, ctypes.POINTER(_U32)]),
    "bpf_enable_stats": (_INT, [_INT]),
}


class _Api:
    """libbpf's functions, each with its prototype set; an undeclared name is an AttributeError
    rather than a silently int-typed call."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._funcs: dict[str, Any] = {}
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
            self._funcs[name] = fn

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_funcs"][name]
        except KeyError:
            raise AttributeError(f"libbpf function {name} has no declared prototype") from None


# --- libbpf's log -----------------------------------------------------------------------------


class _LogState(threading.local):
    # Messages of the libbpf call in progress on this thread, or None outside _captured().
    messages: list[tuple[int, str]] | None = None


_log_state = _LogState()


class _Captured:
    def __init__(self) -> None:
        self.messages: list[tuple[int, str]] = []

    def lines(self) -> list[str]:
        text = "".join(msg for _level, msg in self.messages)
        return [line.rstrip() for line in text.splitlines() if line.strip()]

    def tail(self, extra: list[str] | None = None) -> str:
        lines = self.lines() + (extra or [])
        return (":\n" + "\n".join(lines[-LOG_TAIL_LINES:])) if lines else ""

    def forward(self) -> None:
        """The call succeeded: its warnings go to the log instead of an exception."""
        for level, msg in self.messages:
            for line in msg.splitlines():
                if line.strip():
                    if level == _LIBBPF_WARN:
                        log.warning("%s", line.rstrip())
                    else:
                        log.debug("%s", line.rstrip())


@contextmanager
def _captured() -> Iterator[_Captured]:
    cap = _Captured()
    previous = _log_state.messages
    _log_state.messages = cap.messages
    try:
        yield cap
    finally:
        _log_state.messages = previous


def _vformat(fmt: int | None, ap: int | None) -> str:
    if not fmt or _libc is None:
        return ""
    out = ctypes.c_void_p()
    n = _libc.vasprintf(ctypes.byref(out), fmt, ap)
    if n < 0 or not out.value:
        return ""
    try:
        return ctypes.string_at(out.value, n).decode(errors="replace")
    finally:
        _libc.free(out)


def _on_libbpf_print(level: int, fmt: int | None, ap: int | None) -> int:
    # An exception cannot cross back into C: ctypes would print it to stderr and return 0 anyway.
    try:
        if level >= _LIBBPF_DEBUG:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s", _vformat(fmt, ap).rstrip())
            return 0
        text = _vformat(fmt, ap)
        messages = _log_state.messages
        if messages is not None:
            messages.append((level, text))
        elif text.strip():
            log.log(logging.WARNING if level == _LIBBPF_WARN else logging.DEBUG, "%s", text.rstrip())
    except Exception:
        pass
    return 0


# --- library set-up ---------------------------------------------------------------------------

_api: _Api | None = None
_api_problem = ""
_libc: Any = None
# libbpf stores only the function pointer: this reference keeps the trampoline alive.
_PRINT_CALLBACK = _PRINT_FN(_on_libbpf_print)
_ncpus = 0


def _init() -> None:
    global _api, _api_problem, _libc
    try:
        libc = ctypes.CDLL(None)
        libc.vasprintf.restype = ctypes.c_int
        libc.vasprintf.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p]
        libc.free.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
        _libc = libc
    except (OSError, AttributeError):
        _libc = None  # not glibc: libbpf's messages are then dropped, errors still raise
    try:
        api = _Api(ctypes.CDLL("libbpf.so.1", use_errno=True))
    except (OSError, AttributeError) as exc:
        _api_problem = f"libbpf.so.1 (libbpf >= 1.0) cannot be used: {exc}; install libbpf1"
        return
    if api.libbpf_major_version() < 1:
        _api_problem = f"libbpf {api.libbpf_major_version()}.{api.libbpf_minor_version()} is too old (need 1.x)"
        return
    api.libbpf_set_strict_mode(_LIBBPF_STRICT_ALL)
    api.libbpf_set_print(_PRINT_CALLBACK)
    _api = api


def _lib() -> _Api:
    if _api is None:
        raise LoaderError(_api_problem or "libbpf is not available")
    return _api


def _strerror(err: int) -> str:
    err = abs(err)
    if _api is not None:
        buf = ctypes.create_string_buffer(256)
        # libbpf's own codes (LIBBPF_ERRNO__*, 4000+) are unknown to strerror.
        if _api.libbpf_strerror(err, buf, len(buf)) == 0:
            return buf.value.decode(errors="replace")
    return os.strerror(err)


def _errno_of_null() -> int:
    return ctypes.get_errno() or errno_mod.EINVAL


def num_possible_cpus() -> int:
    """CPUs a per-CPU map holds a value for (possible, not online: the kernel sizes by those)."""
    global _ncpus
    if _ncpus <= 0:
        n = _lib().libbpf_num_possible_cpus()
        if n <= 0:
            raise LoaderError(f"cannot count the possible CPUs: {_strerror(n)}", -n)
        _ncpus = n
    return _ncpus


def _tracefs_hint() -> str:
    if any(Path(p, "events").is_dir() for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return ""
    return " (tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing)"


# --- object info by fd ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    run_cnt: int
    run_time_ns: int
    verified_insns: int  # 0 on kernels before 5.16


@dataclass(frozen=True)
class _MapInfo:
    id: int
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def _info_by_fd(fd: int, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        raise LoaderError(f"reading the {what} info of fd {fd}: {_strerror(rc)}", -rc)


def prog_info(fd: int) -> ProgInfo:
    """What the kernel keeps about a loaded program. run_cnt/run_time_ns count only while run-time
    statistics are enabled (enable_run_stats() or the kernel.bpf_stats_enabled sysctl)."""
    info = _BpfProgInfo()
    _info_by_fd(fd, info, "program")
    return ProgInfo(
        id=info.id,
        name=info.name.decode(errors="replace"),
        run_cnt=info.run_cnt,
        run_time_ns=info.run_time_ns,
        verified_insns=info.verified_insns,
    )


def _map_info(fd: int) -> _MapInfo:
    info = _BpfMapInfo()
    _info_by_fd(fd, info, "map")
    return _MapInfo(
        id=info.id,
        name=info.name.decode(errors="replace"),
        map_type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
    )


def enable_run_stats() -> int:
    """Make the kernel count run_cnt/run_time_ns of every program while the returned fd is open
    (BPF_ENABLE_STATS: unlike the sysctl, it cannot be left on by a killed process). Close the fd
    with os.close() to stop."""
    fd = _lib().bpf_enable_stats(_BPF_STATS_RUN_TIME)
    if fd < 0:
        raise LoaderError(f"enabling BPF run-time statistics: {_strerror(fd)}", -fd)
    return int(fd)


# --- maps -------------------------------------------------------------------------------------


class Map:
    """A BPF map by fd. Keys and values are raw bytes in the kernel's layout. A Map from a
    BpfObject borrows the object's fd and is unusable once the object is closed."""

    def __init__(
        self,
        fd: int,
        name: str,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        owner: BpfObject | None = None,
    ) -> None:
        self.fd = fd
        self.name = name
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.percpu = map_type in _PERCPU_TYPES
        self._owner = owner
        if self.percpu:
            # The kernel copies each CPU's value into an 8-byte aligned slot.
            self._stride = (value_size + 7) & ~7
            self._ncpus = num_possible_cpus()
        else:
            self._stride = value_size
            self._ncpus = 1
        self.value_buffer_size = self._stride * self._ncpus

    @classmethod
    def from_fd(cls, fd: int, name: str | None = None) -> Map:
        """A map known only by fd (e.g. one of a running agent, through pidfd_getfd): its type and
        sizes come from the kernel. The caller keeps owning the fd."""
        info = _map_info(fd)
        return cls(fd, name or info.name, info.map_type, info.key_size, info.value_size, info.max_entries)

    def __repr__(self) -> str:
        return (
            f"Map({self.name!r}, fd={self.fd}, type={self.map_type}, key_size={self.key_size}, "
            f"value_size={self.value_size}, max_entries={self.max_entries})"
        )

    def _check(self, key: bytes | None) -> None:
        if self._owner is not None and self._owner.closed:
            raise LoaderError(f"map {self.name}: its object {self._owner.name} is closed")
        if key is not None and len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, the map's keys are {self.key_size}")

    def _fail(self, op: str, rc: int) -> LoaderError:
        return LoaderError(f"map {self.name}: {op}: {_strerror(rc)}", -rc)

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None if the key is absent. For a per-CPU map: every CPU's slot, as one
        buffer of value_buffer_size bytes (lookup_percpu splits it)."""
        self._check(key)
        buf = ctypes.create_string_buffer(self.value_buffer_size)
        rc = _lib().bpf_map_lookup_elem(self.fd, key, buf)
        if rc < 0:
            if -rc == errno_mod.ENOENT:
                return None
            raise self._fail("lookup", rc)
        return buf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        """One value_size value per possible CPU; [] if the key is absent."""
        if not self.percpu:
            raise TypeError(f"map {self.name} is not a per-CPU map")
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self._stride : i * self._stride + self.value_size] for i in range(self._ncpus)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """For a per-CPU map, `value` is either the whole buffer (value_buffer_size bytes) or one
        value_size value that every CPU gets."""
        self._check(key)
        if self.percpu and len(value) == self.value_size and self.value_buffer_size != self.value_size:
            slot = value + bytes(self._stride - self.value_size)
            value = slot * self._ncpus
        if len(value) != self.value_buffer_size:
            raise ValueError(
                f"map {self.name}: value is {len(value)} bytes, the map needs {self.value_buffer_size}"
            )
        rc = _lib().bpf_map_update_elem(self.fd, key, value, flags)
        if rc < 0:
            raise self._fail("update", rc)

    def delete(self, key: bytes) -> bool:
        """False if the key was absent."""
        self._check(key)
        rc = _lib().bpf_map_delete_elem(self.fd, key)
        if rc < 0:
            if -rc == errno_mod.ENOENT:
                return False
            raise self._fail("delete", rc)
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after `key` (the first key for None); None at the end. A hash map restarts
        from its first key when `key` is no longer in it."""
        self._check(key)
        buf = ctypes.create_string_buffer(self.key_size)
        rc = _lib().bpf_map_get_next_key(self.fd, key, buf)
        if rc < 0:
            if -rc == errno_mod.ENOENT:
                return None
            raise self._fail("next key", rc)
        return buf.raw

    def keys(self, start: bytes | None = None) -> Iterator[bytes]:
        """Keys after `start` (all keys for None). Deleting the key just yielded makes a hash map
        start over; collect the keys first (list(m.keys())) when deleting while iterating."""
        key = self.next_key(start)
        while key is not None:
            yield key
            key = self.next_key(key)


# --- links and objects ------------------------------------------------------------------------


class Link:
    """One attachment (a bpf_link). destroy() detaches; so does closing its BpfObject, and the
    kernel does it when the process dies, since the link's fds belong to this process."""

    def __init__(self, ptr: int, description: str, owner: BpfObject) -> None:
        self._ptr: int | None = ptr
        self.description = description
        self._owner = owner

    def __repr__(self) -> str:
        return f"Link({self.description!r}{'' if self._ptr else ', destroyed'})"

    @property
    def fd(self) -> int:
        if not self._ptr:
            raise LoaderError(f"link {self.description} is destroyed")
        return int(_lib().bpf_link__fd(self._ptr))

    @property
    def destroyed(self) -> bool:
        return not self._ptr

    def destroy(self) -> None:
        ptr, self._ptr = self._ptr, None
        if not ptr:
            return
        self._owner._forget_link(self)
        with _captured() as cap:
            rc = _lib().bpf_link__destroy(ptr)
        if rc < 0:
            log.debug("destroying link %s: %s%s", self.description, _strerror(rc), cap.tail())


@dataclass(frozen=True)
class _Global:
    offset: int
    size: int
    signed: bool
    boolean: bool
    integer: bool  # an int/bool/enum, not an array or struct


def _btf_kind(t: _BtfType) -> int:
    return int(t.info >> 24) & 0x1F


def _btf_vlen(t: _BtfType) -> int:
    return int(t.info) & 0xFFFF


class BpfObject:
    """One BPF ELF object (one .bpf.o): open, configure, load(), attach, close(). Garbage
    collection does not close it (a dropped reference must not detach probes): call close() or
    use it as a context manager; the kernel detaches everything when the process exits anyway."""

    def __init__(self, ptr: int, path: Path) -> None:
        self._ptr: int | None = ptr
        self.path = path
        raw_name = _lib().bpf_object__name(ptr)
        self.name = raw_name.decode() if raw_name else path.stem
        self._links: list[Link] = []
        self._loaded = False
        self._globals: dict[str, _Global] | None = None
        self._stats_logs: dict[str, ctypes.Array[ctypes.c_char]] = {}
        self._verifier_stats: dict[str, int] = {}
        self._map_cache: dict[str, Map] = {}

    # -- opening / closing --

    @classmethod
    def open(cls, path: str | Path, btf_path: str | None = None) -> BpfObject:
        """Open (not load) an object. `btf_path`: kernel BTF to relocate against, for kernels
        without /sys/kernel/btf/vmlinux (--btf / KSPAN_BTF)."""
        path = Path(path)
        lib = _lib()
        if btf_path is not None and not os.access(btf_path, os.R_OK):
            raise LoaderError(f"opening {path}: the BTF file {btf_path} is not readable", errno_mod.ENOENT)
        opts = _ObjectOpenOpts()
        opts.sz = ctypes.sizeof(_ObjectOpenOpts)
        if btf_path is not None:
            opts.btf_custom_path = os.fsencode(btf_path)
        with _captured() as cap:
            ptr = lib.bpf_object__open_file(os.fsencode(path), ctypes.byref(opts))
            err = _errno_of_null() if not ptr else 0
        if not ptr:
            raise LoaderError(f"opening {path}: {_strerror(err)}{cap.tail()}", err)
        cap.forward()
        return cls(ptr, path)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("loaded" if self._loaded else "open")
        return f"BpfObject({self.name!r}, {state})"

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def loaded(self) -> bool:
        return self._loaded

    def close(self) -> None:
        """Detach every link made through this object, then free its programs and maps."""
        if self._ptr is None:
            return
        for link in list(self._links):
            link.destroy()
        ptr, self._ptr = self._ptr, None
        _lib().bpf_object__close(ptr)

    def _obj(self) -> int:
        if self._ptr is None:
            raise LoaderError(f"object {self.name} is closed")
        return self._ptr

    def _forget_link(self, link: Link) -> None:
        if link in self._links:
            self._links.remove(link)

    # -- programs and maps --

    def _iter_programs(self) -> Iterator[int]:
        lib, obj = _lib(), self._obj()
        prog = lib.bpf_object__next_program(obj, None)
        while prog:
            yield prog
            prog = lib.bpf_object__next_program(obj, prog)

    def _iter_maps(self) -> Iterator[int]:
        lib, obj = _lib(), self._obj()
        m = lib.bpf_object__next_map(obj, None)
        while m:
            yield m
            m = lib.bpf_object__next_map(obj, m)

    def _prog(self, name: str) -> int:
        prog = _lib().bpf_object__find_program_by_name(self._obj(), name.encode())
        if not prog:
            raise KeyError(f"{self.name} has no program {name}")
        return int(prog)

    def _map(self, name: str) -> int:
        m = _lib().bpf_object__find_map_by_name(self._obj(), name.encode())
        if not m:
            raise KeyError(f"{self.name} has no map {name}")
        return int(m)

    def programs(self) -> list[str]:
        lib = _lib()
        return [lib.bpf_program__name(p).decode() for p in self._iter_programs()]

    def program_section(self, name: str) -> str:
        return (_lib().bpf_program__section_name(self._prog(name)) or b"").decode()

    def maps(self) -> list[str]:
        """Maps declared in SEC(".maps"), without libbpf's internal .rodata/.data/.bss maps."""
        lib = _lib()
        return [lib.bpf_map__name(m).decode() for m in self._iter_maps() if not lib.bpf_map__is_internal(m)]

    def set_max_entries(self, map_name: str, n: int) -> None:
        lib, m = _lib(), self._map(map_name)
        if lib.bpf_map__fd(m) >= 0:
            # A reused (or created) map already has its size; libbpf answers EBUSY.
            if lib.bpf_map__max_entries(m) == n:
                return
            raise LoaderError(
                f"{self.name}: map {map_name} already exists with {lib.bpf_map__max_entries(m)} entries "
                f"(reused or loaded): size it before reuse_maps()/load()",
                errno_mod.EBUSY,
            )
        rc = lib.bpf_map__set_max_entries(m, n)
        if rc < 0:
            raise LoaderError(f"{self.name}: setting max_entries of {map_name} to {n}: {_strerror(rc)}", -rc)

    def set_autoload(self, prog_name: str, autoload: bool) -> None:
        rc = _lib().bpf_program__set_autoload(self._prog(prog_name), autoload)
        if rc < 0:
            raise LoaderError(f"{self.name}: set_autoload({prog_name}) after load: {_strerror(rc)}", -rc)

    def reuse_maps(self, fds: dict[str, int]) -> None:
        """Make every non-internal map named in `fds` use that existing map instead of creating
        its own. libbpf takes the existing map's definition as is, so a mismatch in type or
        key/value size (two objects disagreeing about a shared map) is refused here instead."""
        lib = _lib()
        for m in list(self._iter_maps()):
            if lib.bpf_map__is_internal(m):
                continue
            name = lib.bpf_map__name(m).decode()
            fd = fds.get(name)
            if fd is None:
                continue
            info = _map_info(fd)
            mine = (lib.bpf_map__type(m), lib.bpf_map__key_size(m), lib.bpf_map__value_size(m))
            theirs = (info.map_type, info.key_size, info.value_size)
            if mine != theirs:
                raise LoaderError(
                    f"{self.name}: map {name} (type, key size, value size) {mine} differs from the shared "
                    f"map's {theirs}: shared maps need one definition in every object",
                    errno_mod.EINVAL,
                )
            with _captured() as cap:
                rc = lib.bpf_map__reuse_fd(m, fd)
            if rc < 0:
                raise LoaderError(f"{self.name}: reusing fd {fd} for map {name}: {_strerror(rc)}{cap.tail()}", -rc)
            cap.forward()

    def load(self, stats: bool = False) -> None:
        """Create the maps, relocate (CO-RE) and verify every autoloaded program. stats=True also
        records each program's verifier statistics (verifier_stats())."""
        lib, obj = _lib(), self._obj()
        if stats:
            for prog in self._iter_programs():
                if not lib.bpf_program__autoload(prog):
                    continue
                name = lib.bpf_program__name(prog).decode()
                buf = ctypes.create_string_buffer(_STATS_LOG_SIZE)
                # libbpf keeps only the pointer, and may read it after load: the buffer lives
                # as long as the object.
                self._stats_logs[name] = buf
                for rc in (
                    lib.bpf_program__set_log_buf(prog, buf, len(buf)),
                    lib.bpf_program__set_log_level(prog, _BPF_LOG_STATS),
                ):
                    if rc < 0:
                        raise LoaderError(f"{self.name}: verifier statistics for {name}: {_strerror(rc)}", -rc)
        with _captured() as cap:
            rc = lib.bpf_object__load(obj)
        if rc < 0:
            extra: list[str] = []
            # With a caller-provided log buffer libbpf does not print the failing program's log;
            # the programs verified before it logged statistics only.
            for name, buf in self._stats_logs.items():
                lines = [ln for ln in buf.value.decode(errors="replace").splitlines() if ln.strip()]
                if any(not ln.startswith(_STATS_LINE_PREFIXES) for ln in lines):
                    extra += [f"prog '{name}' verifier log:", *lines]
            raise LoaderError(f"loading {self.name}: {_strerror(rc)}{cap.tail(extra)}", -rc)
        cap.forward()
        self._loaded = True
        for name, buf in self._stats_logs.items():
            found = _PROCESSED_RE.search(buf.value.decode(errors="replace"))
            if found:
                self._verifier_stats[name] = int(found.group(1))

    def map(self, name: str) -> Map:
        cached = self._map_cache.get(name)
        if cached is not None:
            return cached
        lib, m = _lib(), self._map(name)
        fd = lib.bpf_map__fd(m)
        if fd < 0:
            raise LoaderError(f"{self.name}: map {name} does not exist yet: load() first", errno_mod.EINVAL)
        made = Map(
            fd,
            name,
            lib.bpf_map__type(m),
            lib.bpf_map__key_size(m),
            lib.bpf_map__value_size(m),
            lib.bpf_map__max_entries(m),
            owner=self,
        )
        if self._loaded:  # fd and sizes are final only once loaded (reuse_maps() swaps the fd)
            self._map_cache[name] = made
        return made

    def map_fds(self) -> dict[str, int]:
        """fd of every non-internal map that exists (after load or reuse)."""
        lib = _lib()
        out: dict[str, int] = {}
        for m in self._iter_maps():
            if lib.bpf_map__is_internal(m):
                continue
            fd = lib.bpf_map__fd(m)
            if fd >= 0:
                out[lib.bpf_map__name(m).decode()] = fd
        return out

    def program_fd(self, name: str) -> int:
        fd = _lib().bpf_program__fd(self._prog(name))
        if fd < 0:
            raise LoaderError(f"{self.name}: program {name} is not loaded", errno_mod.EINVAL)
        return int(fd)

    # -- globals (.rodata) --

    def _btf(self) -> int | None:
        btf = _lib().bpf_object__btf(self._obj())
        return int(btf) if btf else None

    def _type(self, btf: int, type_id: int) -> tuple[int, _BtfType]:
        addr = _lib().btf__type_by_id(btf, type_id)
        if not addr:
            raise LoaderError(f"{self.name}: BTF type {type_id} is missing")
        return int(addr), _BtfType.from_address(addr)

    def _rodata_globals(self) -> dict[str, _Global]:
        if self._globals is not None:
            return self._globals
        lib = _lib()
        out: dict[str, _Global] = {}
        btf = self._btf()
        sec_id = lib.btf__find_by_name_kind(btf, b".rodata", _BTF_KIND_DATASEC) if btf else -1
        if btf and sec_id > 0:
            addr, sec = self._type(btf, sec_id)
            secinfos = (_BtfVarSecinfo * _btf_vlen(sec)).from_address(addr + ctypes.sizeof(_BtfType))
            for si in secinfos:
                _var_addr, var = self._type(btf, si.type)
                name = (lib.btf__name_by_offset(btf, var.name_off) or b"").decode()
                signed = boolean = integer = False
                resolved = lib.btf__resolve_type(btf, var.size_or_type)
                if resolved > 0:
                    t_addr, t = self._type(btf, resolved)
                    kind = _btf_kind(t)
                    if kind == _BTF_KIND_INT:
                        # BTF_KIND_INT: a u32 after the header, encoding in bits 24-27.
                        encoding = ctypes.c_uint32.from_address(t_addr + ctypes.sizeof(_BtfType)).value >> 24
                        signed, boolean = bool(encoding & _BTF_INT_SIGNED), bool(encoding & _BTF_INT_BOOL)
                        integer = True
                    elif kind in (_BTF_KIND_ENUM, _BTF_KIND_ENUM64):
                        signed, integer = bool(t.info >> 31), True  # kflag: signed enum
                out[name] = _Global(si.offset, si.size, signed, boolean, integer)
        self._globals = out
        return out

    def _rodata_image(self) -> tuple[int, int]:
        lib = _lib()
        for m in self._iter_maps():
            if lib.bpf_map__is_internal(m) and lib.bpf_map__name(m).decode().endswith(".rodata"):
                size = ctypes.c_size_t()
                addr = lib.bpf_map__initial_value(m, ctypes.byref(size))
                if addr:
                    return int(addr), size.value
        raise LoaderError(f"{self.name}: no .rodata map")

    def has_global(self, name: str) -> bool:
        return name in self._rodata_globals()

    def set_global(self, name: str, value: int | bool | bytes) -> None:
        """Set a `const volatile` global (in .rodata) before load(): the verifier then sees it as
        a constant. KeyError if the object has no such global."""
        var = self._rodata_globals().get(name)
        if var is None:
            raise KeyError(f"{self.name} has no .rodata global {name}")
        if self._loaded:
            raise LoaderError(f"{self.name}: {name} cannot change after load (.rodata is frozen)", errno_mod.EPERM)
        if isinstance(value, bytes):
            if len(value) > var.size:
                raise ValueError(f"{name} holds {var.size} bytes, got {len(value)}")
            data = value.ljust(var.size, b"\0")
        else:
            if not var.integer or var.size not in (1, 2, 4, 8):
                raise TypeError(f"{name} is not an integer or bool global ({var.size} bytes): pass bytes")
            number = int(value)
            if var.boolean and number not in (0, 1):
                raise ValueError(f"{name} is a bool, got {value!r}")
            try:
                data = number.to_bytes(var.size, sys.byteorder, signed=var.signed)
            except OverflowError:
                kind = "signed" if var.signed else "unsigned"
                raise ValueError(f"{value!r} does not fit {name} ({kind} {var.size * 8}-bit)") from None
        addr, size = self._rodata_image()
        if var.offset + var.size > size:
            raise LoaderError(f"{self.name}: {name} at {var.offset}+{var.size} lies outside .rodata ({size} bytes)")
        # The image is libbpf's own mapping of the section, writable until load freezes it.
        ctypes.memmove(addr + var.offset, data, var.size)

    # -- BTF struct layouts --

    def _find_struct(self, type_name: str) -> tuple[int, int]:
        lib = _lib()
        btf = self._btf()
        if btf:
            for kind in (_BTF_KIND_STRUCT, _BTF_KIND_UNION):
                tid = lib.btf__find_by_name_kind(btf, type_name.encode(), kind)
                if tid > 0:
                    return btf, tid
        raise KeyError(f"{self.name} has no struct {type_name} in its BTF (a type must be used to be emitted)")

    def _members(self, btf: int, tid: int, base_bits: int, prefix: str, out: dict[str, tuple[int, int]]) -> None:
        lib = _lib()
        addr, t = self._type(btf, tid)
        kflag = bool(t.info >> 31)
        members = (_BtfMember * _btf_vlen(t)).from_address(addr + ctypes.sizeof(_BtfType))
        for m in members:
            # With kflag set, offset packs the bitfield width (top 8 bits) over the bit offset.
            bit_off, bits = (m.offset & 0xFFFFFF, m.offset >> 24) if kflag else (m.offset, 0)
            bit_off += base_bits
            name = (lib.btf__name_by_offset(btf, m.name_off) or b"").decode()
            resolved = lib.btf__resolve_type(btf, m.type)
            nested = resolved > 0 and _btf_kind(self._type(btf, resolved)[1]) in (_BTF_KIND_STRUCT, _BTF_KIND_UNION)
            if not name:
                if nested:  # anonymous struct/union: its members belong to the parent
                    self._members(btf, resolved, bit_off, prefix, out)
                continue
            if bits:  # the bytes that hold the bitfield
                size = (bit_off % 8 + bits + 7) // 8
            else:
                size = lib.btf__resolve_size(btf, m.type)
                if size < 0:
                    raise LoaderError(f"{self.name}: size of member {prefix}{name}: {_strerror(int(size))}")
            out[prefix + name] = (bit_off // 8, int(size))
            if nested:
                self._members(btf, resolved, bit_off, f"{prefix}{name}.", out)

    def struct_layout(self, type_name: str) -> dict[str, tuple[int, int]]:
        """field -> (byte offset, byte size) of a struct (or union) in the object's BTF. Members of
        anonymous structs/unions appear under their own names; members of named nested ones also
        as "outer.inner". KeyError if the type is absent."""
        btf, tid = self._find_struct(type_name)
        out: dict[str, tuple[int, int]] = {}
        self._members(btf, tid, 0, "", out)
        return out

    def struct_size(self, type_name: str) -> int:
        btf, tid = self._find_struct(type_name)
        size = _lib().btf__resolve_size(btf, tid)
        if size < 0:
            raise LoaderError(f"{self.name}: size of {type_name}: {_strerror(int(size))}", int(-size))
        return int(size)

    # -- attaching --

    def _attach(self, prog_name: str, description: str, call: Callable[[int], int | None], hint: str = "") -> Link:
        prog = self._prog(prog_name)
        with _captured() as cap:
            ptr = call(prog)
            err = _errno_of_null() if not ptr else 0
        if not ptr:
            raise LoaderError(f"attaching {prog_name} to {description}: {_strerror(err)}{hint}{cap.tail()}", err)
        cap.forward()
        link = Link(int(ptr), f"{prog_name} -> {description}", self)
        self._links.append(link)
        return link

    def attach(self, prog: str) -> Link:
        """Attach by the program's SEC() name (tp/..., kprobe/..., fentry/...)."""
        section = self.program_section(prog)
        try:
            return self._attach(prog, f'SEC("{section}")', _lib().bpf_program__attach)
        except LoaderError as exc:
            if exc.errno == errno_mod.EOPNOTSUPP:
                raise LoaderError(f"{exc} (a SEC() without a target is attached by attach_uprobe(), "
                                  "attach_tracepoint() or attach_kprobe())", exc.errno) from None
            if section.startswith(("tp/", "tracepoint/")) and _tracefs_hint():
                raise LoaderError(f"{exc}{_tracefs_hint()}", exc.errno) from None
            raise

    def attach_tracepoint(self, prog: str, category: str, event: str) -> Link:
        lib = _lib()
        return self._attach(
            prog,
            f"tracepoint {category}:{event}",
            lambda p: lib.bpf_program__attach_tracepoint(p, category.encode(), event.encode()),
            _tracefs_hint(),
        )

    def attach_kprobe(self, prog: str, func: str, retprobe: bool = False) -> Link:
        lib = _lib()
        kind = "kretprobe" if retprobe else "kprobe"
        return self._attach(
            prog, f"{kind} {func}", lambda p: lib.bpf_program__attach_kprobe(p, retprobe, func.encode())
        )

    def attach_uprobe(
        self,
        prog: str,
        path: str | Path,
        offset: int = 0,
        symbol: str | None = None,
        retprobe: bool = False,
        pid: int = -1,
    ) -> Link:
        """Attach at FILE offset `offset` of `path` (file_offset() converts an ELF address), or
        at `symbol` + `offset` when a symbol is given (libbpf resolves it in the ELF). pid -1:
        every process that maps the file."""
        lib = _lib()
        opts = _UprobeOpts()
        opts.sz = ctypes.sizeof(_UprobeOpts)
        opts.ref_ctr_offset = 0
        opts.retprobe = retprobe
        opts.func_name = symbol.encode() if symbol else None
        where = f"{path}:{symbol + '+' if symbol else ''}{offset:#x}"
        kind = "uretprobe" if retprobe else "uprobe"
        return self._attach(
            prog,
            f"{kind} {where}" + (f" pid {pid}" if pid >= 0 else ""),
            lambda p: lib.bpf_program__attach_uprobe_opts(p, pid, os.fsencode(path), offset, ctypes.byref(opts)),
        )

    def attach_cgroup(self, prog: str, cgroup: str | Path) -> Link:
        """Attach a cgroup program (SEC("sockops"), ...) to the cgroup v2 directory `cgroup` and
        every cgroup below it. The link holds its own reference to the cgroup, so the directory's
        fd is closed at once; the program is detached when the link's fd closes, by destroy(),
        close() or the death of this process (SIGKILL included)."""
        lib = _lib()
        try:
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise LoaderError(f"attaching {prog} to cgroup {cgroup}: {exc.strerror}", exc.errno or 0) from exc
        try:
            return self._attach(prog, f"cgroup {cgroup}", lambda p: lib.bpf_program__attach_cgroup(p, fd))
        finally:
            os.close(fd)

    # -- statistics --

    def program_info(self, name: str) -> tuple[int, int]:
        """(run_cnt, run_time_ns) of a loaded program; counted only while run-time statistics are
        enabled (enable_run_stats() or sysctl kernel.bpf_stats_enabled=1)."""
        info = prog_info(self.program_fd(name))
        return info.run_cnt, info.run_time_ns

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """program_info() of every loaded program."""
        lib = _lib()
        out: dict[str, tuple[int, int]] = {}
        for prog in self._iter_programs():
            fd = lib.bpf_program__fd(prog)
            if fd >= 0:
                info = prog_info(fd)
                out[lib.bpf_program__name(prog).decode()] = (info.run_cnt, info.run_time_ns)
        return out

    def verifier_insns(self, name: str) -> int:
        """Instructions the verifier processed for a loaded program (its limit is 1,000,000)."""
        if name in self._verifier_stats:
            return self._verifier_stats[name]
        return prog_info(self.program_fd(name)).verified_insns

    def verifier_stats(self) -> dict[str, int]:
        """verifier_insns() of every loaded program: from the BPF_LOG_STATS lines after
        load(stats=True), else from the kernel's bpf_prog_info.verified_insns."""
        lib = _lib()
        out: dict[str, int] = {}
        for prog in self._iter_programs():
            name = lib.bpf_program__name(prog).decode()
            if name in self._verifier_stats:
                out[name] = self._verifier_stats[name]
            elif lib.bpf_program__fd(prog) >= 0:
                out[name] = prog_info(lib.bpf_program__fd(prog)).verified_insns
        return out


# --- ELF --------------------------------------------------------------------------------------

_PT_LOAD = 1
_PN_XNUM = 0xFFFF


def file_offset(path: str | Path, vaddr: int) -> int:
    """File offset of virtual address `vaddr` of an ELF64 file, through the PT_LOAD segment whose
    file-backed bytes hold it (uprobes are placed by file offset; symbols give addresses)."""
    try:
        with open(path, "rb") as f:
            ehdr = f.read(64)
            if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF":
                raise LoaderError(f"{path} is not an ELF file")
            if ehdr[4] != 2:
                raise LoaderError(f"{path} is not a 64-bit ELF file")
            if ehdr[5] not in (1, 2):
                raise LoaderError(f"{path} has an unknown ELF byte order {ehdr[5]}")
            end = "<" if ehdr[5] == 1 else ">"
            e_phoff, e_shoff = struct.unpack_from(end + "QQ", ehdr, 0x20)
            e_phentsize, e_phnum = struct.unpack_from(end + "HH", ehdr, 0x36)
            if e_phnum == _PN_XNUM:
                # More headers than fit in e_phnum: the count is sh_info of section header 0.
                f.seek(e_shoff)
                e_phnum = struct.unpack_from(end + "I", f.read(64), 0x2C)[0]
            if e_phentsize < 56:
                raise LoaderError(f"{path}: program header entries of {e_phentsize} bytes")
            f.seek(e_phoff)
            table = f.read(e_phentsize * e_phnum)
    except OSError as exc:
        raise LoaderError(f"reading {path}: {exc}", exc.errno or 0) from exc
    except struct.error as exc:
        raise LoaderError(f"{path}: truncated ELF header: {exc}") from exc
    for i in range(min(e_phnum, len(table) // e_phentsize)):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(end + "IIQQQQ", table, i * e_phentsize)
        if p_type == _PT_LOAD and p_vaddr <= vaddr < p_vaddr + p_filesz:
            return int(vaddr - p_vaddr + p_offset)
    raise LoaderError(f"{path}: no PT_LOAD segment holds address {vaddr:#x} in the file")


_init()
