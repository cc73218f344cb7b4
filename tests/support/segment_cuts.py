"""Hypothesis helpers for the protocol decoders' tests: real traffic re-cut at other transfer
boundaries, or with bytes flipped, the way the kernel's bounded copies may hand it over."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from correlator.segments import SEGMENT_DATA, Segment


def merge_runs(segs: list[Segment]) -> list[Segment]:
    """Consecutive segments in one direction as one run (the bytes of a flight, uncut)."""
    runs: list[Segment] = []
    for s in segs:
        if runs and runs[-1].egress == s.egress:
            runs[-1] = replace(runs[-1], data=runs[-1].data + s.data, length=runs[-1].length + s.length)
        else:
            runs.append(s)
    return runs


def recut(runs: list[Segment], data: st.DataObject) -> list[Segment]:
    """Each run written in transfers of drawn sizes, each copied up to SEGMENT_DATA bytes."""
    segs: list[Segment] = []
    for run in runs:
        cuts = data.draw(st.sets(st.integers(1, max(1, len(run.data) - 1)), max_size=6))
        bounds = [0, *sorted(c for c in cuts if c < len(run.data)), len(run.data)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            chunk = run.data[a:b]
            segs.append(replace(run, data=chunk[:SEGMENT_DATA], length=len(chunk)))
    return segs


def mutate(segs: list[Segment], data: st.DataObject, keep: frozenset[int]) -> list[Segment]:
    """Up to five segments with a byte flipped (never to or from a byte in `keep`) and their copy
    cut short; lengths stay the true ones."""
    segs = list(segs)
    for _ in range(data.draw(st.integers(1, 5))):
        i = data.draw(st.integers(0, len(segs) - 1))
        s = segs[i]
        if not s.data:
            continue
        j = data.draw(st.integers(0, len(s.data) - 1))
        b = bytearray(s.data)
        if b[j] not in keep:
            b[j] = data.draw(st.integers(0, 255).filter(lambda v: v not in keep))
        segs[i] = replace(s, data=bytes(b[: data.draw(st.integers(0, len(b)))]), length=s.length)
    return segs
