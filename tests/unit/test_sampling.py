"""correlator/sampling.py: the standard sampler settings and the ratio rule the kernel applies."""

from __future__ import annotations

import pytest

from correlator import sampling
from correlator.sampling import SamplerConfig, SamplingError, keeps_remote, keeps_root, parse_sampler, sampler_from


def _trace(low: int) -> bytes:
    """A trace id whose bytes 8..15 are the big-endian u64 `low` (what the ratio rule reads)."""
    return b"\xab" * 8 + low.to_bytes(8, "big")


@pytest.mark.parametrize(("name", "code"), [
    ("always_on", sampling.ALWAYS_ON), ("always_off", sampling.ALWAYS_OFF),
    ("traceidratio", sampling.TRACEIDRATIO), ("parentbased_always_on", sampling.PARENTBASED_ALWAYS_ON),
    ("parentbased_always_off", sampling.PARENTBASED_ALWAYS_OFF),
    ("parentbased_traceidratio", sampling.PARENTBASED_TRACEIDRATIO), ("  TraceIdRatio ", sampling.TRACEIDRATIO),
])
def test_standard_names(name: str, code: int) -> None:
    cfg, notes = parse_sampler(name, None)
    assert cfg.code == code and notes == []


def test_unset_is_always_on() -> None:
    assert parse_sampler(None, None) == (SamplerConfig(), [])
    assert parse_sampler("", "") == (SamplerConfig(), [])
    assert sampler_from({}) == (SamplerConfig(), [])


def test_unknown_sampler_falls_back_to_always_on_with_a_note() -> None:
    cfg, notes = parse_sampler("jaeger_remote", "0.5")
    assert cfg == SamplerConfig()
    assert len(notes) == 1 and "'jaeger_remote' is not supported" in notes[0] and "always_on" in notes[0]


def test_ratio_argument() -> None:
    cfg, _ = parse_sampler("traceidratio", "0.25")
    assert cfg.ratio == 0.25 and cfg.threshold == 1 << 61
    assert cfg.describe() == "traceidratio 0.25"
    # The specification's default when the argument is absent: every trace.
    assert parse_sampler("parentbased_traceidratio", None)[0].threshold == sampling.ALWAYS
    assert parse_sampler("traceidratio", "1")[0].threshold == sampling.ALWAYS
    assert parse_sampler("traceidratio", "0")[0].threshold == 0


@pytest.mark.parametrize("arg", ["abc", "1.5", "-0.1", "nan", "0,5"])
def test_bad_ratio_is_an_error(arg: str) -> None:
    with pytest.raises(SamplingError, match="ratio from 0 to 1"):
        parse_sampler("traceidratio", arg)


def test_argument_of_a_sampler_without_ratio_is_ignored_with_a_note() -> None:
    cfg, notes = parse_sampler("always_off", "0.5")
    assert cfg.code == sampling.ALWAYS_OFF and "ignored" in notes[0]


def test_flags_override_the_environment() -> None:
    env = {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    assert sampler_from(env)[0].code == sampling.ALWAYS_OFF
    cfg, _ = sampler_from(env, "traceidratio")
    assert cfg.code == sampling.TRACEIDRATIO and cfg.ratio == 0.5  # the env argument still applies
    cfg, _ = sampler_from(env, "traceidratio", "0.1")
    assert cfg.ratio == 0.1
    with pytest.raises(SamplingError):
        sampler_from({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"})


def test_ratio_rule_boundaries() -> None:
    """The Go SDK's rule: kept iff (low u64 >> 1) < int(ratio * 2**63)."""
    t = parse_sampler("traceidratio", "0.5")[0].threshold
    assert t == 1 << 62
    # (x >> 1) < 2**62  <=>  x < 2**63
    assert sampling.ratio_keeps(_trace((1 << 63) - 1), t)
    assert not sampling.ratio_keeps(_trace(1 << 63), t)
    assert sampling.ratio_keeps(_trace(0), t)
    # The lowest bit never matters (it is shifted out).
    assert sampling.ratio_keeps(_trace((1 << 63) - 2), t) == sampling.ratio_keeps(_trace((1 << 63) - 1), t)
    # Only bytes 8..15 count.
    assert sampling.ratio_keeps(b"\xff" * 8 + (0).to_bytes(8, "big"), t)
    # Ratio 0 keeps nothing, ratio 1 everything, even the largest id.
    assert not sampling.ratio_keeps(_trace(0), 0)
    assert sampling.ratio_keeps(_trace((1 << 64) - 1), sampling.ALWAYS)
    # The smallest positive ratio still keeps the smallest ids.
    tiny = sampling.threshold_for(1e-18)
    assert tiny == 9 and sampling.ratio_keeps(_trace(17), tiny) and not sampling.ratio_keeps(_trace(18), tiny)


def test_ratio_keeps_its_share_of_uniform_ids() -> None:
    t = sampling.threshold_for(0.25)
    n = 1 << 12
    kept = sum(sampling.ratio_keeps(_trace(i << 52), t) for i in range(n))  # evenly spread over 2**64
    assert kept == n // 4


def test_root_and_remote_decisions() -> None:
    on, off = parse_sampler("always_on", None)[0], parse_sampler("always_off", None)[0]
    ratio0 = parse_sampler("traceidratio", "0")[0]
    pb_off = parse_sampler("parentbased_always_off", None)[0]
    pb_on = parse_sampler("parentbased_always_on", None)[0]
    pb_ratio0 = parse_sampler("parentbased_traceidratio", "0")[0]
    tid = _trace(12345)
    assert keeps_root(on, tid) and not keeps_root(off, tid) and not keeps_root(ratio0, tid)
    assert keeps_root(pb_on, tid) and not keeps_root(pb_off, tid) and not keeps_root(pb_ratio0, tid)
    # parentbased_*: an incoming traceparent's sampled flag decides.
    for cfg in (pb_off, pb_on, pb_ratio0):
        assert keeps_remote(cfg, tid, True) and not keeps_remote(cfg, tid, False)
    # Plain samplers ignore the flag: the ratio applies to the (remote) trace id.
    assert not keeps_remote(ratio0, tid, True)
    assert keeps_remote(on, tid, False)
