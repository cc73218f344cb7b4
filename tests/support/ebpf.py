"""eBPF test gating: in CI (CI=true) a probe that cannot load or attach FAILS the test; elsewhere
the test is skipped with the reason, so a developer without root still runs the rest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def fail_or_skip(reason: str) -> NoReturn:
    """Fail under CI=true, skip otherwise (eBPF, or a tool the test needs that setup installs)."""
    if in_ci():
        pytest.fail(f"unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def ebpf_problem() -> str:
    """Why eBPF tests cannot run here, or "" when they can."""
    if os.geteuid() != 0:
        return "needs root (loading BPF programs)"
    try:
        import ctypes

        ctypes.CDLL("libbpf.so.1")
    except OSError as exc:
        return f"libbpf.so.1 cannot be loaded ({exc}); apt-get install libbpf1"
    objects = Path(__file__).resolve().parents[2] / "tracer" / "objects"
    if not any(objects.glob("*.bpf.o")):
        return f"no probe objects in {objects}: run `make setup` (scripts/build-bpf.sh)"
    if not any((Path(p) / "events").is_dir() for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
    return ""


def require_ebpf() -> None:
    """Call at the start of an eBPF test (or in a fixture)."""
    problem = ebpf_problem()
    if problem:
        fail_or_skip(problem)


def on_load_error(exc: BaseException, what: str = "probe") -> NoReturn:
    """A probe failed to load or attach: fail in CI, skip elsewhere, with the error text."""
    fail_or_skip(f"{what} could not load/attach: {type(exc).__name__}: {exc}")
