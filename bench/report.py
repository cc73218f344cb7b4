"""The benchmark's arithmetic and presentation: ratios, per-request cost, capacity, targets, and
the table, JSON, Markdown and PNG chart. Pure except for the writers at the bottom."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

# The targets of the data-plane issues (CO-RE loader; kernel-side context), for this 2-core machine
# with agent, server and load generator sharing it.
TARGET_THROUGHPUT_RATIO = 0.90
TARGET_CPU_US_PER_REQUEST = 10.0  # per exchange (the cost phase traces both ends: two a request)
TARGET_BPF_US_PER_REQUEST = 1.5   # probe time inside the traced processes, per exchange
TARGET_LOSSLESS_RPS = 20_000
TARGET_LOSSLESS_S = 60.0
TARGET_RSS_MB = 150.0             # peak
TARGET_STEADY_RSS_MB = 100.0
TARGET_READY_S = 2.0              # median of the launches
TARGET_UNSAMPLED_US = 2.0         # agent CPU per unsampled exchange at 10% sampling (bench/hotpath.py)
# The cost per request is only a measurement of tracing if (nearly) every request became a span.
SPAN_COVERAGE_FOR_COST = 0.99

PASS, MISS, NOT_MEASURED = "PASS", "MISS", "N/A"


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def summarize_overhead(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean throughput and latency per mode over the alternated runs, and traced/untraced ratios.
    Latency ratios above 1 mean tracing made requests slower."""
    out: dict[str, Any] = {}
    for mode in ("untraced", "traced"):
        rs = [r for r in runs if r["mode"] == mode and r.get("rps") is not None]
        out[mode] = {k: mean(r.get(k) for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        out[mode]["runs"] = len(rs)
    out["ratio"] = {
        "throughput": ratio(out["traced"]["rps"], out["untraced"]["rps"]),
        "p50": ratio(out["traced"]["p50_ms"], out["untraced"]["p50_ms"]),
        "p99": ratio(out["traced"]["p99_ms"], out["untraced"]["p99_ms"]),
    }
    traced = [r for r in runs if r["mode"] == "traced" and r.get("requests")]
    out["span_coverage"] = ratio(sum(r.get("spans", 0) for r in traced), sum(r["requests"] for r in traced))
    kernel = [r["kernel"] for r in traced if r.get("kernel") is not None]
    out["ringbuf_lost"] = sum(k.get("ringbuf_lost", 0) for k in kernel) if kernel else None
    return out


def cpu_us_per_request(cpu_s: float | None, requests: int | None) -> float | None:
    """Agent CPU time (user + system) over a window divided by the requests traced in it."""
    if cpu_s is None or not requests:
        return None
    return cpu_s * 1e6 / requests


def per_exchange(cost: dict[str, Any], what: str) -> float | None:
    """A cost window's `what` ("cpu" or "bpf") in us per traced exchange. Results from before the
    cost phase traced both ends have only the per-request figure, which was per exchange then."""
    v = cost.get(f"{what}_us_per_exchange")
    return cost.get(f"{what}_us_per_request") if v is None and "ends" not in cost else v


def span_coverage(cost: dict[str, Any]) -> float | None:
    """The share of a window's traced exchanges that became spans (the worse end when both are
    traced): a cost only measures tracing if the exchanges really became spans."""
    requests = cost.get("requests")
    shares = [ratio(cost.get("server_spans"), requests)]
    if cost.get("ends") == 2:
        shares.append(ratio(cost.get("client_spans"), requests))
    known = [x for x in shares if x is not None]
    return min(known) if len(known) == len(shares) else None


def step_outcome(load: dict[str, Any], phase: dict[str, Any]) -> dict[str, Any]:
    """One fixed-rate step: was the rate sustained, and did every answered request become exactly
    one server span? `load` is goload's JSON, `phase` the sink's counters for the step."""
    answered = int(load.get("ok", 0)) + int(load.get("non_2xx", 0))
    unique = int(phase.get("unique_server", 0))
    dup = int(phase.get("duplicate_server", 0))
    lost = max(0, answered - unique)
    sustained = int(load.get("late", 0)) == 0 and int(load.get("errors", 0)) == 0
    return {
        "rate": load.get("rate"),
        "achieved_rps": load.get("achieved_rps"),
        "sent": int(load.get("sent", 0)),
        "answered": answered,
        "late": int(load.get("late", 0)),
        "errors": int(load.get("errors", 0)),
        "server_spans": int(phase.get("server", 0)),
        "unique_server_spans": unique,
        "duplicate_spans": dup,
        "lost": lost,
        "loss_rate": (lost / answered) if answered else None,
        "sustained": sustained,
        "exact": answered > 0 and unique == answered and dup == 0,
        "p50_ms": load.get("p50_ms"),
        "p99_ms": load.get("p99_ms"),
    }


def capacity(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The highest rate that was both sustained and exact (one span per request), and what
    happened at the lowest rate above it: span loss, or a load the machine could not sustain."""
    good = [s for s in steps if s["sustained"] and s["exact"]]
    best = max((s["rate"] for s in good), default=None)
    above = sorted((s for s in steps if best is None or s["rate"] > best), key=lambda s: s["rate"])
    first_bad = above[0] if above else None
    limit = None
    if first_bad is not None:
        limit = "spans lost" if not first_bad["exact"] else "load not sustained"
    return {
        "capacity_rps": best,
        "above": None if first_bad is None else {
            "rate": first_bad["rate"],
            "loss_rate": first_bad["loss_rate"],
            "lost": first_bad["lost"],
            "duplicates": first_bad["duplicate_spans"],
            "sustained": first_bad["sustained"],
            "limit": limit,
            "kernel": first_bad.get("kernel"),
        },
    }


def _status(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else (PASS if ok else MISS)


def evaluate_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and PASS / MISS (N/A when it could not be measured)."""
    rows: list[dict[str, Any]] = []
    for server, ov in (r.get("overhead") or {}).items():
        v = ov["summary"]["ratio"]["throughput"]
        measured = None if v is None else f"{v:.3f}"
        ok = None if v is None else v >= TARGET_THROUGHPUT_RATIO
        # Fast because requests went untraced is not a pass: the ratio counts with their spans.
        coverage = ov["summary"].get("span_coverage")
        if v is not None and coverage is not None and coverage < SPAN_COVERAGE_FOR_COST:
            measured = f"{measured}, and only {coverage:.1%} of requests became spans"
            ok = False
        rows.append({"target": f"traced/untraced throughput, {server}", "limit": f">= {TARGET_THROUGHPUT_RATIO:.2f}",
                     "measured": measured, "status": _status(ok)})
    for c in r.get("cost") or []:
        v = per_exchange(c, "cpu")
        measured = None if v is None else f"{v:.1f} us"
        ok = None if v is None else v <= TARGET_CPU_US_PER_REQUEST
        # A cheap agent that exports nothing is not a pass: the cost only counts when the
        # requests really became spans.
        coverage = span_coverage(c)
        if v is not None and (coverage is None or coverage < SPAN_COVERAGE_FOR_COST):
            measured = f"{measured}, but only {coverage or 0:.1%} of requests became spans"
            ok = False
        ends = "both ends" if c.get("ends") == 2 else "the server"
        rows.append({"target": f"agent CPU per traced exchange at {c['rate']:,.0f} req/s ({ends} traced)",
                     "limit": f"<= {TARGET_CPU_US_PER_REQUEST:.0f} us", "measured": measured, "status": _status(ok)})
    hp = (r.get("hotpath") or {}).get("ratio10") or {}
    v = hp.get("us_per_unsampled")
    rows.append({"target": "agent CPU per unsampled exchange at 10% sampling (bench/hotpath.py, recorded records)",
                 "limit": f"<= {TARGET_UNSAMPLED_US:.0f} us", "measured": None if v is None else f"{v:.2f} us",
                 "status": _status(None if v is None else v <= TARGET_UNSAMPLED_US)})
    bpf = [v for v in (per_exchange(c, "bpf") for c in r.get("cost") or []) if v is not None]
    worst_bpf = max(bpf) if bpf else None
    rows.append({"target": "probe time inside the traced processes per exchange (worst rate)",
                 "limit": f"<= {TARGET_BPF_US_PER_REQUEST:.1f} us",
                 "measured": None if worst_bpf is None else f"{worst_bpf:.2f} us",
                 "status": _status(None if worst_bpf is None else worst_bpf <= TARGET_BPF_US_PER_REQUEST)})
    cap = r.get("capacity") or {}
    lossless = next((s for s in cap.get("steps", []) if s.get("target_step")), None)
    if lossless is not None:
        dur = lossless.get("duration_s", 0)
        measured = f"{lossless['lost']} lost, {lossless['duplicate_spans']} dup of {lossless['answered']:,}"
        if not lossless["sustained"]:
            measured += f"; load not sustained ({lossless['late']} late, {lossless['errors']} errors)"
        name = f"no request lost at {TARGET_LOSSLESS_RPS:,} req/s for {dur:.0f} s"
        if dur < TARGET_LOSSLESS_S:
            name += f" (target {TARGET_LOSSLESS_S:.0f} s: --full)"
        rows.append({"target": name, "limit": "0 lost", "measured": measured,
                     "status": _status(lossless["exact"] and lossless["sustained"])})
    else:
        rows.append({"target": f"no request lost at {TARGET_LOSSLESS_RPS:,} req/s", "limit": "0 lost",
                     "measured": None, "status": NOT_MEASURED})
    steady = r.get("memory", {}).get("steady_rss_mb")
    rows.append({"target": "agent resident memory, steady (VmRSS under load)",
                 "limit": f"<= {TARGET_STEADY_RSS_MB:.0f} MB",
                 "measured": None if steady is None else f"{steady:.1f} MB",
                 "status": _status(None if steady is None else steady <= TARGET_STEADY_RSS_MB)})
    hwm = r.get("memory", {}).get("peak_hwm_mb")
    rows.append({"target": "agent resident memory (peak VmHWM)", "limit": f"<= {TARGET_RSS_MB:.0f} MB",
                 "measured": None if hwm is None else f"{hwm:.1f} MB",
                 "status": _status(None if hwm is None else hwm <= TARGET_RSS_MB)})
    st = r.get("startup", {})
    ready = st.get("ready_s") or []
    median = statistics.median(ready) if ready else None
    rows.append({"target": "launch to `kspan: ready` (median of the launches)", "limit": f"<= {TARGET_READY_S:.0f} s",
                 "measured": None if median is None else f"{median:.2f} s (max {max(ready):.2f} s)",
                 "status": _status(None if median is None else median <= TARGET_READY_S)})
    mapped = [m for m in st.get("compiler_mapped") or [] if m is not None]
    rows.append({"target": "libLLVM or libclang mapped into the agent", "limit": "none",
                 "measured": None if not mapped else ("mapped" if any(mapped) else f"none in {len(mapped)} launches"),
                 "status": _status(None if not mapped else not any(mapped))})
    return rows


def hotpath_lines(hp: dict[str, Any], markdown: bool) -> list[str]:
    """bench/hotpath.py's figures: CPU us per exchange record by stage, per recording."""
    rows = []
    for name, x in hp.items():
        u = x.get("us_per_exchange")
        if not u:
            continue
        rows.append([name, f"{x['exchanges']:,}", f"{x['metric_records']:,}", _f(u["dispatch"]), _f(u["metrics"]),
                     _f(u["encode"]), _f(u["total"]), _f(x.get("us_per_unsampled"))])
    title = "Per-record user-space path (bench/hotpath.py, CPU us per exchange record)"
    out = [f"\n### {title}\n" if markdown else f"\n== {title} =="]
    out += _table(["recording", "exchanges", "metric records", "dispatch", "metrics", "encode", "total",
                   "unsampled"], rows, markdown)
    out.append(("\n" if markdown else "") + "dispatch = raw record -> decode -> correlator; metrics = RED and service "
               "graph; encode = OTLP protobuf bytes (the exporter thread); unsampled = one metric record alone "
               "(decode, correlator, metrics); recorded goload -> goserver traffic, both ends traced")
    return out


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _kernel(k: dict[str, int] | None, name: str) -> str:
    return "-" if k is None else f"{k.get(name, 0):,}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]


def render(r: dict[str, Any], markdown: bool = False) -> str:
    """The whole report as aligned text (terminal) or Markdown (bench/LATEST.md)."""
    h = (lambda s: f"\n### {s}\n") if markdown else (lambda s: f"\n== {s} ==")
    out: list[str] = []
    ov = r.get("overhead") or {}
    if ov:
        out.append(h("Overhead at saturation (wrk, alternated untraced / traced)"))
        rows = []
        for server, o in ov.items():
            s = o["summary"]
            for mode in ("untraced", "traced"):
                m = s[mode]
                rows.append([server, mode, str(m["runs"]), _f(m["rps"], "{:,.0f}"), _f(m["p50_ms"], "{:.3f}"),
                             _f(m["p99_ms"], "{:.3f}"), "" if mode == "untraced" else _f(s["span_coverage"], "{:.4f}"),
                             "" if mode == "untraced" else _f(s.get("ringbuf_lost"), "{:,}")])
            rows.append([server, "ratio", "", _f(s["ratio"]["throughput"], "{:.3f}"), _f(s["ratio"]["p50"], "{:.3f}"),
                         _f(s["ratio"]["p99"], "{:.3f}"), "", ""])
        out += _table(["server", "mode", "runs", "req/s", "p50 ms", "p99 ms", "spans/req", "k:rb lost"], rows, markdown)
    if r.get("hotpath"):
        out += hotpath_lines(r["hotpath"], markdown)
    proto = r.get("protocols") or []
    if proto:
        out.append(h("Protocols beyond HTTP/1 (untraced, then traced; the agent limited to the server's port)"))
        rows = [[p["protocol"], f"{p['ops']:,}", _f(p.get("untraced_ops_s"), "{:,.0f}"),
                 _f(p.get("traced_ops_s"), "{:,.0f}"), _f(p.get("ratio"), "{:.3f}"), _f(p.get("cpu_s"), "{:.2f}"),
                 _f(p.get("cpu_us_per_op"), "{:.1f}"), f"{p.get('protocol_spans', 0):,}"] for p in proto]
        out += _table(["protocol", "ops", "untraced ops/s", "traced ops/s", "ratio", "agent CPU s", "us/op",
                       "spans"], rows, markdown)
    cost = r.get("cost") or []
    if cost:
        both = all(c.get("ends") == 2 for c in cost)
        out.append(h("Agent cost per exchange (goload at fixed rates, "
                     + ("both ends traced: two exchanges a request)" if both else "server traced)")))
        rows = [[f"{c['rate']:,.0f}", _f(c.get("achieved_rps"), "{:,.0f}"), f"{c.get('requests', 0):,}",
                 f"{c.get('server_spans', 0):,}" + (f" + {c.get('client_spans', 0):,}" if c.get("ends") == 2 else ""),
                 _f(c.get("cpu_s"), "{:.2f}"),
                 _f(per_exchange(c, "cpu"), "{:.1f}"), _f(c.get("cpu_pct"), "{:.1f}"),
                 _f(c.get("rss_mb"), "{:.1f}") + (f" ({c['rss_anon_mb']:.0f}+{c['rss_file_mb']:.0f})"
                                                  if c.get("rss_anon_mb") is not None else ""),
                 _f(c.get("hwm_mb"), "{:.1f}"),
                 _kernel(c.get("kernel"), "requests_seen"), _kernel(c.get("kernel"), "ringbuf_lost"),
                 _f(c.get("exec_cpu_s"), "{:.2f}"), _f(per_exchange(c, "bpf"), "{:.2f}")]
                for c in cost]
        out += _table(["rate", "achieved", "requests", "spans (server + client)", "agent CPU s", "us/exchange",
                       "CPU %", "RSS MB", "HWM MB", "k:seen", "k:rb lost", "exec CPU s", "BPF us/exch"],
                      rows, markdown)
        out.append(("\n" if markdown else "") + "RSS MB (anon+file): the agent's own memory and mapped library pages; "
                   "BPF us/exch: the probes' run time per traced exchange, spent inside the processes that make "
                   "syscalls, traced or not (not in the agent's CPU)")
        top = cost[-1].get("bpf_programs") or []
        if top:
            out.append(h(f"BPF programs by kernel time at {cost[-1]['rate']:,.0f} req/s"))
            out += _table(["program", "runs", "ns/run", "us/exchange"],
                          [[p["program"], f"{p['runs']:,}", f"{p['ns_per_run']:,.0f}",
                            f"{p.get('us_per_exchange', p.get('us_per_request', 0)):.2f}"]
                           for p in top], markdown)
        if r.get("first_exec_cpu_s") is not None:
            out.append(("\n" if markdown else "") + "agent CPU to inspect a new Go binary at its first exec "
                       f"(goload, before the windows): {r['first_exec_cpu_s']:.2f} s")
        if r.get("idle_cpu_pct") is not None:
            out.append(("\n" if markdown else "") + f"agent with no requests: {r['idle_cpu_pct']:.1f}% CPU; "
                       "k: = kspan's in-kernel counters over the window (requests seen, ring buffer losses); "
                       "exec CPU s = agent CPU while the new goload process started, before the window")
    cap = r.get("capacity") or {}
    if cap.get("steps"):
        out.append(h("Capacity (goload at fixed rates, both ends traced, server spans counted)"))
        rows = [[f"{s['rate']:,.0f}", f"{s.get('duration_s', 0):.0f}", _f(s["achieved_rps"], "{:,.0f}"),
                 f"{s['answered']:,}", f"{s['unique_server_spans']:,}", str(s["duplicate_spans"]), f"{s['lost']:,}",
                 _f(s["loss_rate"], "{:.4%}"), f"{s['late']}/{s['errors']}",
                 _kernel(s.get("kernel"), "requests_seen"), _kernel(s.get("kernel"), "records_emitted"),
                 _kernel(s.get("kernel"), "ringbuf_lost"),
                 "yes" if s["exact"] and s["sustained"] else "no"] for s in cap["steps"]]
        out += _table(["rate", "s", "achieved", "answered", "spans", "dup", "lost", "loss", "late/err",
                       "k:seen", "k:emitted", "k:rb lost", "exact"], rows, markdown)
        out.append(("\n" if markdown else "")
                   + "k: = kspan's in-kernel counters over the step, both ends (2 exchanges per request)")
        c = cap.get("result") or {}
        if c.get("capacity_rps") is None:
            lowest = min(st["rate"] for st in cap["steps"])
            line = f"capacity: below {lowest:,.0f} req/s (no tested rate had every request exactly one span)"
        else:
            line = f"capacity: {c['capacity_rps']:,.0f} req/s with every request exactly one span"
        above = c.get("above")
        if above:
            line += (f"; at {above['rate']:,.0f} req/s: {above['limit']}, loss {_f(above['loss_rate'], '{:.3%}')}")
            k = above.get("kernel")
            if k is not None:
                line += (f" (kspan's kernel counters: {k.get('ringbuf_lost', 0):,} records lost in the ring buffer, "
                         f"{k.get('state_table_full', 0):,} state-table-full, {k.get('requests_seen', 0):,} "
                         f"requests seen, {k.get('records_emitted', 0):,} records emitted)")
        out.append(("\n" if markdown else "") + line)
        health = (cap.get("kspan_health_metrics") or {}).get("max") or {}
        if health:
            hm = ", ".join(f"{k}={v:g}" for k, v in sorted(health.items()))
            out.append(("\n" if markdown else "") + f"kspan health metrics at the endpoint (largest seen): {hm}")
        if cap.get("kspan_counters"):
            kc = ", ".join(f"{k}={v}" for k, v in sorted(cap["kspan_counters"].items()))
            out.append(("\n" if markdown else "") + f"kspan's own counters over the capacity run: {kc}")
    st = r.get("startup") or {}
    if st.get("ready_s"):
        out.append(h("Start-up"))
        rows = [["launch -> `kspan: ready`", f"{len(st['ready_s'])} launches",
                 f"median {statistics.median(st['ready_s']):.2f} s, max {max(st['ready_s']):.2f} s"],
                ["launch -> first span at the endpoint", "1 launch", _f(st.get("first_span_s"), "{:.2f} s")]]
        out += _table(["interval", "samples", "measured"], rows, markdown)
    errors = dict(r.get("errors") or {})
    for server, o in (r.get("overhead") or {}).items():
        for run in o.get("runs", []):
            if run.get("error"):
                errors[f"overhead-{server} {run['mode']} round {run['round']}"] = run["error"]
    if errors:
        out.append(h("Errors"))
        for name, err in errors.items():
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [""]
            out.append(f"- {name}: {last[0][:300]}" if markdown else f"{name}: {last[0][:300]}")
    out.append(h("Targets"))
    rows = [[t["status"], t["target"], t["limit"], t["measured"] or "not measured"] for t in r.get("targets", [])]
    out += _table(["", "target", "limit", "measured"], rows, markdown)
    return "\n".join(out).lstrip("\n") + "\n"


def write_json(r: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(r, f, indent=2, sort_keys=False)
        f.write("\n")


def write_chart(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    m = r.get("machine", {})
    fig.suptitle(f"kspan make bench: {m.get('nproc', '?')} cores, Linux {m.get('kernel', '?')}, {m.get('date', '')}",
                 fontsize=12)
    ov = r.get("overhead") or {}
    ax = axes[0][0]
    servers = list(ov)
    if servers:
        xs = range(len(servers))
        unt = [ov[s]["summary"]["untraced"]["rps"] or 0 for s in servers]
        tr = [ov[s]["summary"]["traced"]["rps"] or 0 for s in servers]
        ax.bar([x - 0.2 for x in xs], unt, 0.4, label="untraced", color="#888")
        ax.bar([x + 0.2 for x in xs], tr, 0.4, label="traced", color="#d62728")
        for x, s in zip(xs, servers, strict=True):
            rt = ov[s]["summary"]["ratio"]["throughput"]
            ax.annotate(f"x{rt:.2f}" if rt else "", (x + 0.2, tr[x]), ha="center", va="bottom")
        ax.set_xticks(list(xs), servers)
        ax.legend()
    ax.set_title(f"Throughput at saturation (wrk), target traced >= {TARGET_THROUGHPUT_RATIO:.2f}x")
    ax.set_ylabel("requests/s")

    ax = axes[0][1]
    if servers:
        labels, vals, colors = [], [], []
        for s in servers:
            for q in ("p50_ms", "p99_ms"):
                for mode, col in (("untraced", "#888"), ("traced", "#d62728")):
                    labels.append(f"{s}\n{q[:3]} {mode[0]}")
                    vals.append(ov[s]["summary"][mode][q] or 0)
                    colors.append(col)
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_title("Latency at saturation (u = untraced, t = traced)")
    ax.set_ylabel("ms")

    ax = axes[1][0]
    cost = r.get("cost") or []
    if cost:
        labels = [f"{c['rate'] / 1000:g}k" for c in cost]
        us = [per_exchange(c, "cpu") or 0 for c in cost]
        bpf = [per_exchange(c, "bpf") or 0 for c in cost]
        xs = list(range(len(labels)))
        ax.bar([x - 0.2 for x in xs], us, 0.4, color="#1f77b4", label="agent process CPU us/exchange")
        ax.bar([x + 0.2 for x in xs], bpf, 0.4, color="#9467bd", label="BPF probes us/exchange (in-kernel)")
        ax.set_xticks(xs, labels)
        ax.set_ylim(0, max([*us, *bpf, TARGET_CPU_US_PER_REQUEST]) * 1.4)
        ax.axhline(TARGET_CPU_US_PER_REQUEST, color="k", ls="--", lw=1,
                   label=f"target {TARGET_CPU_US_PER_REQUEST:.0f} us")
        ax2 = ax.twinx()
        hwm = [c.get("hwm_mb") or 0 for c in cost]
        ax2.plot(xs, hwm, "o-", color="#2ca02c", label="peak RSS MB")
        ax2.set_ylabel("MB")
        ax2.set_ylim(0, max([*hwm, 1.0]) * 1.4)
        ax2.legend(loc="upper right")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Agent cost at fixed request rates")
    ax.set_ylabel("CPU us per traced exchange")
    ax.set_xlabel("offered rate (req/s)")

    ax = axes[1][1]
    steps = sorted((r.get("capacity") or {}).get("steps", []), key=lambda s: s["rate"])
    if steps:
        rates = [s["rate"] for s in steps]
        delivered = [(s["unique_server_spans"] / s["answered"]) if s["answered"] else 0 for s in steps]
        achieved = [(s["achieved_rps"] or 0) / s["rate"] for s in steps]
        ax.plot(rates, delivered, "o-", color="#d62728", label="server spans / answered requests")
        ax.plot(rates, achieved, "s--", color="#888", label="achieved / offered rate")
        ax.axhline(1.0, color="k", lw=0.8)
        cap = ((r.get("capacity") or {}).get("result") or {}).get("capacity_rps")
        if cap:
            ax.axvline(cap, color="#2ca02c", ls=":", label=f"capacity {cap:,.0f} req/s")
        ax.legend(loc="lower left", fontsize=8)
        ax.set_ylim(min([0.9, *delivered, *achieved]) - 0.05, 1.05)
    ax.set_title("Capacity: every request exactly one span")
    ax.set_xlabel("offered rate (req/s)")
    for ax, shown in ((axes[0][0], servers), (axes[0][1], servers), (axes[1][0], cost), (axes[1][1], steps)):
        if not shown:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes,
                    color="#888")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
