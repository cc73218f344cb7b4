"""Fixed-rate load with bench/goload, which prints one JSON result when done."""

from __future__ import annotations

import json
from typing import Any

from bench.gobuild import build
from bench.processes import Managed


def start_goload(addr: str, phase: str, rate: float, duration_s: float, conns: int = 32,
                 close_each: bool = False, log_path: str | None = None) -> Managed:
    cmd = [build("goload"), "-addr", addr, "-prefix", f"/b/{phase}", "-rate", str(rate),
           "-duration", f"{duration_s}s", "-conns", str(conns)]
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
               log_path: str | None = None) -> dict[str, Any]:
    proc = start_goload(addr, phase, rate, duration_s, conns, log_path=log_path)
    return finish_goload(proc, duration_s + 30)
