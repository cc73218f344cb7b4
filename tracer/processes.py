"""The resource of each traced process, read from /proc once per process (at first sight or exec).

A process may exit before its spans are exported, so its ProcessInfo is cached here and handed to
the export pipeline with the spans.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping

from correlator.spans import AttrValue, ProcessInfo

# Interpreters whose service is better named by the script they run than by the interpreter.
_INTERPRETERS = ("python", "node", "ruby", "perl", "php", "bash", "sh", "dash", "java")

# Options of those interpreters that take a value, so the script is not mistaken for it.
_OPTS_WITH_VALUE = {"-c", "-m", "-W", "-X", "-e", "-r", "--require", "-cp", "-classpath", "--class-path"}


def service_name_from_cmdline(exe_name: str, argv: list[str]) -> str:
    """Script name for interpreters, executable name otherwise."""
    base = exe_name or (os.path.basename(argv[0]) if argv else "")
    if not any(base.startswith(i) for i in _INTERPRETERS):
        return base
    args = argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):  # python -m http.server -> http.server
            return args[i + 1]
        if a == "-jar" and i + 1 < len(args):
            return _strip_ext(os.path.basename(args[i + 1]))
        if a in _OPTS_WITH_VALUE:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return _strip_ext(os.path.basename(a))
    return base


def _strip_ext(name: str) -> str:
    for ext in (".py", ".js", ".mjs", ".rb", ".pl", ".php", ".jar", ".sh"):
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


class ProcessTable:
    """pid -> ProcessInfo, bounded. Extra attributes (Kubernetes) come from an optional provider."""

    def __init__(
        self,
        proc_root: str = "/proc",
        max_entries: int = 20_000,
        service_name_override: str | None = None,
        extra: Callable[[int], tuple[str | None, Mapping[str, AttrValue]]] | None = None,
    ) -> None:
        self._proc = proc_root
        self._max = max_entries
        self._override = service_name_override
        self._extra = extra
        self._host = socket.gethostname()
        self._cache: OrderedDict[int, ProcessInfo] = OrderedDict()
        # comm from the kernel's exec event: the only name left for a process (curl, a cron job)
        # that exits before its first exchange reaches user space and /proc is read.
        self._comms: OrderedDict[int, str] = OrderedDict()

    def get(self, pid: int) -> ProcessInfo:
        info = self._cache.get(pid)
        if info is not None:
            self._cache.move_to_end(pid)
            return info
        info = self._read(pid)
        self._cache[pid] = info
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return info

    @property
    def traced(self) -> int:
        """Processes whose resource is known: the ones that produced spans recently."""
        return len(self._cache)

    def forget(self, pid: int) -> None:
        """On exec (the pid's image changed) or when a pid is known to be reused."""
        self._cache.pop(pid, None)

    def note_exec(self, pid: int, comm: str) -> None:
        """A process image changed (exec): forget the old resource, remember the kernel's name,
        and read /proc now while the process is most likely still alive."""
        self._cache.pop(pid, None)
        self._comms[pid] = comm
        self._comms.move_to_end(pid)
        if len(self._comms) > self._max:
            self._comms.popitem(last=False)
        self.get(pid)

    def put(self, info: ProcessInfo) -> None:
        """Replay: processes come from the recording, not /proc."""
        self._cache[info.pid] = info

    def snapshot(self, pids: set[int]) -> dict[int, ProcessInfo]:
        return {pid: self.get(pid) for pid in pids}

    def _read(self, pid: int) -> ProcessInfo:
        base = f"{self._proc}/{pid}"
        try:
            exe_path = os.readlink(f"{base}/exe")
        except OSError:
            exe_path = ""
        exe_path = exe_path.removesuffix(" (deleted)")
        try:
            with open(f"{base}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        except OSError:
            argv = []
        exe_name = os.path.basename(exe_path)
        if not exe_name:
            try:
                with open(f"{base}/comm") as f:
                    exe_name = f.read().strip()
            except OSError:
                exe_name = self._comms.get(pid, "")
        attrs: dict[str, AttrValue] = {"host.name": self._host}
        if exe_path:
            attrs["process.executable.path"] = exe_path
        name = service_name_from_cmdline(exe_name, argv)
        if self._extra is not None:
            try:
                k8s_name, k8s_attrs = self._extra(pid)
            except Exception:  # noqa: BLE001 - metadata is best effort; the span still leaves
                k8s_name, k8s_attrs = None, {}
            attrs.update(k8s_attrs)
            name = k8s_name or name
        if self._override:
            name = self._override
        return ProcessInfo(
            pid=pid,
            service_name=name or f"pid-{pid}",
            executable_name=exe_name or "unknown",
            command_line=" ".join(argv),
            attributes=attrs,
        )
