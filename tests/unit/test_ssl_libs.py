"""tracer/ssl_libs.py: finding OpenSSL in processes and on the host, once per file.

The attach calls go to a recording stand-in for the capture's probe set (tracer.probeset.ProbeSet;
attaching for real is the e2e tests' job); the files, symbol tables and /proc layouts are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tracer import ssl_libs
from tracer.loader import LoaderError
from tracer.probeset import ProbeMap

LIBSSL3 = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
NSS_LIBSSL3 = "/usr/lib/x86_64-linux-gnu/libssl3.so"


class RecordingProbes:
    """A ProbeSet holding bpf/openssl.bpf.c's programs that records attach calls (no kernel)."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str, str, str]] = []  # (kind, path, symbol, program)
        self.fail = fail or set()
        self.programs = {p for _, enter, ret in ssl_libs.PROBES for p in (enter, ret)} | {ssl_libs.SET_FD[1]}

    def has_program(self, name: str) -> bool:
        return name in self.programs

    def has_map(self, name: str) -> bool:
        return False

    def attach_uprobe(self, prog: str, path: str, offset: int = 0, symbol: str | None = None,
                      retprobe: bool = False) -> None:
        assert prog in self.programs and symbol is not None and offset == 0
        if symbol in self.fail:
            raise LoaderError(f"could not attach {symbol}")
        self.calls.append(("uretprobe" if retprobe else "uprobe", path, symbol, prog))

    def map(self, name: str) -> ProbeMap:
        raise KeyError(name)

    def struct_layout(self, type_name: str) -> dict[str, tuple[int, int]]:
        raise KeyError(type_name)

    def struct_size(self, type_name: str) -> int:
        raise KeyError(type_name)


MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:01 1234 /usr/bin/python3.11
7f1c2e600000-7f1c2e67f000 r--p 00000000 fe:01 5678 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2e67f000-7f1c2e6d9000 r-xp 0007f000 fe:01 5678 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2e700000-7f1c2e710000 r-xp 00000000 fe:01 9999 /opt/app/lib/libssl.so.1.1
7f1c2e800000-7f1c2e810000 r-xp 00000000 fe:01 4444 /usr/lib/x86_64-linux-gnu/libssl3.so
7f1c2e900000-7f1c2e910000 r-xp 00000000 fe:01 4445 /tmp/libssl.so.3 (deleted)
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0 [stack]
"""


def test_libssl_paths_in_maps() -> None:
    assert ssl_libs.libssl_paths_in_maps(MAPS) == [
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/opt/app/lib/libssl.so.1.1",
    ]


def test_system_paths_from_ldconfig_are_deduplicated() -> None:
    text = (
        f"\tlibssl3.so (libc6,x86-64) => {NSS_LIBSSL3}\n"
        "\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3\n"
        "\tlibssl.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so\n"
    )
    paths = ssl_libs.system_libssl_paths(lambda: text)
    # libssl.so, libssl.so.3 and /usr/lib's copy are one file; NSS's libssl3.so is not OpenSSL.
    assert paths == [os.path.realpath(LIBSSL3)]


def test_defined_symbols_of_real_libraries(tmp_path: Path) -> None:
    syms = ssl_libs.defined_ssl_symbols(LIBSSL3)
    assert {"SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex", "SSL_set_fd"} <= set(syms)
    # curl links libssl: it imports SSL_write but does not define it.
    assert ssl_libs.defined_ssl_symbols(shutil.which("curl") or "/usr/bin/curl") == []
    junk = tmp_path / "libssl.so.3"
    junk.write_bytes(b"not an ELF file")
    assert ssl_libs.defined_ssl_symbols(str(junk)) == []


def _built(tmp_path: Path, name: str, functions: list[str]) -> str:
    """An executable (gcc, not stripped) defining `functions`, each called so none is dropped."""
    src = tmp_path / f"{name}.c"
    body = "".join(f"int {fn}(int x) {{ return x + {i}; }}\n" for i, fn in enumerate(functions))
    calls = " + ".join(f"{fn}(argc)" for fn in functions)
    src.write_text(body + f"int main(int argc, char **argv) {{ (void)argv; return {calls}; }}\n")
    exe = tmp_path / name
    subprocess.run(["gcc", "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
    return str(exe)


def test_defined_symbols_of_a_statically_linked_copy_are_found_by_their_exact_names(tmp_path: Path) -> None:
    """An executable with OpenSSL's functions inside (here: functions of those names) defines
    them; one whose names only end the same way does not, although its string table holds
    "SSL_write\\0" (a symbol may name the tail of a longer string: only exact names count)."""
    filler = [f"filler_{i}" for i in range(3_000)]  # a large .symtab, scanned by struct
    exe = _built(tmp_path, "static_ssl", ["SSL_write", "SSL_read", "SSL_write_ex", *filler])
    assert ssl_libs.defined_ssl_symbols(exe) == ["SSL_read", "SSL_write", "SSL_write_ex"]
    assert ssl_libs.SslAttacher._statically_linked(exe)
    lookalike = _built(tmp_path, "lookalike", ["not_SSL_write", "not_SSL_read"])
    assert b"SSL_write\0" in Path(lookalike).read_bytes()
    assert ssl_libs.defined_ssl_symbols(lookalike) == []
    assert not ssl_libs.SslAttacher._statically_linked(lookalike)


def _fake_proc(root: Path, pid: int, maps: str, files: dict[str, str]) -> None:
    """/proc/PID/{maps,root/...,exe} with the given library files copied into the process's root."""
    d = root / str(pid)
    (d / "root").mkdir(parents=True)
    (d / "maps").write_text(maps)
    for inside, source in files.items():
        target = d / "root" / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    os.symlink("/bin/true", d / "exe")


def test_container_library_attached_once_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl_libs, "system_libssl_paths", lambda: [LIBSSL3])
    lib_in_container = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    maps = f"7f00-7f10 r-xp 00000000 fe:01 1 {lib_in_container}\n"
    _fake_proc(tmp_path, 100, maps, {lib_in_container: LIBSSL3})
    # Two processes of one container share the library file: hard link it into the second root.
    (tmp_path / "101" / "root" / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    os.link(tmp_path / "100" / "root" / lib_in_container.lstrip("/"),
            tmp_path / "101" / "root" / lib_in_container.lstrip("/"))
    (tmp_path / "101" / "maps").write_text(maps)
    os.symlink("/bin/true", tmp_path / "101" / "exe")

    probes = RecordingProbes()
    a = ssl_libs.SslAttacher(probes, proc_root=str(tmp_path))
    n = a.scan_existing([100, 101, 102])  # 102 does not exist: ignored
    per_lib = 4 * 2 + 1  # four functions, entry and return, plus SSL_set_fd
    assert n == 2 * per_lib == a.attached_probes
    opened = {c[1] for c in probes.calls}
    assert opened == {LIBSSL3, f"{tmp_path}/100/root{lib_in_container}"}
    # Entries and returns by symbol, the returns as uretprobes (C stacks do not move).
    assert [c for c in probes.calls if c[1] == LIBSSL3][:3] == [
        ("uprobe", LIBSSL3, "SSL_write", "kspan_ssl_write_enter"),
        ("uretprobe", LIBSSL3, "SSL_write", "kspan_ssl_write_return"),
        ("uprobe", LIBSSL3, "SSL_read", "kspan_ssl_read_enter"),
    ]
    assert ("uprobe", LIBSSL3, "SSL_set_fd", "kspan_ssl_set_fd") in probes.calls
    assert a.scan_existing([100, 101]) == 0  # nothing new
    assert a.on_exec(101) == 0


def test_exec_rescans_until_the_library_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl_libs, "system_libssl_paths", lambda: [])
    _fake_proc(tmp_path, 200, "", {"/lib/libssl.so.3": LIBSSL3})
    a = ssl_libs.SslAttacher(RecordingProbes(), proc_root=str(tmp_path))
    assert a.on_exec(200, now=0.0) == 0  # libssl not mapped yet
    (tmp_path / "200" / "maps").write_text("7f00-7f10 r-xp 00000000 fe:01 1 /lib/libssl.so.3\n")
    assert a.rescan_pending(now=0.1) == 0  # not due yet
    assert a.rescan_pending(now=0.25) == 9
    assert a.rescan_pending(now=100.0) == 0
    assert a.rescan_pending(now=200.0) == 0 and not a._pending


def test_not_openssl_and_attach_failures_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl_libs, "system_libssl_paths", lambda: [NSS_LIBSSL3])
    a = ssl_libs.SslAttacher(RecordingProbes(), proc_root=str(tmp_path))
    assert a.scan_existing([]) == 0
    assert any("no SSL_read/SSL_write" in e for e in a.errors)

    monkeypatch.setattr(ssl_libs, "system_libssl_paths", lambda: [LIBSSL3])
    a = ssl_libs.SslAttacher(RecordingProbes(fail={"SSL_read_ex"}), proc_root=str(tmp_path))
    assert a.scan_existing([]) == 7
    assert any("cannot attach to SSL_read_ex" in e for e in a.errors)
    strict = ssl_libs.SslAttacher(RecordingProbes(fail={"SSL_read_ex"}), proc_root=str(tmp_path), strict=True)
    with pytest.raises(RuntimeError, match="SSL_read_ex"):
        strict.scan_existing([])
