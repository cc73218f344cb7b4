"""Hypothesis helpers for the protocol decoders' tests: real traffic re-cut at other transfer
boundaries, or with bytes flipped, the way the kernel's bounded copies may hand it over."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from hypothesis import strategies as st

from correlator.segments import SEGMENT_DATA, Operation, Segment

M32 = 0xFFFFFFFF
C2S_ISN, S2C_ISN = 0x9E3779B9, 0x12345678  # initial sequence numbers of the two directions


def with_pos(segs: list[Segment], client_view: bool, isn: tuple[int, int] = (C2S_ISN, S2C_ISN)) -> list[Segment]:
    """The segments with the positions TCP would give them: the direction's initial sequence number
    (isn: client to server, server to client) plus the bytes that direction carried before, copied
    or not. Keyed by direction, not by egress, so both ends' views of one connection name a byte
    alike."""
    sent = {True: 0, False: 0}  # by direction: True = client to server
    out: list[Segment] = []
    for s in segs:
        c2s = s.egress == client_view
        out.append(replace(s, pos=((isn[0] if c2s else isn[1]) + sent[c2s]) & M32))
        sent[c2s] += s.length
    return out


def true_positions(ops: list[Operation], truth: Collection[int | None]) -> list[int]:
    """The request positions the operations were given, each asserted to be one of truth and none
    shared: a decoder may lose a position where bytes were not copied, never invent one."""
    got = [o.req_pos for o in ops if o.req_pos is not None]
    assert set(got) <= set(truth) and len(set(got)) == len(got), (got, truth)
    return got


def merge_runs(segs: list[Segment]) -> list[Segment]:
    """Consecutive segments in one direction as one run (the bytes of a flight, uncut)."""
    runs: list[Segment] = []
    for s in segs:
        if runs and runs[-1].egress == s.egress:
            runs[-1] = replace(runs[-1], data=runs[-1].data + s.data, length=runs[-1].length + s.length)
        else:
            runs.append(s)
    return runs


def cut_whole(runs: list[Segment], sizes: list[int]) -> list[Segment]:
    """Each run written in transfers of the given sizes in turn, none beyond the copy."""
    segs: list[Segment] = []
    for run in runs:
        i = k = 0
        while i < len(run.data):
            chunk = run.data[i : i + sizes[k % len(sizes)]]
            segs.append(replace(run, data=chunk, length=len(chunk)))
            i += len(chunk)
            k += 1
    return segs


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
