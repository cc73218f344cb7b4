"""What reading a Go executable found, kept on disk per file content, and a cheap "is it Go?".

Reading a Go binary's symbols and DWARF (tracer/go_binary.py, pyelftools) costs 1 to 2.5 s of
CPU. A restarted agent (a DaemonSet pod, an upgrade) meets the same binaries again, so the result
is stored under KSPAN_CACHE_DIR (default /var/cache/kspan), keyed by the file's size, mtime and
the hash of its first and last 64 KiB plus the inspector's own source: a changed file, or a kspan
whose inspector changed, never reads a stale entry. The directory is
created 0700 and only entries owned by this user are read, because entries are pickles.

Most executables on a host are not Go: `is_go_executable` answers from the ELF section headers
alone (a `.go.buildinfo` section, present since Go 1.13), so no child process is spawned for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import struct
import tempfile
from pathlib import Path

from tracer import go_binary as gb

log = logging.getLogger(__name__)

SCHEMA = 1
_EDGE = 64 * 1024


class Missing:
    pass


MISSING = Missing()


def cache_dir() -> Path:
    return Path(os.environ.get("KSPAN_CACHE_DIR", "/var/cache/kspan"))


def is_go_executable(path: str) -> bool:
    """False only when the ELF section headers say for sure the file is not Go; True otherwise
    (unreadable or unusual files go to the full inspection, which reports them)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF":
                return False
            if ident[4] != 2 or ident[5] != 1:
                return True  # not ELF64 little-endian: let the full reader decide
            shoff, = struct.unpack_from("<Q", ident, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ident, 0x3A)
            if not shoff or not shnum or shentsize < 64 or shstrndx >= shnum:
                return True
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            if len(table) < shentsize * shnum:
                return True
            str_off, str_size = struct.unpack_from("<QQ", table, shstrndx * shentsize + 0x18)
            f.seek(str_off)
            names = f.read(min(str_size, 1 << 20))
    except OSError:
        return True
    return b".go.buildinfo\0" in names


_INSPECTOR: list[bytes] = []


def _inspector_id() -> bytes:
    if not _INSPECTOR:
        try:
            source = Path(gb.__file__).read_bytes()
        except OSError:
            source = b""
        _INSPECTOR.append(hashlib.sha256(b"%d" % SCHEMA + source).digest())
    return _INSPECTOR[0]


def _key(path: str) -> str | None:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            head = f.read(_EDGE)
            f.seek(max(0, st.st_size - _EDGE))
            tail = f.read(_EDGE)
    except OSError:
        return None
    h = hashlib.sha256()
    for part in (_inspector_id(), str(st.st_size).encode(), str(st.st_mtime_ns).encode(), head, tail):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:40]


def load(path: str) -> gb.GoBinary | None | Missing:
    """The stored inspection of `path` (a GoBinary, or None: not Go), or MISSING."""
    key = _key(path)
    if key is None:
        return MISSING
    entry = cache_dir() / f"go-{key}.pickle"
    try:
        st = entry.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return MISSING  # not ours, or writable by others: never unpickle it
        with open(entry, "rb") as f:
            value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
        return MISSING
    if value is not None and not isinstance(value, gb.GoBinary):
        return MISSING
    if isinstance(value, gb.GoBinary):
        value.path = path  # the same file may be reached through another path (/proc/PID/exe)
    return value


def store(path: str, value: gb.GoBinary | None) -> None:
    key = _key(path)
    if key is None:
        return
    d = cache_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".go-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, d / f"go-{key}.pickle")
    except OSError as e:
        log.debug("kspan: cannot cache the inspection of %s in %s: %s", path, d, e)


def inspect_and_store(path: str) -> gb.GoBinary | None:
    """gb.inspect, remembered for the next agent (runs in the inspection child process)."""
    info = gb.inspect(path)
    store(path, info)
    return info
