"""Both socket backends' programs pass the kernel verifier here, including the kprobes backend,
which this kernel cannot attach (a kprobe program still loads: uprobes share its program type)."""

from __future__ import annotations

import platform

import pytest

from tests.support.ebpf import on_load_error, require_ebpf
from tracer.loader import CaptureConfig, CaptureError, verifier_insns, verify_programs

pytestmark = pytest.mark.ebpf

ALL_FILTERS = CaptureConfig(pids={1}, exe_names={"nginx"}, ports={80, 8080}, network_events=True)
NO_FILTERS = CaptureConfig(network_events=True)


def _verify(backend: str, config: CaptureConfig, portable: bool = False) -> set[str]:
    require_ebpf()
    try:
        return set(verify_programs(backend, config, portable=portable))
    except CaptureError as exc:
        on_load_error(exc, f"{backend} backend")


COMMON = {
    "kspan_sock_length",  # the exchange state machine
    "tracepoint__sock__inet_sock_set_state",
    "tracepoint__syscalls__sys_enter_write",
    "tracepoint__sched__sched_process_exec",
    "tracepoint__sched__sched_process_fork",  # only compiled with pid filtering
    "tracepoint__tcp__tcp_probe",
    "tracepoint__tcp__tcp_retransmit_skb",
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="register-based syscall arguments are x86_64 only")
def test_tracepoints_backend_loads_with_every_filter() -> None:
    loaded = _verify("tracepoints", ALL_FILTERS)
    assert COMMON <= loaded, f"missing: {COMMON - loaded}"
    # arguments come from the registers: no hook on reads, none at syscall exit
    unwanted = ("tracepoint__syscalls__sys_exit", "tracepoint__syscalls__sys_enter_read")
    assert not {n for n in loaded if n.startswith(unwanted)}


def test_tracepoints_backend_portable_variant_loads() -> None:
    """The variant for other architectures: arguments saved at syscall entry, dropped at exit."""
    loaded = _verify("tracepoints", ALL_FILTERS, portable=True)
    expected = COMMON | {"tracepoint__syscalls__sys_enter_recvmsg", "tracepoint__syscalls__sys_exit_read",
                         "tracepoint__syscalls__sys_enter_readv"}
    assert expected <= loaded, f"missing: {expected - loaded}"


@pytest.mark.parametrize("config", [ALL_FILTERS, NO_FILTERS], ids=["filters", "no-filters"])
def test_kprobes_backend_loads_without_attaching(config: CaptureConfig) -> None:
    loaded = _verify("kprobes", config)
    expected = {"kspan_tcp_sendmsg", "kspan_tcp_recvmsg", "kspan_tcp_xfer_ret", "kspan_tcp_close",
                "tracepoint__sock__inet_sock_set_state", "tracepoint__sched__sched_process_exit"}
    assert expected <= loaded, f"missing: {expected - loaded}"
    assert not any(name.startswith("tracepoint__syscalls__") for name in loaded), "kprobes need no syscall hooks"


@pytest.mark.parametrize(("backend", "fn"), [("tracepoints", "kspan_sock_length"), ("kprobes", "kspan_tcp_xfer_ret")])
def test_state_machine_leaves_verifier_headroom(backend: str, fn: str) -> None:
    """The exchange state machine is one large program; the verifier walks at most 1,000,000
    instructions. Keep well under it (with every filter compiled in), so that a change (or a probe
    family's own use of kspan_on_data) fails here first, with a number, not at a user's start-up."""
    require_ebpf()
    try:
        walked = verifier_insns(backend, fn, ALL_FILTERS)
    except CaptureError as exc:
        on_load_error(exc, f"{backend} backend")
    assert 0 < walked < 700_000, f"{fn} needs {walked} verifier instructions"
