"""Every backend's precompiled objects pass the kernel verifier here, with every filter on and off.

The kprobes backend loads although this kernel cannot attach it (a kprobe program still loads:
uprobes share its program type). The fentry backend cannot even be loaded on a kernel that
refuses fentry (EPERM on the CI machines); its test says so explicitly instead of passing.
"""

from __future__ import annotations

import platform
import warnings

import pytest

from tests.support.ebpf import on_load_error, require_ebpf
from tracer.capabilities import probe
from tracer.capture import (
    OPTIONAL_FAMILIES,
    CaptureConfig,
    CaptureError,
    ObjectSet,
    verifier_insns,
    verify_programs,
)

pytestmark = pytest.mark.ebpf

ALL_FILTERS = CaptureConfig(pids={1}, exe_names={"nginx"}, ports={80, 8080}, network_events=True,
                            cgroup_filter=True, cgroup_default_trace=False)
NO_FILTERS = CaptureConfig(network_events=True)
# ALL_FILTERS with every uprobe family, and so the uprobes' state machine (bpf/uprobe_exchange.bpf.c).
ALL_FILTERS_ALL_FAMILIES = CaptureConfig(**{**ALL_FILTERS.__dict__, "families": list(OPTIONAL_FAMILIES)})

COMMON = {
    "kspan_sock_length",  # the exchange state machine (tracepoints backend)
    "kspan_fd_close",
    "kspan_proc_exec",
    "kspan_proc_fork",
    "kspan_proc_exit",
    "kspan_inet_sock_set_state",
    "kspan_tcp_retransmit",
    "kspan_tcp_context",  # sock_ops: trace context in a TCP option (bpf/tcp_context.bpf.c)
}
UPROBES = {
    "kspan_exchange_kp",  # the state machine the uprobes tail-call (never attached)
    "kspan_ssl_write_enter", "kspan_ssl_read_ex_return", "kspan_ssl_set_fd",
    "kspan_go_tls_write_enter", "kspan_go_tls_read_ret",
    "kspan_go_serve_enter", "kspan_go_newproc_ret", "kspan_go_roundtrip_enter",
}


def _verify(backend: str, config: CaptureConfig, portable: bool = False) -> set[str]:
    require_ebpf()
    try:
        return set(verify_programs(backend, config, portable=portable))
    except CaptureError as exc:
        on_load_error(exc, f"{backend} backend")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="register-based syscall arguments are x86_64 only")
@pytest.mark.parametrize("config", [ALL_FILTERS, NO_FILTERS], ids=["filters", "no-filters"])
def test_tracepoints_backend_loads(config: CaptureConfig) -> None:
    loaded = _verify("tracepoints", config)
    assert COMMON | UPROBES <= loaded, f"missing: {(COMMON | UPROBES) - loaded}"
    # arguments come from the registers: no hook on reads, none at syscall exit
    assert not {n for n in loaded if n.startswith(("kspan_sys_enter_", "kspan_sys_exit_"))}
    assert "kspan_ws_enter" in loaded


def test_tracepoints_backend_portable_variant_loads() -> None:
    """The variant for other architectures: arguments saved at syscall entry, dropped at exit."""
    loaded = _verify("tracepoints", ALL_FILTERS, portable=True)
    expected = COMMON | {"kspan_sys_enter_recvmsg", "kspan_sys_exit_read", "kspan_sys_enter_readv"}
    assert expected <= loaded, f"missing: {expected - loaded}"
    assert not {n for n in loaded if n.startswith("kspan_ws_")}


@pytest.mark.parametrize("config", [ALL_FILTERS, NO_FILTERS], ids=["filters", "no-filters"])
def test_kprobes_backend_loads_without_attaching(config: CaptureConfig) -> None:
    loaded = _verify("kprobes", config)
    expected = {"kspan_tcp_sendmsg", "kspan_tcp_recvmsg", "kspan_tcp_xfer_ret", "kspan_tcp_close",
                "kspan_inet_sock_set_state", "kspan_proc_exit"} | UPROBES
    assert expected <= loaded, f"missing: {expected - loaded}"
    assert not any(name.startswith(("kspan_sys_", "kspan_ws_")) for name in loaded), "kprobes need no syscall hooks"


def test_fentry_backend_loads_or_says_why_not() -> None:
    """fentry is the preferred backend. Where the kernel refuses fentry programs (doctor's real
    load attempt fails), loading must fail with the kernel's refusal, named; elsewhere it loads."""
    require_ebpf()
    caps = probe()
    if caps.fentry:
        loaded = _verify("fentry", NO_FILTERS)
        assert {"kspan_fentry_tcp_sendmsg", "kspan_fexit_tcp_sendmsg", "kspan_fentry_tcp_close"} <= loaded
        return
    with pytest.raises(CaptureError) as err:
        verify_programs("fentry", NO_FILTERS)
    text = str(err.value)
    assert "sockets_fentry" in text and ("Permission denied" in text or "Operation not permitted" in text), text
    warnings.warn(f"this kernel refuses fentry programs ({caps.fentry_detail}): the fentry backend's programs "
                  "cannot be loaded here, so the verifier never saw them on this machine", stacklevel=1)


@pytest.mark.parametrize(("backend", "prog"), [("tracepoints", "kspan_sock_length"),
                                               ("kprobes", "kspan_tcp_xfer_ret"),
                                               ("tracepoints", "kspan_exchange_kp")])
def test_state_machine_leaves_verifier_headroom(backend: str, prog: str) -> None:
    """The exchange state machine is one large program; the verifier walks at most 1,000,000
    instructions. Keep well under it (with every filter on), so that a change (or a probe family's
    own use of kspan_on_data) fails here first, with a number, not at a user's start-up.
    kspan_exchange_kp is the uprobe families' copy (tail-called), loaded with those families."""
    require_ebpf()
    try:
        walked = verifier_insns(backend, prog, ALL_FILTERS_ALL_FAMILIES)
    except CaptureError as exc:
        on_load_error(exc, f"{backend} backend")
    assert 0 < walked < 700_000, f"{prog} needs {walked} verifier instructions"


# A uprobe program that only builds its arguments and tail-calls walks a few hundred instructions;
# one that inlines the state machine walks 200k+ (and over a second of start-up for a few of them).
UPROBE_PROGRAM_INSNS = 20_000


def test_uprobe_programs_tail_call_the_state_machine() -> None:
    """Start-up time: the verifier walks the state machine once per program that inlines it, so the
    uprobe programs reach it by a tail call into kspan_exchange_kp instead (one walk for all of
    them). A uprobe program inlining it again fails here, by name and instruction count."""
    require_ebpf()
    try:
        objs = ObjectSet(ALL_FILTERS_ALL_FAMILIES, "tracepoints", stats=True)
    except CaptureError as exc:
        on_load_error(exc, "tracepoints backend")
    try:
        stats = dict(objs.verifier_stats)
        uprobe_programs = {p for family in OPTIONAL_FAMILIES for p in objs.objects[family].programs()}
    finally:
        objs.close()
    assert UPROBES - {"kspan_exchange_kp"} <= uprobe_programs, uprobe_programs
    assert "kspan_exchange_kp" in stats and "kspan_exchange_kp" not in uprobe_programs
    heavy = {p: stats[p] for p in uprobe_programs if stats[p] >= UPROBE_PROGRAM_INSNS}
    assert not heavy, f"uprobe programs walking the state machine themselves: {heavy}"


def test_every_optional_family_has_an_object() -> None:
    from tracer.capture import OBJECTS_DIR, UPROBE_EXCHANGE, object_path

    missing = [f for f in (UPROBE_EXCHANGE, *OPTIONAL_FAMILIES) if not object_path(f).is_file()]
    assert not missing, f"objects missing from {OBJECTS_DIR}: {missing} (scripts/build-bpf.sh)"
