"""W3C Trace Context (traceparent / tracestate) as seen in a captured request head."""

from __future__ import annotations

import re
from binascii import unhexlify

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = b"\0" * 16
_ZERO_SPAN = b"\0" * 8
_MAX_TRACESTATE = 512  # W3C: 32 list members; vendors keep it short. Longer is dropped, not cut.


def parse_traceparent(value: bytes) -> tuple[bytes, bytes] | None:
    """(trace_id, parent_span_id) from a traceparent value, or None if it is not valid.

    Version 00 must be exactly 55 characters; a later version (not ff) is read by its first 55
    characters as the W3C spec asks. Upper-case hex and all-zero ids are invalid."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    ver = m.group(1)
    if ver == b"00":
        if len(value) != 55:
            return None
    elif ver == b"ff" or (len(value) > 55 and value[55:56] != b"-"):
        return None
    trace = unhexlify(m.group(2))
    parent = unhexlify(m.group(3))
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace, parent


def traceparent_sampled(value: bytes) -> bool:
    """The sampled bit of a (valid) traceparent's trace-flags."""
    try:
        return bool(int(value[53:55], 16) & 1)
    except ValueError:
        return False


def clean_tracestate(value: bytes | None) -> str:
    """The tracestate to carry on the span, or "" when absent or not plain printable ASCII."""
    if not value or len(value) > _MAX_TRACESTATE:
        return ""
    try:
        s = value.decode("ascii")
    except UnicodeDecodeError:
        return ""
    return s if s.isprintable() else ""
