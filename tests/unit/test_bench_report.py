"""The benchmark's arithmetic: ratios, per-request cost, step outcomes, capacity, targets, and the
parsers of wrk and /proc output it relies on."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.agent import parse_summary
from bench.procstat import parse_stat_ticks, parse_status_kb
from bench.wrk import parse_wrk

WRK_OUT = """Running 5s test @ http://127.0.0.1:41234/b/ovh-go-1/0
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   486.09us    1.52ms  34.41ms   97.81%
    Req/Sec    43.51k     3.20k   47.77k    80.00%
  Latency Distribution
     50%  301.00us
     75%  398.00us
     90%  537.00us
     99%    7.25ms
  216389 requests in 5.00s, 24.35MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  43277.80
Transfer/sec:      4.87MB
"""


def test_parse_wrk_converts_units_and_counts() -> None:
    w = parse_wrk(WRK_OUT)
    assert w.requests == 216389
    assert w.duration_s == pytest.approx(5.0)
    assert w.rps == pytest.approx(43277.80)
    assert w.p50_ms == pytest.approx(0.301)
    assert w.p99_ms == pytest.approx(7.25)
    assert w.non_2xx == 3
    assert w.socket_errors == 0


def test_parse_wrk_seconds_and_socket_errors() -> None:
    out = WRK_OUT.replace("7.25ms", "1.20s").replace(
        "  Non-2xx or 3xx responses: 3\n", "  Socket errors: connect 1, read 2, write 0, timeout 4\n")
    w = parse_wrk(out)
    assert w.p99_ms == pytest.approx(1200.0)
    assert w.socket_errors == 7
    assert w.non_2xx == 0


def test_parse_wrk_rejects_a_report_without_latency() -> None:
    with pytest.raises(ValueError):
        parse_wrk("Running 5s test\nRequests/sec: 10\n")


def test_parse_stat_counts_user_and_system_ticks_past_a_tricky_comm() -> None:
    # comm may contain spaces and ')' : fields are counted from the last ')'.
    fields = ["S", "1", "2", "3", "0", "-1", "4194304", "100", "0", "0", "0", "1234", "567", "0", "0"]
    stat = "4321 (py (x) y) " + " ".join(fields) + " 20 0 3 0 12345"
    assert parse_stat_ticks(stat) == 1234 + 567


def test_parse_status_kb() -> None:
    status = "Name:\tkspan\nVmHWM:\t  120400 kB\nVmRSS:\t   98304 kB\n"
    assert parse_status_kb(status, "VmRSS") == 98304
    assert parse_status_kb(status, "VmHWM") == 120400
    assert parse_status_kb(status, "VmSwap") is None


def test_parse_summary_takes_the_last_stopped_line() -> None:
    err = ("kspan: ready (40 probes, tracepoints backend)\n"
           "kspan: stopped; ringbuf_lost=3, exchanges=100\n"
           "kspan: stopped; ringbuf_lost=12, exchanges=20000, dropped_queue_full=5\n")
    assert parse_summary(err) == {"ringbuf_lost": 12, "exchanges": 20000, "dropped_queue_full": 5}
    assert parse_summary("kspan: ready\n") == {}


def test_ratio_and_mean_skip_missing_values() -> None:
    assert report.ratio(45.0, 50.0) == pytest.approx(0.9)
    assert report.ratio(1.0, 0) is None
    assert report.ratio(None, 3.0) is None
    assert report.mean([1.0, None, 3.0]) == pytest.approx(2.0)
    assert report.mean([None]) is None


def test_summarize_overhead_averages_alternated_runs() -> None:
    runs = [
        {"mode": "untraced", "round": 1, "rps": 50_000.0, "p50_ms": 0.30, "p99_ms": 5.0, "requests": 250_000},
        {"mode": "traced", "round": 1, "rps": 44_000.0, "p50_ms": 0.36, "p99_ms": 6.0, "requests": 220_000,
         "spans": 219_000},
        {"mode": "untraced", "round": 2, "rps": 48_000.0, "p50_ms": 0.32, "p99_ms": 7.0, "requests": 240_000},
        {"mode": "traced", "round": 2, "rps": 42_000.0, "p50_ms": 0.40, "p99_ms": 8.0, "requests": 210_000,
         "spans": 211_000, "kernel": {"ringbuf_lost": 40, "requests_seen": 210_000}},
        {"mode": "traced", "round": 3, "error": "kspan did not start"},
    ]
    s = report.summarize_overhead(runs)
    assert s["untraced"]["rps"] == pytest.approx(49_000.0)
    assert s["traced"]["rps"] == pytest.approx(43_000.0)
    assert s["traced"]["runs"] == 2
    assert s["ratio"]["throughput"] == pytest.approx(43_000 / 49_000)
    assert s["ratio"]["p50"] == pytest.approx(0.38 / 0.31)
    assert s["ratio"]["p99"] == pytest.approx(7.0 / 6.0)
    assert s["span_coverage"] == pytest.approx(430_000 / 430_000)
    assert s["ringbuf_lost"] == 40


def test_cpu_us_per_request() -> None:
    assert report.cpu_us_per_request(1.5, 100_000) == pytest.approx(15.0)
    assert report.cpu_us_per_request(1.5, 0) is None
    assert report.cpu_us_per_request(None, 10) is None


def _load(rate: int, ok: int, late: int = 0, errors: int = 0, non2xx: int = 0) -> dict:
    return {"rate": rate, "achieved_rps": ok / 5, "sent": ok + errors + non2xx, "ok": ok, "non_2xx": non2xx,
            "errors": errors, "late": late, "p50_ms": 1.0, "p99_ms": 3.0}


def _phase(unique: int, dup: int = 0) -> dict:
    return {"server": unique + dup, "unique_server": unique, "duplicate_server": dup}


def test_step_outcome_exact_lossy_and_duplicated() -> None:
    exact = report.step_outcome(_load(10_000, 50_000), _phase(50_000))
    assert exact["exact"] and exact["sustained"] and exact["lost"] == 0 and exact["loss_rate"] == 0
    lossy = report.step_outcome(_load(20_000, 100_000), _phase(99_000))
    assert not lossy["exact"] and lossy["lost"] == 1_000 and lossy["loss_rate"] == pytest.approx(0.01)
    # A duplicate never hides a loss: both are counted against exactness.
    dup = report.step_outcome(_load(10_000, 50_000), _phase(50_000, dup=2))
    assert not dup["exact"] and dup["duplicate_spans"] == 2
    late = report.step_outcome(_load(40_000, 150_000, late=50_000), _phase(150_000))
    assert late["exact"] and not late["sustained"]
    # Non-2xx answers are still requests that must become spans.
    assert report.step_outcome(_load(1_000, 4_990, non2xx=10), _phase(5_000))["exact"]


def test_capacity_is_the_highest_sustained_exact_rate() -> None:
    steps = [
        report.step_outcome(_load(10_000, 50_000), _phase(50_000)),
        report.step_outcome(_load(15_000, 75_000), _phase(75_000)),
        report.step_outcome(_load(20_000, 100_000), _phase(97_000)),
    ]
    c = report.capacity(steps)
    assert c["capacity_rps"] == 15_000
    assert c["above"]["rate"] == 20_000
    assert c["above"]["limit"] == "spans lost"
    assert c["above"]["loss_rate"] == pytest.approx(0.03)
    assert c["above"]["kernel"] is None
    steps[2]["kernel"] = {"ringbuf_lost": 2_900, "requests_seen": 200_000}
    assert report.capacity(steps)["above"]["kernel"]["ringbuf_lost"] == 2_900


def test_capacity_limited_by_the_load_and_none_when_all_lossy() -> None:
    steps = [report.step_outcome(_load(10_000, 50_000), _phase(50_000)),
             report.step_outcome(_load(15_000, 60_000, late=15_000), _phase(60_000))]
    c = report.capacity(steps)
    assert c["capacity_rps"] == 10_000 and c["above"]["limit"] == "load not sustained"
    none = report.capacity([report.step_outcome(_load(10_000, 50_000), _phase(40_000)),
                            report.step_outcome(_load(1_000, 5_000), _phase(4_999))])
    assert none["capacity_rps"] is None and none["above"]["rate"] == 1_000


def _results(ratio_go: float, us: float, lost: int, hwm: float, ready: list[float], steady: float = 80.0,
             bpf_us: float = 1.0, compiler: bool = False, unsampled_us: float = 1.5) -> dict:
    ov_runs = [{"mode": "untraced", "round": 1, "rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "requests": 500},
               {"mode": "traced", "round": 1, "rps": 100.0 * ratio_go, "p50_ms": 1.0, "p99_ms": 2.0,
                "requests": 500, "spans": 500}]
    step = {**report.step_outcome(_load(20_000, 200_000), _phase(200_000 - lost)), "duration_s": 10.0,
            "target_step": True}
    return {
        "overhead": {"go": {"runs": ov_runs, "summary": report.summarize_overhead(ov_runs)}},
        "cost": [{"rate": 10_000, "cpu_us_per_request": us, "requests": 100_000, "server_spans": 100_000,
                  "bpf_us_per_request": bpf_us}],
        "capacity": {"steps": [step], "result": report.capacity([step])},
        "memory": {"peak_hwm_mb": hwm, "steady_rss_mb": steady},
        "startup": {"ready_s": ready, "first_span_s": 1.0, "compiler_mapped": [compiler] * len(ready)},
        "hotpath": {"ratio10": {"us_per_unsampled": unsampled_us}},
    }


def test_targets_pass_and_miss_on_the_limits() -> None:
    ok = {t["target"]: t for t in report.evaluate_targets(_results(0.95, 9.0, 0, 120.0, [1.0, 1.5, 2.5]))}
    assert all(t["status"] == report.PASS for t in ok.values()), ok
    assert any("target 60 s: --full" in name for name in ok)
    assert any("20,000 req/s" in name for name in ok)
    bad = {t["target"]: t for t in report.evaluate_targets(
        _results(0.85, 11.0, 7, 160.0, [1.0, 2.5, 3.5], steady=120.0, bpf_us=2.0, compiler=True,
                 unsampled_us=2.5))}
    assert all(t["status"] == report.MISS for t in bad.values()), bad
    assert bad["traced/untraced throughput, go"]["measured"] == "0.850"
    assert bad["launch to `kspan: ready` (median of the launches)"]["measured"] == "2.50 s (max 3.50 s)"
    assert bad["libLLVM or libclang mapped into the agent"]["measured"] == "mapped"


def test_cost_without_spans_is_not_a_pass() -> None:
    r = _results(0.95, 2.0, 0, 120.0, [1.0])
    r["cost"][0]["server_spans"] = 50_000
    row = next(t for t in report.evaluate_targets(r) if t["target"].startswith("agent CPU"))
    assert row["status"] == report.MISS
    assert "50.0% of requests became spans" in row["measured"]


def test_both_ends_cost_is_per_exchange_and_needs_both_ends_spans() -> None:
    r = _results(0.95, 12.0, 0, 120.0, [1.0], bpf_us=2.4)
    # Both ends traced: 100,000 requests are 200,000 exchanges, so 12 us a request is 6 an exchange.
    r["cost"][0].update({"ends": 2, "exchanges": 200_000, "client_spans": 100_000,
                         "cpu_us_per_exchange": 6.0, "bpf_us_per_exchange": 1.2})
    rows = {t["target"]: t for t in report.evaluate_targets(r)}
    cpu = rows["agent CPU per traced exchange at 10,000 req/s (both ends traced)"]
    assert (cpu["status"], cpu["measured"]) == (report.PASS, "6.0 us")
    probe = rows["probe time inside the traced processes per exchange (worst rate)"]
    assert (probe["status"], probe["measured"]) == (report.PASS, "1.20 us")
    text = report.render(r)
    assert "both ends traced" in text and "100,000 + 100,000" in text
    # The client end's spans count too: half of them missing is not a pass.
    r["cost"][0]["client_spans"] = 50_000
    cpu = next(t for t in report.evaluate_targets(r) if t["target"].startswith("agent CPU"))
    assert cpu["status"] == report.MISS and "50.0% of requests became spans" in cpu["measured"]


def test_throughput_without_spans_is_not_a_pass() -> None:
    r = _results(0.95, 2.0, 0, 120.0, [1.0])
    r["overhead"]["go"]["summary"]["span_coverage"] = 0.98
    row = next(t for t in report.evaluate_targets(r) if t["target"] == "traced/untraced throughput, go")
    assert row["status"] == report.MISS and row["measured"] == "0.950, and only 98.0% of requests became spans"


def test_targets_not_measured_without_the_agent() -> None:
    rows = report.evaluate_targets({"overhead": {}, "startup": {"ready_s": []}, "memory": {}})
    assert {t["status"] for t in rows} == {report.NOT_MEASURED}


def test_render_and_json_round_trip(tmp_path) -> None:
    r = _results(0.95, 20.0, 0, 120.0, [1.0])
    r["targets"] = report.evaluate_targets(r)
    text = report.render(r)
    assert "PASS" in text and "Targets" in text
    md = report.render(r, markdown=True)
    assert "| server | mode |" in md
    report.write_json(r, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["targets"] == r["targets"]


def test_hotpath_runs_the_agent_path_on_the_bundled_recordings() -> None:
    from bench import hotpath

    sampled = hotpath.load(hotpath.RECORDINGS["sampled"])
    r = hotpath.measure(sampled, passes=1, warm=0)
    # Every record of the 100% recording is a full exchange and becomes one exported span.
    assert r["exchanges"] == 4000 and r["metric_records"] == 0 and r["spans_exported"] == 4000
    assert all(v > 0 for k, v in r["us_per_exchange"].items())
    ratio = hotpath.load(hotpath.RECORDINGS["ratio10"])
    r10 = hotpath.measure(ratio, passes=1, warm=0)
    assert r10["metric_records"] > 3000 and 0 < r10["spans_exported"] <= r10["exchanges"]
    assert r10["us_per_unsampled"] > 0
    results = {"hotpath": {"sampled": r, "ratio10": r10}}
    text = report.render({**results, "targets": report.evaluate_targets(results)})
    assert "Per-record user-space path" in text and "agent CPU per unsampled exchange" in text


def test_the_protocols_phase_is_reported_per_operation() -> None:
    rows = [{"protocol": "redis", "ops": 40_000, "untraced_ops_s": 66_633.0, "traced_ops_s": 31_801.0, "ratio": 0.477,
             "cpu_s": 4.42, "cpu_us_per_op": 110.5, "protocol_spans": 68_209, "segments": 90_000},
            {"protocol": "grpc", "ops": 4_001, "untraced_ops_s": 2_332.0, "traced_ops_s": 2_169.0, "ratio": 0.93,
             "cpu_s": 0.94, "cpu_us_per_op": 234.9, "protocol_spans": 7_981, "segments": 30_000}]
    text = report.render({"protocols": rows})
    assert "Protocols beyond HTTP/1" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("redis"))
    assert "110.5" in line and "0.477" in line and "68,209" in line
    assert "| grpc |" in report.render({"protocols": rows}, markdown=True).replace("  ", " ")
