"""Head sampling: the standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG settings, as the
kernel applies them, and the same decision in Python for records the kernel did not decide.

The kernel decides at a trace's root and every descendant on the host inherits the decision
(bpf/http_exchange.h reads kspan_sampler and kspan_sample_threshold). The ratio rule is the
OpenTelemetry Go SDK's TraceIDRatioBased: a trace is kept iff the big-endian u64 of trace id
bytes 8..15, shifted right by one, is below int(ratio * 2**63), so kspan and an SDK given the same
ratio keep the same traces. Pure: parsing returns notes for the caller to log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

ALWAYS_ON = 0
ALWAYS_OFF = 1
TRACEIDRATIO = 2
PARENTBASED_ALWAYS_ON = 3
PARENTBASED_ALWAYS_OFF = 4
PARENTBASED_TRACEIDRATIO = 5

SAMPLERS: dict[str, int] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "traceidratio": TRACEIDRATIO,
    "parentbased_always_on": PARENTBASED_ALWAYS_ON,
    "parentbased_always_off": PARENTBASED_ALWAYS_OFF,
    "parentbased_traceidratio": PARENTBASED_TRACEIDRATIO,
}
NAMES = {v: k for k, v in SAMPLERS.items()}
ALWAYS = 1 << 63  # the threshold that keeps every trace id
_RATIO_SAMPLERS = (TRACEIDRATIO, PARENTBASED_TRACEIDRATIO)
_PARENT_BASED = (PARENTBASED_ALWAYS_ON, PARENTBASED_ALWAYS_OFF, PARENTBASED_TRACEIDRATIO)


class SamplingError(ValueError):
    """A sampler argument that cannot be a ratio: refused with what to give instead."""


@dataclass(frozen=True)
class SamplerConfig:
    code: int = ALWAYS_ON
    threshold: int = ALWAYS  # kept iff (trace id bits 64..127 >> 1) < threshold; ratio samplers only
    ratio: float = 1.0

    @property
    def name(self) -> str:
        return NAMES[self.code]

    def describe(self) -> str:
        return f"{self.name} {self.ratio:g}" if self.code in _RATIO_SAMPLERS else self.name


def threshold_for(ratio: float) -> int:
    """The Go SDK's traceIDUpperBound: ratio >= 1 keeps every trace, <= 0 none."""
    if ratio >= 1.0:
        return ALWAYS
    if ratio <= 0.0:
        return 0
    return int(ratio * (1 << 63))


def parse_ratio(text: str) -> float:
    try:
        ratio = float(text.strip())
    except ValueError:
        raise SamplingError(f"sampler argument {text!r} is not a number: give a ratio from 0 to 1, "
                            "e.g. 0.25") from None
    if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise SamplingError(f"sampler argument {text!r} is outside 0-1: give a ratio from 0 to 1, e.g. 0.25")
    return ratio


def parse_sampler(name: str | None, arg: str | None) -> tuple[SamplerConfig, list[str]]:
    """A sampler from its standard name and argument (None: not set). An unknown name falls back
    to always_on with a note; a ratio that is not a number in 0-1 raises SamplingError."""
    notes: list[str] = []
    key = (name or "").strip().lower()
    if not key:
        code = ALWAYS_ON
    elif key in SAMPLERS:
        code = SAMPLERS[key]
    else:
        notes.append(f"sampler {name!r} is not supported (choose one of {', '.join(SAMPLERS)}); "
                     "sampling every trace (always_on)")
        code = ALWAYS_ON
    if code not in _RATIO_SAMPLERS:
        if arg is not None and arg.strip() and key in SAMPLERS:
            notes.append(f"sampler argument {arg!r} is ignored: {key} takes no ratio")
        return SamplerConfig(code), notes
    # The specification's default ratio when the argument is absent: 1.0.
    ratio = 1.0 if arg is None or not arg.strip() else parse_ratio(arg)
    return SamplerConfig(code, threshold_for(ratio), ratio), notes


def sampler_from(env: Mapping[str, str], flag_name: str | None = None,
                 flag_arg: str | None = None) -> tuple[SamplerConfig, list[str]]:
    """Flags (--sampler, --sampler-arg) override OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG."""
    name = flag_name if flag_name is not None else env.get("OTEL_TRACES_SAMPLER")
    arg = flag_arg if flag_arg is not None else env.get("OTEL_TRACES_SAMPLER_ARG")
    return parse_sampler(name, arg)


def ratio_keeps(trace_id: bytes, threshold: int) -> bool:
    return (int.from_bytes(trace_id[8:16], "big") >> 1) < threshold


def keeps_root(cfg: SamplerConfig, trace_id: bytes) -> bool:
    """The decision for a trace rooted on this host (no parent, or no remote sampled flag known)."""
    code = cfg.code
    if code in (ALWAYS_ON, PARENTBASED_ALWAYS_ON):
        return True
    if code in (ALWAYS_OFF, PARENTBASED_ALWAYS_OFF):
        return False
    return ratio_keeps(trace_id, cfg.threshold)


def keeps_remote(cfg: SamplerConfig, trace_id: bytes, remote_sampled: bool) -> bool:
    """The decision for a span whose parent is remote (an incoming traceparent): parentbased_*
    honour the parent's sampled flag; the others decide as for a root (the ratio on its trace id)."""
    if cfg.code in _PARENT_BASED:
        return remote_sampled
    return keeps_root(cfg, trace_id)
