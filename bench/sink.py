"""The span-counting OTLP endpoint (bench/otlpsink, Go) and its counters."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from bench.gobuild import build
from bench.processes import Managed


class Sink:
    def __init__(self, log_path: str | None = None) -> None:
        self.proc = Managed("otlpsink", [build("otlpsink"), "-addr", "127.0.0.1:0"], log_path=log_path)
        got = self.proc.wait_line(r"listening on (127\.0\.0\.1:\d+)", 10)
        if got is None:
            self.proc.stop()
            raise RuntimeError("otlpsink did not start: " + self.proc.output())
        self.addr = got[1].group(1)
        self.endpoint = f"http://{self.addr}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/stats", timeout=5) as r:
            return json.loads(r.read())

    def phase(self, name: str) -> dict[str, Any]:
        return self.stats().get("phases", {}).get(name) or {
            "server": 0, "client": 0, "unique_server": 0, "duplicate_server": 0, "first_span_unix_ns": 0,
        }

    def wait_phase(self, name: str, expected: int, quiet_s: float = 6.0, max_s: float = 60.0,
                   clients: int = 0) -> dict[str, Any]:
        """Wait until the phase has `expected` server spans and `clients` client spans, or its
        counts have not moved for `quiet_s` (longer than an export batch interval), or `max_s`
        passed; return its counters."""
        start = time.monotonic()
        last, last_change = -1, start
        while True:
            ph = self.phase(name)
            now = time.monotonic()
            seen = ph["server"] + ph["client"]
            if seen != last:
                last, last_change = seen, now
            done = ph["server"] >= expected and ph["client"] >= clients
            if done or now - last_change >= quiet_s or now - start >= max_s:
                return ph
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.stop()
