"""Fixed-rate load with bench/goload, which prints one JSON result when done."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bench.gobuild import build
from bench.processes import Managed


def start_goload(addr: str, phase: str, rate: float, duration_s: float, conns: int = 32,
                 close_each: bool = False, log_path: str | None = None, delay_s: float = 0.0) -> Managed:
    cmd = [build("goload"), "-addr", addr, "-prefix", f"/b/{phase}", "-rate", str(rate),
           "-duration", f"{duration_s}s", "-conns", str(conns), "-delay", f"{delay_s}s"]
    if close_each:
        cmd.append("-close")
    return Managed(f"goload-{phase}", cmd, log_path=log_path)


def finish_goload(proc: Managed, timeout_s: float) -> dict[str, Any]:
    try:
        proc.proc.wait(timeout_s)
    finally:
        proc.stop()
    out = proc.output("out").strip()
    if not out:
        raise RuntimeError(f"goload gave no result: {proc.output('err')[-2000:]}")
    return json.loads(out.splitlines()[-1])


def run_goload(addr: str, phase: str, rate: float, duration_s: float, conns: int = 32,
               log_path: str | None = None, delay_s: float = 0.0,
               on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run goload to completion. With `delay_s`, it waits before sending, so that a tracer's work on
    a new process (inspecting its binary) happens before the window; `on_start` is called when
    sending starts."""
    proc = start_goload(addr, phase, rate, duration_s, conns, log_path=log_path, delay_s=delay_s)
    if on_start is not None:
        if proc.wait_line(r"^goload: sending", delay_s + 30) is None:
            proc.stop()
            raise RuntimeError(f"goload did not start sending: {proc.output()[-2000:]}")
        on_start()
    return finish_goload(proc, duration_s + 30)
