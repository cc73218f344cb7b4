"""Capability probing, backend choice, `kspan doctor` output and the timeout sweep's decisions:
pure functions tested on made-up kernels, plus the real probe of this machine (cheap, no bcc)."""

from __future__ import annotations

import ctypes
import gzip
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.ebpf import fail_or_skip
from tracer import capabilities, sweeper
from tracer.btf import Btf, BtfError, func_id
from tracer.capabilities import Capabilities, choose_backend, kernel_config
from tracer.doctor import checks, render
from tracer.records import EXCHANGE_SIZE, RawExchange

THIS_MACHINE = Capabilities(
    kernel="6.18.44", root=True, cap_bpf=True, btf=True, tracefs="/sys/kernel/tracing", tracepoints=True,
    kprobes_config=False, kprobe_events=False, kprobes=False, fentry=False,
    fentry_detail="loading a test fentry program failed: Operation not permitted", uprobes=True, ringbuf=True,
    lockdown="integrity", btf_path="/sys/kernel/btf/vmlinux", libbpf_version="1.1",
    kernel_config_source="/proc/config.gz",
)
PRODUCTION = replace(THIS_MACHINE, kprobes_config=True, kprobe_events=True, kprobes=True, fentry=True,
                     fentry_detail="")


def test_backend_here_is_tracepoints_because_no_kprobes_and_no_fentry() -> None:
    backend, reason = choose_backend(THIS_MACHINE)
    assert backend == "tracepoints" and "kprobes" in reason and "Operation not permitted" in reason


def test_backend_prefers_fentry_then_kprobes() -> None:
    assert choose_backend(PRODUCTION)[0] == "fentry"
    backend, reason = choose_backend(replace(PRODUCTION, fentry=False, fentry_detail="EPERM"))
    assert backend == "kprobes" and "EPERM" in reason


def test_explicit_backend_requests() -> None:
    assert choose_backend(THIS_MACHINE, "kprobes")[0] == ""
    assert "kprobes" in choose_backend(THIS_MACHINE, "kprobes")[1]
    assert choose_backend(THIS_MACHINE, "fentry")[0] == ""
    assert "Operation not permitted" in choose_backend(THIS_MACHINE, "fentry")[1]
    assert choose_backend(PRODUCTION, "tracepoints")[0] == "tracepoints"
    assert choose_backend(PRODUCTION, "kprobes")[0] == "kprobes"
    assert choose_backend(PRODUCTION, "bogus")[0] == ""


def test_no_tracefs_and_no_kprobes_means_no_backend() -> None:
    caps = replace(THIS_MACHINE, tracefs="", tracepoints=False)
    backend, reason = choose_backend(caps)
    assert backend == "" and "mount -t tracefs" in reason


def test_doctor_here_exits_zero_and_names_backend() -> None:
    text, code = render(THIS_MACHINE)
    assert code == 0
    lines = text.splitlines()
    assert lines[-1].startswith("backend: tracepoints")
    names = ["root / CAP_BPF", "BTF", "libbpf", "probe objects", "tracefs", "kprobes", "fentry", "uprobes",
             "ring buffer", "lockdown"]
    for name in names:
        line = next(x for x in lines if f"  {name}  " in x + "  ")
        assert line.strip().split()[0] in ("ok", "NO")
    assert any(x.strip().startswith("NO") and "kprobes" in x and "CONFIG_KPROBES" in x for x in lines)
    assert not any("header" in x or "bcc" in x for x in lines), "no kernel headers or bcc are needed any more"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"root": False, "cap_bpf": False}, "run as root"),
        ({"libbpf_version": "", "libbpf_error": "OSError: libbpf.so.1: cannot open shared object file"}, "libbpf1"),
        ({"btf": False, "btf_path": "", "btf_detail": "no /sys/kernel/btf/vmlinux"}, "--btf FILE"),
        ({"objects_missing": ["process"]}, "scripts/build-bpf.sh"),
        ({"tracefs": "", "tracepoints": False}, "mount -t tracefs"),
        ({"ringbuf": False, "ringbuf_detail": "kernel older than 5.8"}, "5.8"),
    ],
)
def test_doctor_fails_when_tracing_is_impossible(change: dict[str, object], needle: str) -> None:
    text, code = render(replace(THIS_MACHINE, **change))  # type: ignore[arg-type]
    assert code != 0
    assert needle in text


def test_every_failed_required_check_has_a_hint() -> None:
    broken = Capabilities(kernel="5.4.0")
    for c in checks(broken):
        if not c.ok:
            assert c.hint, f"{c.name} fails without saying what to do"


def test_kernel_config_parses_gz_and_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = b"CONFIG_KPROBES=y\n# CONFIG_FOO is not set\nCONFIG_BAR=m\n"
    boot = tmp_path / "config-9.9.9"
    boot.write_bytes(conf)
    real_path = capabilities.Path

    def fake_path(p: str) -> Path:
        if p == "/proc/config.gz":
            return tmp_path / "missing.gz"
        if p == "/boot/config-9.9.9":
            return boot
        return real_path(p)

    monkeypatch.setattr(capabilities, "Path", fake_path)
    parsed, source = kernel_config("9.9.9")
    assert parsed["CONFIG_KPROBES"] == "y" and parsed["CONFIG_FOO"] == "n" and source.endswith("config-9.9.9")
    gz = tmp_path / "missing.gz"
    gz.write_bytes(gzip.compress(b"# CONFIG_KPROBES is not set\n"))
    parsed, source = kernel_config("9.9.9")
    assert parsed["CONFIG_KPROBES"] == "n" and source.endswith(".gz")


def test_real_probe_is_cheap_and_consistent() -> None:
    t = time.monotonic()
    caps = capabilities.probe(try_loads=False)
    assert time.monotonic() - t < 2.0
    assert caps.kernel
    assert caps.btf == Path("/sys/kernel/btf/vmlinux").is_file()
    assert caps.libbpf_version.startswith("1."), caps.libbpf_error
    if caps.kprobes:
        assert caps.kprobes_config is not False


def test_func_id_from_kernel_btf() -> None:
    """doctor's fentry attempt needs tcp_sendmsg's BTF id; a missing function is an error."""
    if not Path("/sys/kernel/btf/vmlinux").is_file():
        fail_or_skip("no kernel BTF here (/sys/kernel/btf/vmlinux)")  # CI's kernel must have it
    assert func_id("tcp_sendmsg") > 0
    with pytest.raises(BtfError):
        func_id("kspan_no_such_kernel_function")


def test_btf_reader_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "btf"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(BtfError):
        Btf(bad)
    with pytest.raises(BtfError):
        Btf(tmp_path / "absent")


# -- the timeout sweep ------------------------------------------------------------------------


class FakeConn(ctypes.Structure):
    _fields_ = [("ex", ctypes.c_uint8 * EXCHANGE_SIZE), ("last_ns", ctypes.c_uint64),
                ("phase", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 7)]


def _conn(phase: int, last_ns: int) -> bytes:
    c = FakeConn()
    ex = RawExchange()
    ex.type = 1
    ex.pid = 42
    ex.end_reason = 0
    ctypes.memmove(c.ex, ctypes.addressof(ex), EXCHANGE_SIZE)
    c.last_ns = last_ns
    c.phase = phase
    return ctypes.string_at(ctypes.addressof(c), ctypes.sizeof(c))


LAYOUT = sweeper.ConnLayout(FakeConn.last_ns.offset, FakeConn.phase.offset, ctypes.sizeof(FakeConn))


def test_sweep_takes_stale_in_flight_exchange_as_timeout() -> None:
    st = sweeper.stale_record(7, _conn(phase=1, last_ns=1_000), now_mono_ns=5_000_000_000, timeout_ns=10**9,
                              layout=LAYOUT)
    assert st is not None and st.conn_id == 7
    rec = RawExchange.from_buffer_copy(st.record)
    assert rec.end_reason == sweeper.END_TIMEOUT and rec.pid == 42 and len(st.record) == EXCHANGE_SIZE


@pytest.mark.parametrize(("phase", "last"), [(0, 1_000), (1, 4_500_000_000), (2, 0)])
def test_sweep_leaves_idle_recent_or_unstarted_states(phase: int, last: int) -> None:
    assert sweeper.stale_record(7, _conn(phase, last), 5_000_000_000, 10**9, LAYOUT) is None


def test_sweep_never_emits_a_state_that_only_holds_request_prefix_bytes() -> None:
    # KSPAN_PH_PREFIX: "GE" sent long ago and nothing since; its embedded record is the previous,
    # already emitted exchange of a keep-alive connection (or zeros on a new one): not an exchange
    assert sweeper.stale_record(7, _conn(sweeper.PHASE_PREFIX, 1_000), 5_000_000_000, 10**9, LAYOUT) is None


def test_sweep_ignores_short_values() -> None:
    assert sweeper.stale_record(7, b"\x01" * 10, 5_000_000_000, 10**9, LAYOUT) is None


def test_btf_source_precedence(tmp_path: Path) -> None:
    """--btf wins over KSPAN_BTF, which wins over the kernel's own; a missing file is named."""
    f1, f2 = tmp_path / "a.btf", tmp_path / "b.btf"
    f1.write_bytes(b"x")
    f2.write_bytes(b"y")
    assert capabilities.btf_source(str(f1), {"KSPAN_BTF": str(f2)}) == (str(f1), "")
    assert capabilities.btf_source(None, {"KSPAN_BTF": str(f2)}) == (str(f2), "")
    path, problem = capabilities.btf_source(None, {"KSPAN_BTF": str(tmp_path / "nope.btf")})
    assert path == "" and "nope.btf" in problem and "KSPAN_BTF" in problem
    path, problem = capabilities.btf_source(str(tmp_path / "gone.btf"), {})
    assert path == "" and "--btf" in problem


def test_context_propagation_needs_cgroup2_and_sockops_tcp_options() -> None:
    here = replace(THIS_MACHINE, cgroup2="/sys/fs/cgroup/unified", cgroup_bpf=True, sockops_hdr_opts=True)
    assert capabilities.context_propagation_problem(here) == ""
    text, _ = render(here)
    assert "context propagation: tcp" in text and "/sys/fs/cgroup/unified" in text
    assert "mount -t cgroup2" in capabilities.context_propagation_problem(replace(here, cgroup2=""))
    assert "CONFIG_CGROUP_BPF" in capabilities.context_propagation_problem(replace(here, cgroup_bpf=False))
    old = replace(here, sockops_hdr_opts=False, sockops_detail="loading a sock_ops program that writes TCP "
                  "options failed: Invalid argument")
    assert "Invalid argument" in capabilities.context_propagation_problem(old)
    text, code = render(old)
    assert code == 0, "tracing goes on without propagation"
    assert "context propagation: none" in text
    assert any(x.strip().startswith("NO") and "sock_ops TCP options" in x for x in text.splitlines())


def test_cgroup2_mount_is_read_from_proc_mounts() -> None:
    hybrid = ("cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n")
    assert capabilities.cgroup2_mount(hybrid) == "/sys/fs/cgroup/unified"
    assert capabilities.cgroup2_mount("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == "/sys/fs/cgroup"
    assert capabilities.cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n") == ""


def test_the_sockops_probe_of_this_machine_loads() -> None:
    from tests.support.ebpf import require_ebpf

    require_ebpf()
    caps = capabilities.probe()
    assert caps.sockops_hdr_opts, caps.sockops_detail
    assert caps.cgroup2 == capabilities.cgroup2_mount()
