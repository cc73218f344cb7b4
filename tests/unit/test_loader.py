"""tracer/loader.py against the real kernel and libbpf: a tiny object (tests/support/bpf_test/) is
compiled here, loaded, configured, attached and read back. The struct layouts the loader hands to
libbpf are checked against the C compiler's view of the installed headers."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ebpf import fail_or_skip, require_ebpf
from tracer import loader, ringbuf
from tracer.loader import BPF_NOEXIST, BpfObject, LoaderError, Map, enable_run_stats, file_offset, prog_info
from tracer.ringbuf import RingBufferReader

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "tests" / "support" / "bpf_test"
VMLINUX_H = REPO / "build" / "bpf" / "vmlinux.h"

# struct loader_test_rec (tests/support/bpf_test/loader_test.h)
REC = struct.Struct("<IIIiQQHBBI")
MAGIC = 0x4B53504E
# Slots of the `counter` array in loader_test.bpf.c.
GETPIDS, UPROBE_HITS, URETPROBE_HITS, LAST_ARG, LAST_RET = range(5)

@pytest.fixture()
def _ebpf() -> None:
    require_ebpf()  # fails under CI=true, skips elsewhere


# Tests that load programs: root and libbpf, never a silent skip in CI.
needs_root = pytest.mark.usefixtures("_ebpf")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_getpid = 39  # x86_64


def raw_getpid() -> int:
    """getpid through syscall(2): no libc caching can skip the sys_enter_getpid tracepoint."""
    return int(_libc.syscall(_SYS_getpid))


def k32(i: int) -> bytes:
    return struct.pack("<I", i)


def u64(raw: bytes | None) -> int:
    assert raw is not None
    return int(struct.unpack("<Q", raw)[0])


def _need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        fail_or_skip(f"{name} is not installed")
    return path


def _need_libbpf() -> None:
    if loader._api is None:
        fail_or_skip(loader._api_problem)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bpf_objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """loader_test.bpf.o and loader_bad.bpf.o, built as scripts/build-bpf.sh builds kspan's."""
    clang = _need_tool("clang")
    _need_libbpf()
    if not VMLINUX_H.is_file():
        bpftool = _need_tool("bpftool")
        VMLINUX_H.parent.mkdir(parents=True, exist_ok=True)
        tmp = VMLINUX_H.with_suffix(f".h.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            subprocess.run([bpftool, "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c"],
                           check=True, stdout=f)
        tmp.replace(VMLINUX_H)
    out = tmp_path_factory.mktemp("bpf")
    objects: dict[str, Path] = {}
    for name in ("loader_test", "loader_bad"):
        obj = out / f"{name}.bpf.o"
        _run([clang, "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-I", str(VMLINUX_H.parent),
              "-I", str(SRC), "-c", str(SRC / f"{name}.bpf.c"), "-o", str(obj)])
        objects[name] = obj
    return objects


@pytest.fixture(scope="session")
def tracefs() -> None:
    if not Path("/sys/kernel/tracing/events").is_dir() and not Path("/sys/kernel/debug/tracing/events").is_dir():
        rc = subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True)
        if rc.returncode != 0:
            fail_or_skip(f"tracefs is not mounted and mounting it failed: {rc.stderr.decode().strip()}")


@pytest.fixture(scope="session")
def uprobe_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-PIE executable: its code's virtual addresses differ from its file offsets."""
    gcc = _need_tool("gcc")
    exe = tmp_path_factory.mktemp("uprobe") / "uprobe_target"
    _run([gcc, "-O1", "-no-pie", "-o", str(exe), str(SRC / "uprobe_target.c")])
    return exe


@pytest.fixture
def obj(bpf_objects: dict[str, Path], tracefs: None) -> Iterator[BpfObject]:
    o = BpfObject.open(bpf_objects["loader_test"])
    o.set_global("target_pid", os.getpid())
    try:
        yield o
    finally:
        o.close()


def _symbol_vaddr(exe: Path, symbol: str) -> int:
    for line in _run([_need_tool("nm"), str(exe)]).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == symbol and parts[1] in "Tt":
            return int(parts[0], 16)
    raise AssertionError(f"{symbol} not in the symbol table of {exe}")


def _prog_exists(prog_id: int) -> bool:
    return subprocess.run([_need_tool("bpftool"), "prog", "show", "id", str(prog_id)],
                          capture_output=True).returncode == 0


def _wait_gone(prog_ids: list[int], timeout: float = 10.0) -> list[int]:
    """Programs still present after `timeout` (the kernel frees them after an RCU grace period)."""
    deadline = time.monotonic() + timeout
    alive = list(prog_ids)
    while alive and time.monotonic() < deadline:
        alive = [i for i in alive if _prog_exists(i)]
        if alive:
            time.sleep(0.1)
    return alive


# --- no root needed ---------------------------------------------------------------------------


_LAYOUT_PROBE_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <linux/bpf.h>
#define F(s, f) printf(#s " " #f " %zu\n", offsetof(struct s, f));
#define S(s) printf(#s " sizeof %zu\n", sizeof(struct s));
int main(void)
{
	S(bpf_object_open_opts) F(bpf_object_open_opts, sz) F(bpf_object_open_opts, object_name)
	F(bpf_object_open_opts, relaxed_maps) F(bpf_object_open_opts, pin_root_path)
	F(bpf_object_open_opts, kconfig) F(bpf_object_open_opts, btf_custom_path)
	F(bpf_object_open_opts, kernel_log_buf) F(bpf_object_open_opts, kernel_log_size)
	F(bpf_object_open_opts, kernel_log_level)
	S(bpf_uprobe_opts) F(bpf_uprobe_opts, sz) F(bpf_uprobe_opts, ref_ctr_offset) F(bpf_uprobe_opts, bpf_cookie)
	F(bpf_uprobe_opts, retprobe) F(bpf_uprobe_opts, func_name)
	S(bpf_prog_info) F(bpf_prog_info, id) F(bpf_prog_info, name) F(bpf_prog_info, run_time_ns)
	F(bpf_prog_info, run_cnt) F(bpf_prog_info, verified_insns)
	S(bpf_map_info) F(bpf_map_info, type) F(bpf_map_info, id) F(bpf_map_info, key_size)
	F(bpf_map_info, value_size) F(bpf_map_info, max_entries) F(bpf_map_info, name)
	return 0;
}
"""


def test_ctypes_layouts_match_the_installed_headers(tmp_path: Path) -> None:
    """libbpf reads `sz` bytes of an opts struct and rejects unknown non-zero tails: a field at the
    wrong offset is silently a different option."""
    gcc = _need_tool("gcc")
    if not Path("/usr/include/bpf/libbpf.h").is_file():
        fail_or_skip("libbpf-dev headers are not installed (apt-get install libbpf-dev)")
    (tmp_path / "probe.c").write_text(_LAYOUT_PROBE_C)
    _run([gcc, "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")])
    classes = {
        "bpf_object_open_opts": loader._ObjectOpenOpts,
        "bpf_uprobe_opts": loader._UprobeOpts,
        "bpf_prog_info": loader._BpfProgInfo,
        "bpf_map_info": loader._BpfMapInfo,
    }
    checked = 0
    for line in _run([str(tmp_path / "probe")]).stdout.splitlines():
        name, field, value = line.split()
        cls = classes[name]
        want = ctypes.sizeof(cls) if field == "sizeof" else getattr(cls, field).offset
        assert want == int(value), f"{name}.{field}: ctypes says {want}, the C headers {value}"
        checked += 1
    assert checked > 20


def _elf64(segments: list[tuple[int, int, int, int, int]]) -> bytes:
    """A little-endian ELF64 header plus program headers (p_type, p_offset, p_vaddr, p_filesz, p_memsz)."""
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QQ", ehdr, 0x20, 64, 0)  # e_phoff, e_shoff
    struct.pack_into("<HH", ehdr, 0x36, 56, len(segments))
    table = b"".join(struct.pack("<IIQQQQQQ", t, 5, off, va, va, fs, ms, 0x1000) for t, off, va, fs, ms in segments)
    return bytes(ehdr) + table


def test_file_offset_translates_through_pt_load(tmp_path: Path) -> None:
    path = tmp_path / "fake.elf"
    path.write_bytes(_elf64([
        (6, 64, 0x400040, 0x70, 0x70),  # PT_PHDR: not a load segment
        (1, 0, 0x400000, 0x1000, 0x1000),
        (1, 0x1000, 0x401000, 0x500, 0x500),
        (1, 0x2000, 0x403000, 0x100, 0x900),  # .data + .bss: bss has no file bytes
    ]))
    assert file_offset(path, 0x400010) == 0x10
    assert file_offset(path, 0x401136) == 0x1136
    assert file_offset(path, 0x4030F0) == 0x20F0
    with pytest.raises(LoaderError, match="no PT_LOAD"):
        file_offset(path, 0x403200)  # in memory (bss), not in the file
    with pytest.raises(LoaderError, match="no PT_LOAD"):
        file_offset(path, 0x10)
    (tmp_path / "text").write_text("not an ELF file at all, long enough to hold a header" * 2)
    with pytest.raises(LoaderError, match="not an ELF"):
        file_offset(tmp_path / "text", 0)
    with pytest.raises(LoaderError, match="reading"):
        file_offset(tmp_path / "missing", 0)


def test_file_offset_of_a_real_symbol(uprobe_target: Path) -> None:
    vaddr = _symbol_vaddr(uprobe_target, "kspan_target")
    off = file_offset(uprobe_target, vaddr)
    assert off != vaddr  # non-PIE: the text segment is mapped at 0x400000 + its file offset
    assert 0 < off < uprobe_target.stat().st_size


def test_open_failures(tmp_path: Path, bpf_objects: dict[str, Path]) -> None:
    with pytest.raises(LoaderError, match="opening .*missing.bpf.o: No such file"):
        BpfObject.open(tmp_path / "missing.bpf.o")
    with pytest.raises(LoaderError, match="BTF file .* is not readable"):
        BpfObject.open(bpf_objects["loader_test"], btf_path=str(tmp_path / "no-vmlinux"))


def test_object_contents_before_load(bpf_objects: dict[str, Path]) -> None:
    with BpfObject.open(bpf_objects["loader_test"]) as o:
        assert o.name == "loader_test"
        assert o.programs() == ["loader_getpid", "loader_uprobe", "loader_uretprobe"]
        assert o.maps() == ["counter", "pcpu", "records", "layouts", "shared"]  # no .rodata
        assert o.program_section("loader_getpid") == "tp/syscalls/sys_enter_getpid"
        assert o.has_global("test_value") and not o.has_global("no_such_global")
        with pytest.raises(KeyError):
            o.set_global("no_such_global", 1)
        with pytest.raises(KeyError):
            o.map("no_such_map")
        with pytest.raises(LoaderError, match="load"):
            o.map("counter")  # no fd before load
        with pytest.raises(ValueError):
            o.set_global("test_value", -1)  # __u32
        with pytest.raises(ValueError):
            o.set_global("tiny_value", 256)  # __u8
        with pytest.raises(ValueError):
            o.set_global("neg_value", 1 << 31)  # __s32
        with pytest.raises(ValueError):
            o.set_global("flag_on", 2)  # bool
    assert o.closed
    with pytest.raises(LoaderError, match="closed"):
        o.programs()


_STRUCT_PROBE_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/types.h>
#include "loader_test.h"
#define F(f) printf(#f " %zu %zu\n", offsetof(struct loader_test_layout, f), \
                    sizeof(((struct loader_test_layout *)0)->f));
int main(void)
{
	F(a) F(b) F(c) F(d) F(inner) F(inner.x) F(inner.y) F(u) F(v) F(tail)
	printf("sizeof %zu\nrec %zu\n", sizeof(struct loader_test_layout), sizeof(struct loader_test_rec));
	return 0;
}
"""


def test_struct_layout_matches_the_c_struct(tmp_path: Path, bpf_objects: dict[str, Path]) -> None:
    gcc = _need_tool("gcc")
    (tmp_path / "probe.c").write_text(_STRUCT_PROBE_C)
    _run([gcc, "-I", str(SRC), "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")])
    want: dict[str, tuple[int, int]] = {}
    sizes: dict[str, int] = {}
    for line in _run([str(tmp_path / "probe")]).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            want[parts[0]] = (int(parts[1]), int(parts[2]))
        else:
            sizes[parts[0]] = int(parts[1])
    with BpfObject.open(bpf_objects["loader_test"]) as o:
        assert o.struct_layout("loader_test_layout") == want  # anonymous union members flattened: u, v
        assert o.struct_size("loader_test_layout") == sizes["sizeof"]
        with pytest.raises(KeyError):
            o.struct_layout("no_such_struct")
    assert sizes["rec"] == REC.size


# --- root: load, attach, maps -----------------------------------------------------------------


@needs_root
def test_globals_tracepoint_ringbuf_and_percpu(obj: BpfObject) -> None:
    obj.set_global("test_value", 0xC0FFEE)
    obj.set_global("neg_value", -12345)
    obj.set_global("big_value", (1 << 64) - 2)
    obj.set_global("small_value", 0xBEEF)
    obj.set_global("tiny_value", 0xAB)
    obj.set_global("flag_on", True)
    obj.load()
    assert obj.loaded
    with pytest.raises(LoaderError, match="frozen"):
        obj.set_global("test_value", 1)
    counter, pcpu, records = obj.map("counter"), obj.map("pcpu"), obj.map("records")
    reader = RingBufferReader(records.fd, records.max_entries)
    me = os.getpid()  # os.getpid() is a getpid(2) too: not while attached
    try:
        obj.attach("loader_getpid")
        for _ in range(3):
            assert raw_getpid() == me
        assert u64(counter.lookup(k32(GETPIDS))) == 3
        per_cpu = pcpu.lookup_percpu(k32(0))
        assert len(per_cpu) == loader.num_possible_cpus()
        assert sum(u64(v) for v in per_cpu) == 3
        assert len(pcpu.lookup(k32(0)) or b"") == 8 * loader.num_possible_cpus()
        out: list[bytes] = []
        assert reader.drain(out) == 3
    finally:
        reader.close()
    recs = [REC.unpack(r) for r in out]
    for i, (magic, test_value, pid, neg, count, big, small, tiny, flag, _pad) in enumerate(recs, 1):
        assert (magic, test_value, pid, neg, count) == (MAGIC, 0xC0FFEE, me, -12345, i)
        assert (big, small, tiny, flag) == ((1 << 64) - 2, 0xBEEF, 0xAB, 1)


@needs_root
def test_ringbuf_drains_are_paced_an_interval_apart_unless_cut_by_their_limit(obj: BpfObject) -> None:
    """A drain that emptied the ring is followed by the next one an interval later even when
    records are committed meanwhile (a poll's batch is an interval's records); one cut by its
    limit is followed at once; an empty ring waits out its timeout; a record the kernel submits
    with a wakeup (BPF_RB_FORCE_WAKEUP, as kspan's exec records) ends a pause at once."""
    obj.load()
    records = obj.map("records")
    reader = RingBufferReader(records.fd, records.max_entries)
    try:
        obj.attach("loader_getpid")
        raw_getpid()
        out: list[bytes] = []
        assert reader.drain(out) == 1
        t0 = time.monotonic()
        for _ in range(3):
            raw_getpid()
        reader.wait(5_000, interval_s=0.3)
        assert time.monotonic() - t0 >= 0.3  # committed at once, still paced
        assert reader.drain(out, limit=2) == 2
        t0 = time.monotonic()
        reader.wait(5_000, interval_s=30.0)
        assert time.monotonic() - t0 < 5.0  # the limit cut the drain: no pause
        assert reader.drain(out) == 1
        t0 = time.monotonic()
        reader.wait(200, interval_s=0.05)  # nothing committed: the timeout
        assert 0.2 <= time.monotonic() - t0 < 5.0 and not reader.pending()
        reader.wait(0)  # a zero timeout never sleeps
        for _ in range(3):  # records 5 to 7: no wakeup, the pause is kept
            raw_getpid()
        t0 = time.monotonic()
        reader.wait(300, interval_s=30.0)
        assert time.monotonic() - t0 >= 0.3
        raw_getpid()  # record 8 is submitted with a wakeup (as an exec record is): the pause ends
        t0 = time.monotonic()
        reader.wait(10_000, interval_s=30.0)
        assert time.monotonic() - t0 < 5.0
        reader.wait(300, interval_s=30.0)  # one wakeup ends one pause
        assert time.monotonic() - t0 >= 0.3
        assert reader.drain(out) == 4
        # The interval follows the rate: a fast burst is drained every DRAIN_INTERVAL_S, a quiet
        # ring every DRAIN_INTERVAL_MAX_S.
        assert reader.drain(out) == 0 and reader.interval_s == ringbuf.DRAIN_INTERVAL_MAX_S
        for _ in range(300):  # the test ring holds 341 of its 48-byte records
            raw_getpid()
        assert reader.drain(out) == 300
        assert reader.interval_s == ringbuf.DRAIN_INTERVAL_S
        assert reader.drain(out) == 0 and reader.interval_s == ringbuf.DRAIN_INTERVAL_MAX_S
    finally:
        reader.close()


@needs_root
def test_map_update_lookup_delete_and_keys(obj: BpfObject) -> None:
    obj.load()
    layout = obj.struct_layout("loader_test_layout")
    m = obj.map("layouts")
    assert (m.key_size, m.value_size, m.max_entries, m.map_type, m.percpu) == (
        4, obj.struct_size("loader_test_layout"), 64, loader.MAP_HASH, False)

    def value(a: int, x: int) -> bytes:
        buf = bytearray(m.value_size)
        struct.pack_into("<Q", buf, layout["a"][0], a)
        struct.pack_into("<I", buf, layout["inner.x"][0], x)
        return bytes(buf)

    assert m.lookup(k32(1)) is None
    assert m.next_key(None) is None
    for i in range(1, 6):
        m.update(k32(i), value(i * 100, i))
    got = m.lookup(k32(3))
    assert got is not None
    assert struct.unpack_from("<Q", got, layout["a"][0])[0] == 300
    assert struct.unpack_from("<I", got, layout["inner.x"][0])[0] == 3
    assert sorted(struct.unpack("<I", k)[0] for k in m.keys()) == [1, 2, 3, 4, 5]
    first = m.next_key(None)
    assert first is not None and len(list(m.keys(first))) == 4
    with pytest.raises(LoaderError) as exc:
        m.update(k32(2), value(0, 0), BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST
    assert m.delete(k32(2)) is True
    assert m.delete(k32(2)) is False
    assert m.lookup(k32(2)) is None
    with pytest.raises(ValueError):
        m.lookup(b"\x01")  # the kernel would read 4 bytes
    with pytest.raises(ValueError):
        m.update(k32(9), b"short")
    with pytest.raises(TypeError):
        m.lookup_percpu(k32(1))


@needs_root
def test_percpu_update_and_lookup(obj: BpfObject) -> None:
    obj.load()
    m = obj.map("pcpu")
    assert m.percpu and m.map_type == loader.MAP_PERCPU_ARRAY
    m.update(k32(0), struct.pack("<Q", 7))  # one value: every CPU gets it
    assert [u64(v) for v in m.lookup_percpu(k32(0))] == [7] * loader.num_possible_cpus()
    slots = b"".join(struct.pack("<Q", 10 + i) for i in range(loader.num_possible_cpus()))
    m.update(k32(0), slots)
    assert [u64(v) for v in m.lookup_percpu(k32(0))] == [10 + i for i in range(loader.num_possible_cpus())]


@needs_root
def test_reuse_maps_shares_one_map(bpf_objects: dict[str, Path], obj: BpfObject) -> None:
    obj.set_max_entries("shared", 100)
    obj.load()
    with BpfObject.open(bpf_objects["loader_test"]) as second:
        second.reuse_maps(obj.map_fds())
        second.set_max_entries("shared", 100)  # already the reused map's size: accepted
        with pytest.raises(LoaderError, match="already exists"):
            second.set_max_entries("shared", 128)
        second.load()
        a, b = obj.map("shared"), second.map("shared")
        assert a.fd != b.fd
        assert loader._map_info(a.fd).id == loader._map_info(b.fd).id
        assert b.max_entries == 100
        a.update(k32(42), struct.pack("<Q", 4242))
        assert u64(b.lookup(k32(42))) == 4242
        b.update(k32(43), struct.pack("<Q", 4343))
        assert u64(a.lookup(k32(43))) == 4343
    with BpfObject.open(bpf_objects["loader_bad"]) as bad:
        with pytest.raises(LoaderError, match="shared"):
            bad.reuse_maps(obj.map_fds())  # same name, 8-byte keys: not the same map


@needs_root
def test_set_max_entries_is_visible_in_the_map_info(obj: BpfObject) -> None:
    obj.set_max_entries("counter", 8)
    obj.set_max_entries("records", 8192)
    obj.load()
    assert obj.map("counter").max_entries == 8
    bare = Map.from_fd(obj.map("counter").fd)
    assert (bare.name, bare.map_type, bare.key_size, bare.value_size, bare.max_entries) == (
        "counter", loader.MAP_ARRAY, 4, 8, 8)
    ring = Map.from_fd(obj.map_fds()["records"], "events")
    assert (ring.name, ring.map_type, ring.max_entries) == ("events", loader.MAP_RINGBUF, 8192)
    with pytest.raises(LoaderError, match="already exists"):
        obj.set_max_entries("counter", 16)


@needs_root
def test_uprobe_by_file_offset_and_uretprobe_by_symbol(obj: BpfObject, uprobe_target: Path) -> None:
    obj.load()
    offset = file_offset(uprobe_target, _symbol_vaddr(uprobe_target, "kspan_target"))
    obj.attach_uprobe("loader_uprobe", uprobe_target, offset=offset)
    obj.attach_uprobe("loader_uretprobe", uprobe_target, symbol="kspan_target", retprobe=True)
    result = _run([str(uprobe_target), "5"])
    assert int(result.stdout) == sum(2 * (1000 + i) + 1 for i in range(5))
    counter = obj.map("counter")
    assert u64(counter.lookup(k32(UPROBE_HITS))) == 5
    assert u64(counter.lookup(k32(LAST_ARG))) & 0xFFFFFFFF == 1004
    assert u64(counter.lookup(k32(URETPROBE_HITS))) == 5
    assert u64(counter.lookup(k32(LAST_RET))) & 0xFFFFFFFF == 2009
    with pytest.raises(LoaderError, match="attaching loader_uprobe"):
        obj.attach_uprobe("loader_uprobe", uprobe_target, symbol="no_such_function")


@needs_root
def test_attach_needs_a_target_in_the_section(obj: BpfObject) -> None:
    obj.load()
    with pytest.raises(LoaderError, match="without a target") as exc:
        obj.attach("loader_uprobe")
    assert exc.value.errno == errno.EOPNOTSUPP


@needs_root
@pytest.mark.parametrize("stats", [False, True])
def test_verifier_complaint_is_in_the_error(bpf_objects: dict[str, Path], stats: bool) -> None:
    with BpfObject.open(bpf_objects["loader_bad"]) as bad:
        with pytest.raises(LoaderError) as exc:
            bad.load(stats=stats)
    message = str(exc.value)
    assert message.startswith("loading loader_bad: Permission denied")
    assert "R0 invalid mem access 'map_value_or_null'" in message
    assert exc.value.errno == errno.EACCES
    assert len(message.splitlines()) <= loader.LOG_TAIL_LINES + 1


@needs_root
def test_verifier_stats(obj: BpfObject) -> None:
    obj.load(stats=True)
    stats = obj.verifier_stats()
    assert set(stats) == {"loader_getpid", "loader_uprobe", "loader_uretprobe"}
    for name, insns in stats.items():
        assert insns > 0
        # the kernel keeps the same count (bpf_prog_info.verified_insns, 5.16+)
        assert prog_info(obj.program_fd(name)).verified_insns == insns


@needs_root
def test_program_run_statistics(obj: BpfObject) -> None:
    obj.load()
    obj.attach_tracepoint("loader_getpid", "syscalls", "sys_enter_getpid")
    stats_fd = enable_run_stats()
    try:
        for _ in range(4):
            raw_getpid()
        runs, ns = obj.program_info("loader_getpid")
    finally:
        os.close(stats_fd)
    assert runs >= 4 and ns > 0
    assert obj.program_stats()["loader_getpid"][0] >= 4
    assert obj.program_stats()["loader_uprobe"] == (0, 0)


@needs_root
def test_btf_path_relocates_against_the_given_btf(bpf_objects: dict[str, Path], tracefs: None) -> None:
    with BpfObject.open(bpf_objects["loader_test"], btf_path="/sys/kernel/btf/vmlinux") as o:
        o.set_global("target_pid", os.getpid())
        o.load()
        o.attach("loader_getpid")
        raw_getpid()
        assert u64(o.map("counter").lookup(k32(GETPIDS))) == 1


@needs_root
def test_close_detaches_everything(obj: BpfObject, uprobe_target: Path) -> None:
    obj.load()
    links = [obj.attach("loader_getpid"),
             obj.attach_uprobe("loader_uprobe", uprobe_target, symbol="kspan_target")]
    ids = [prog_info(obj.program_fd(p)).id for p in ("loader_getpid", "loader_uprobe", "loader_uretprobe")]
    counter = obj.map("counter")
    assert all(_prog_exists(i) for i in ids)
    links[1].destroy()
    links[1].destroy()  # idempotent
    obj.close()
    obj.close()
    assert all(link.destroyed for link in links)
    assert _wait_gone(ids) == []
    with pytest.raises(LoaderError, match="closed"):
        counter.lookup(k32(0))
    uprobe_events = Path("/sys/kernel/tracing/uprobe_events")
    if uprobe_events.is_file():  # perf-event uprobes leave no tracefs entries behind
        assert "uprobe_target" not in uprobe_events.read_text()


_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from tracer.loader import BpfObject, prog_info
o = BpfObject.open({obj!r})
o.set_global("target_pid", 1)
o.load()
o.attach("loader_getpid")
o.attach_uprobe("loader_uprobe", {exe!r}, symbol="kspan_target")
o.attach_uprobe("loader_uretprobe", {exe!r}, symbol="kspan_target", retprobe=True)
print(*(prog_info(o.program_fd(p)).id for p in o.programs()), flush=True)
time.sleep(120)
"""


@needs_root
def test_sigkill_leaves_nothing_attached(bpf_objects: dict[str, Path], uprobe_target: Path, tracefs: None) -> None:
    code = _CHILD.format(repo=str(REPO), obj=str(bpf_objects["loader_test"]), exe=str(uprobe_target))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else ""
        ids = [int(x) for x in line.split()]
        assert len(ids) == 3 and all(_prog_exists(i) for i in ids)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _wait_gone(ids) == []
