"""Kernel monotonic time to wall time.

bpf_ktime_get_ns() is CLOCK_MONOTONIC, which does not count suspend and has an arbitrary origin;
spans need Unix-epoch nanoseconds. The offset is measured once at start (WallClock.now(), called
by the tracer) and recorded with a recording, so a replay maps times exactly as the live run did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class WallClock:
    offset_ns: int  # wall - monotonic, measured once

    def to_wall(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    @staticmethod
    def now() -> WallClock:
        # Read the two clocks back to back, twice, and keep the pair read closest together, so a
        # preemption between the two reads does not skew every span by a scheduler slice.
        best: tuple[int, int] | None = None
        for _ in range(3):
            m0 = time.monotonic_ns()
            w = time.time_ns()
            m1 = time.monotonic_ns()
            gap = m1 - m0
            if best is None or gap < best[0]:
                best = (gap, w - (m0 + gap // 2))
        assert best is not None
        return WallClock(best[1])
