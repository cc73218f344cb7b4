"""`make bench` (python -m bench.run): overhead, cost per request, capacity and start-up of kspan.

Every process it starts is on 127.0.0.1, bounded in time, and stopped by pid when it ends (also on
Ctrl-C). Results: a table on stdout, bench/results/<UTC time>.{json,png,log}, copies as
bench/results/latest.{json,png}, and bench/LATEST.md + bench/LATEST.png to commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import hotpath, protocols, report
from bench.agent import Agent, kspan_binary
from bench.bpfcounters import delta, enable_run_time_stats, programs_by_name
from bench.gobuild import REPO, build
from bench.load import run_goload, start_goload
from bench.nginx import Nginx
from bench.processes import Managed, free_port, stop_all
from bench.sink import Sink
from bench.wrk import run_wrk

BENCH_DIR = os.path.join(REPO, "bench")


def _rates(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make bench ARGS=...", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the 20,000 req/s no-loss step runs 60 s (the target's duration) instead of --lossless-s")
    p.add_argument("--phases", default="hotpath,overhead,cost,capacity,protocols",
                   help="comma-separated subset of hotpath,overhead,cost,capacity (start-up is measured in "
                        "each; hotpath is bench/hotpath.py, the per-record path without the kernel)")
    p.add_argument("--servers", default="go,nginx", help="servers for the overhead phase: go,nginx")
    p.add_argument("--untraced-only", action="store_true", help="never start the agent (harness check)")
    p.add_argument("--rounds", type=int, default=2, help="untraced/traced pairs per server at saturation")
    p.add_argument("--wrk-s", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--wrk-connections", type=int, default=16)
    p.add_argument("--rates", type=_rates, default=[1000, 5000, 10000], help="fixed rates for the cost phase")
    p.add_argument("--cost-ends", choices=["both", "server"], default="both",
                   help="ends the cost phase traces: both (the server by pid, goload by name: two exchanges "
                        "per request, as the targets are stated) or the server alone")
    p.add_argument("--window-s", type=float, default=10.0, help="seconds per fixed-rate cost window")
    p.add_argument("--exec-delay-s", type=float, default=3.0,
                   help="goload waits this long before sending, so the agent's inspection of the new process "
                        "falls outside the measured window (its CPU is reported separately)")
    p.add_argument("--idle-s", type=float, default=5.0, help="seconds of agent CPU measured with no requests")
    p.add_argument("--lossless-s", type=float, default=10.0, help="seconds of the 20,000 req/s capacity step")
    p.add_argument("--step-s", type=float, default=5.0, help="seconds per other capacity step")
    p.add_argument("--ladder-up", type=_rates, default=[15000, 20000, 30000, 40000])
    p.add_argument("--ladder-down", type=_rates, default=[5000, 2500, 1000])
    p.add_argument("--conns", type=int, default=32, help="goload keep-alive connections")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--protocol", choices=["http/protobuf", "grpc"], default="http/protobuf",
                   help="OTLP protocol from the agent to the bench's span sink")
    p.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `kspan run` (repeatable), e.g. --agent-arg=--no-metrics")
    p.add_argument("--quiet-s", type=float, default=5.0,
                   help="a span count unchanged this long means the agent has exported all it will")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results"))
    p.add_argument("--no-latest", action="store_true", help="do not update latest.* and bench/LATEST.md")
    return p


def cpu_times() -> tuple[int, int]:
    """(steal, all) jiffies of the machine since boot (/proc/stat's cpu line): on a VM, the share
    of CPU the hypervisor gave to others while the bench ran says how far its figures are from
    another run's."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_at_start": list(os.getloadavg()),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


class Bench:
    def __init__(self, args: argparse.Namespace, kspan: str | None, log_path: str) -> None:
        self.args = args
        self.kspan = kspan
        self.log = log_path
        self.sink: Sink | None = None
        self.agents: list[Agent] = []
        self.startup: dict[str, Any] = {"ready_s": [], "first_span_s": None, "compiler_mapped": []}
        self.idle_cpu_pct: float | None = None
        self.first_exec_cpu_s: float | None = None

    def say(self, msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    # --- the agent -----------------------------------------------------------------------------
    def launch_agent(self, targets: Sequence[str]) -> Agent:
        assert self.kspan is not None and self.sink is not None
        agent = Agent(self.kspan, targets, self.sink.endpoint, self.args.protocol, self.args.agent_arg, self.log)
        self.agents.append(agent)
        ready = agent.wait_ready()
        self.startup["ready_s"].append(ready)
        self.startup["compiler_mapped"].append(agent.compiler_mapped)
        self.say(f"kspan ready in {ready:.2f} s ({' '.join(targets)})")
        return agent

    def stop_agent(self, agent: Agent) -> dict[str, int]:
        counters = agent.stop()
        if agent.exit_code != 0:
            self.say(f"kspan exited with {agent.exit_code}: {agent.proc.output('err')[-1500:]}")
        return counters

    def settle(self, agent: Agent, max_s: float = 30.0, busy_pct: float = 5.0) -> None:
        """Wait until the agent uses less than busy_pct of a core over a second (it has caught up
        with earlier work), or max_s."""
        deadline = time.monotonic() + max_s
        prev = agent.sample()
        while prev is not None and time.monotonic() < deadline:
            time.sleep(1.0)
            cur = agent.sample()
            if cur is None or 100 * (cur.cpu_s - prev.cpu_s) / (cur.monotonic_s - prev.monotonic_s) < busy_pct:
                return
            prev = cur

    def go_server(self) -> tuple[Managed, str]:
        srv = Managed("goserver", [build("goserver"), "-addr", "127.0.0.1:0"], log_path=self.log)
        got = srv.wait_line(r"listening on (127\.0\.0\.1:\d+)", 10)
        if got is None:
            srv.stop()
            raise RuntimeError("goserver did not start: " + srv.output())
        return srv, got[1].group(1)

    # --- overhead at saturation ----------------------------------------------------------------
    def overhead(self, server: str) -> dict[str, Any]:
        a = self.args
        nginx: Nginx | None = None
        gosrv: Managed | None = None
        if server == "go":
            gosrv, addr = self.go_server()
            pids = [gosrv.pid]
        elif server == "nginx":
            port = free_port()
            nginx = Nginx(port, os.path.join(a.out, "nginx-tmp"), a.nginx_workers, self.log)
            nginx.start()
            addr = f"127.0.0.1:{port}"
            pids = nginx.pids()
        else:
            raise ValueError(f"unknown server {server!r}")
        runs: list[dict[str, Any]] = []
        try:
            run_wrk(f"http://{addr}/b/warmup-{server}/0", 1, a.wrk_connections)
            # ABBA order (untraced, traced, traced, untraced, ...): a load that drifts linearly
            # during the run (other work on the machine) cancels out of the ratio.
            modes = ["untraced", "traced"] if self.kspan else ["untraced"]
            pid_args = [x for p in pids for x in ("--pid", str(p))]
            for rnd in range(1, a.rounds + 1):
                for mode in (modes if rnd % 2 else modes[::-1]):
                    phase = f"ovh-{server}-{rnd}"
                    agent = None
                    if mode == "traced":
                        try:
                            agent = self.launch_agent(pid_args)
                        except RuntimeError as e:
                            runs.append({"mode": mode, "round": rnd, "error": str(e)[-2000:]})
                            self.say(f"{server} traced round {rnd}: {str(e)[-1500:]}")
                            continue
                    k0 = agent.kernel_counters() if agent is not None else None
                    try:
                        w = run_wrk(f"http://{addr}/b/{phase}/0", a.wrk_s, a.wrk_connections)
                        run: dict[str, Any] = {"mode": mode, "round": rnd, **w.as_dict(),
                                               "loadavg_1m": os.getloadavg()[0]}
                        if agent is not None and not agent.alive():
                            err = f"kspan exited during the run: {agent.proc.output('err')[-1500:]}"
                            runs.append({"mode": mode, "round": rnd, "error": err})
                            self.say(f"{server} traced round {rnd}: {err}")
                            continue
                        if agent is not None:
                            assert self.sink is not None
                            run["spans"] = self.sink.wait_phase(phase, w.requests, a.quiet_s, 60)["server"]
                            run["kernel"] = _kdelta(k0, agent.kernel_counters())
                    finally:
                        if agent is not None:
                            run["kspan_counters"] = self.stop_agent(agent)
                    if agent is not None and self.sink is not None:
                        # Spans flushed at stop still count; the in-window figure shows export delay.
                        run["spans_in_window"] = run.get("spans")
                        run["spans"] = self.sink.phase(phase)["server"]
                    runs.append(run)
                    self.say(f"{server} {mode} round {rnd}: {w.rps:,.0f} req/s, p50 {w.p50_ms:.3f} ms, "
                             f"p99 {w.p99_ms:.3f} ms" + (f", {run['spans']:,} spans" if "spans" in run else ""))
        finally:
            if gosrv is not None:
                gosrv.stop()
            if nginx is not None:
                nginx.stop()
        return {"addr": addr, "runs": runs, "summary": report.summarize_overhead(runs)}

    # --- cost per request and start-up -----------------------------------------------------------
    def cost(self) -> list[dict[str, Any]]:
        a = self.args
        assert self.sink is not None
        srv, addr = self.go_server()
        out: list[dict[str, Any]] = []
        ends = 2 if a.cost_ends == "both" else 1
        try:
            # A trickle of new connections while the agent starts, to time the first exported span.
            trickle = start_goload(addr, "startup", 200, 60, conns=4, close_each=True, log_path=self.log)
            try:
                # Both ends: the targets are per exchange with both ends traced, each request
                # being a client exchange in goload and a server exchange in the Go server.
                targets = ["--pid", str(srv.pid)] + (["--exe", "goload"] if ends == 2 else [])
                agent = self.launch_agent(targets)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    first = self.sink.phase("startup")["first_span_unix_ns"]
                    if first:
                        self.startup["first_span_s"] = first / 1e9 - agent.proc.launched_wall_s
                        self.say(f"first span at the endpoint {self.startup['first_span_s']:.2f} s after launch")
                        break
                    time.sleep(0.02)
                else:
                    self.say("no span at the endpoint within 30 s of launch")
            finally:
                trickle.stop(signal.SIGKILL)
            try:
                # The first exec of goload makes the agent inspect a binary it has not seen (Go
                # DWARF, OpenSSL symbols): do it once here, measured, so no window pays for it.
                w0 = agent.sample()
                run_goload(addr, "warmup", 10, 1, 1, self.log)
                self.settle(agent)
                w1 = agent.sample()
                if w0 is not None and w1 is not None:
                    self.first_exec_cpu_s = w1.cpu_s - w0.cpu_s
                    self.say(f"agent CPU for a new Go binary's first exec (goload): {self.first_exec_cpu_s:.2f} s")
                i0 = agent.sample()
                time.sleep(a.idle_s)
                i1 = agent.sample()
                if i0 is not None and i1 is not None:
                    self.idle_cpu_pct = 100 * (i1.cpu_s - i0.cpu_s) / (i1.monotonic_s - i0.monotonic_s)
                    self.say(f"agent idle (no requests): {self.idle_cpu_pct:.1f}% CPU")
                for rate in a.rates:
                    phase = f"cost-{rate}"
                    self.settle(agent)
                    at_exec = agent.sample()
                    mark: dict[str, Any] = {}

                    def window_start(mark: dict[str, Any] = mark) -> None:
                        mark["k0"], mark["s0"] = agent.kernel_counters(), agent.sample()
                        mark["b0"] = agent.bpf_run_time()
                        mark["p0"] = programs_by_name(agent.pid)

                    load = run_goload(addr, phase, rate, a.window_s, a.conns, self.log, a.exec_delay_s, window_start)
                    k0, s0 = mark["k0"], mark["s0"]
                    answered = load["ok"] + load["non_2xx"]
                    exchanges = answered * ends
                    ph = self.sink.wait_phase(phase, answered, a.quiet_s, 60, clients=answered if ends == 2 else 0)
                    k1, s1, b1 = agent.kernel_counters(), agent.sample(), agent.bpf_run_time()
                    b0 = mark["b0"]
                    progs = _top_programs(mark["p0"], programs_by_name(agent.pid), exchanges)
                    if s0 is None or s1 is None:
                        raise RuntimeError("kspan exited during the cost phase: " + agent.proc.output("err")[-2000:])
                    cpu = s1.cpu_s - s0.cpu_s
                    entry = {
                        "rate": rate, "achieved_rps": load["achieved_rps"], "requests": answered,
                        "ends": ends, "exchanges": exchanges,
                        "server_spans": ph["server"], "client_spans": ph["client"],
                        "window_s": s1.monotonic_s - s0.monotonic_s, "cpu_s": cpu,
                        "cpu_us_per_request": report.cpu_us_per_request(cpu, answered),
                        "cpu_us_per_exchange": report.cpu_us_per_request(cpu, exchanges),
                        "cpu_pct": 100 * cpu / (s1.monotonic_s - s0.monotonic_s),
                        "rss_mb": (s1.rss_kb or 0) / 1024, "hwm_mb": (s1.hwm_kb or 0) / 1024,
                        "rss_anon_mb": (s1.anon_kb or 0) / 1024, "rss_file_mb": (s1.file_kb or 0) / 1024,
                        "outcome": report.step_outcome(load, ph), "kernel": _kdelta(k0, k1),
                        "load": load, "phase": phase,
                        # CPU the agent spent while goload started and waited, before it sent
                        # anything: inspecting a new process's binary (Go, OpenSSL).
                        "exec_cpu_s": None if at_exec is None else s0.cpu_s - at_exec.cpu_s,
                        # The probes' own run time, spent inside the traced (and untraced) processes.
                        "bpf_runs": None if b0 is None or b1 is None else b1[0] - b0[0],
                        "bpf_recursion_misses": None if b0 is None or b1 is None else b1[2] - b0[2],
                        "bpf_programs": progs,
                        "bpf_us_per_request": None if b0 is None or b1 is None or not answered
                        else (b1[1] - b0[1]) / 1000 / answered,
                        "bpf_us_per_exchange": None if b0 is None or b1 is None or not exchanges
                        else (b1[1] - b0[1]) / 1000 / exchanges,
                    }
                    out.append(entry)
                    self.say(f"cost at {rate:,} req/s: {entry['cpu_us_per_exchange'] or 0:.1f} us/exchange, "
                             f"{entry['cpu_pct']:.0f}% CPU, RSS {entry['rss_mb']:.0f} MB "
                             f"({entry['rss_anon_mb']:.0f} anon, {entry['rss_file_mb']:.0f} file), "
                             f"{ph['server']:,} server and {ph['client']:,} client spans of {answered:,} requests")
            finally:
                self.stop_agent(agent)
        finally:
            srv.stop()
        for entry in out:
            ph = self.sink.phase(entry["phase"])
            entry["spans_in_window"] = entry["server_spans"]
            entry["server_spans"] = ph["server"]
            entry["client_spans"] = ph["client"]
            entry["outcome"] = report.step_outcome(entry["load"], ph)
        return out

    # --- capacity ------------------------------------------------------------------------------------
    def capacity(self) -> dict[str, Any]:
        a = self.args
        assert self.sink is not None
        srv, addr = self.go_server()
        steps: list[dict[str, Any]] = []
        health_before: dict[str, float] = {}
        try:
            # Both ends traced: the server by pid, every goload (a new process per step) by name.
            agent = self.launch_agent(["--pid", str(srv.pid), "--exe", "goload"])
            health_before = dict(self.sink.stats().get("health") or {})
            try:
                def step(rate: int, duration: float, target: bool = False) -> dict[str, Any]:
                    assert self.sink is not None
                    phase = f"cap-{rate}" + ("-target" if target else "")
                    self.settle(agent)
                    mark: dict[str, Any] = {}

                    def window_start() -> None:
                        mark["k0"] = agent.kernel_counters()

                    load = run_goload(addr, phase, rate, duration, a.conns, self.log, a.exec_delay_s, window_start)
                    k0 = mark["k0"]
                    ph = self.sink.wait_phase(phase, load["ok"] + load["non_2xx"], a.quiet_s, 90)
                    s = {**report.step_outcome(load, ph), "duration_s": duration, "target_step": target,
                         "client_spans": ph["client"], "kernel": _kdelta(k0, agent.kernel_counters()),
                         "load": load, "phase": phase}
                    steps.append(s)
                    self.say(f"capacity step {rate:,} req/s x {duration:.0f} s: achieved {s['achieved_rps']:,.0f}, "
                             f"{s['unique_server_spans']:,}/{s['answered']:,} spans, {s['duplicate_spans']} dup, "
                             f"{s['late']} late, {s['errors']} errors")
                    return s

                first = step(report.TARGET_LOSSLESS_RPS, 60.0 if a.full else a.lossless_s, target=True)
                good = first["exact"] and first["sustained"]
                for rate in (a.ladder_up if good else a.ladder_down):
                    s = step(rate, a.step_s)
                    if (s["exact"] and s["sustained"]) != good:
                        break
            finally:
                counters = self.stop_agent(agent)
        finally:
            srv.stop()
        stats = self.sink.stats()
        health_after = dict(stats.get("health") or {})
        health_max = dict(stats.get("health_max") or {})
        for i, st in enumerate(steps):
            # The final count, once the agent has stopped and flushed, decides exactness.
            ph = self.sink.phase(st["phase"])
            steps[i] = {**st, **report.step_outcome(st["load"], ph), "client_spans": ph["client"],
                        "unique_in_window": st["unique_server_spans"]}
        return {
            "steps": steps,
            "result": report.capacity(steps),
            "kspan_counters": counters,
            "kernel_counters_at_stop": agent.final_kernel,
            "kspan_health_metrics": {"before": health_before, "after": health_after, "max": health_max},
        }


def _top_programs(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], exchanges: int,
                  n: int = 8) -> list[dict[str, Any]]:
    """The BPF programs that took the most kernel time over a window: runs, ns per run, us per
    exchange (`exchanges`: the traced exchanges of the window)."""
    rows = []
    for name, (runs, ns) in after.items():
        r0, n0 = before.get(name, (0, 0))
        if ns - n0 > 0:
            rows.append({"program": name, "runs": runs - r0, "ns_per_run": (ns - n0) / max(1, runs - r0),
                         "us_per_exchange": (ns - n0) / 1000 / max(1, exchanges)})
    return sorted(rows, key=lambda r: -r["us_per_exchange"])[:n]


def _kdelta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    return None if before is None or after is None else delta(before, after)


def _kspan_usable(kspan: str | None) -> tuple[str | None, str]:
    if kspan is None:
        return None, "no `kspan` in .venv/bin or on PATH"
    try:
        r = subprocess.run([kspan, "run", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"`kspan run --help` failed: {e}"
    if r.returncode != 0:
        return None, f"`kspan run --help` exited {r.returncode}: {r.stderr.strip()[-500:]}"
    return kspan, ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0 and not args.untraced_only:
        print("bench: the agent needs root (eBPF); run as root or with --untraced-only", file=sys.stderr)
        return 2
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - {"hotpath", "overhead", "cost", "capacity", "protocols"}
    if unknown:
        print(f"bench: unknown phase(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(args.out, stamp)
    kspan, why = (None, "--untraced-only") if args.untraced_only else _kspan_usable(kspan_binary())
    results: dict[str, Any] = {"machine": machine(), "config": {**vars(args), "kspan": kspan}}
    if kspan is None:
        print(f"bench: traced runs skipped: {why}", file=sys.stderr)
        results["traced_skipped"] = why
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench: `{tool}` not found: run `make setup` (Debian packages wrk, nginx-light)", file=sys.stderr)
            return 2
    for name in ("goserver", "goload", "otlpsink"):
        build(name)

    b = Bench(args, kspan, base + ".log")
    started = time.monotonic()
    steal0, all0 = cpu_times()
    try:
        b.sink = Sink(base + ".log")
        errors: dict[str, str] = {}
        results["errors"] = errors

        def attempt(name: str, fn: Any) -> Any:
            # One phase failing (the agent not starting, say) must not lose the others' figures.
            try:
                return fn()
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
                b.say(f"{name} failed: {errors[name][:2000]}")
                return None

        if "hotpath" in phases:
            # First, while no server or agent of this run competes for the cores.
            b.say("hotpath: the per-record user-space path on recorded records (bench/hotpath.py)")
            results["hotpath"] = attempt("hotpath", lambda: hotpath.run(hotpath.RECORDINGS, hotpath.DEFAULT_PASSES))
        if "overhead" in phases:
            ov = {s: attempt(f"overhead-{s}", lambda s=s: b.overhead(s)) for s in args.servers.split(",") if s}
            results["overhead"] = {s: v for s, v in ov.items() if v is not None}
        if kspan is not None and "cost" in phases:
            # BPF run-time accounting only for the cost phase: it adds a clock read per probe run,
            # which the saturation runs must not pay.
            stats_fd = enable_run_time_stats()
            try:
                results["cost"] = attempt("cost", b.cost) or []
            finally:
                if stats_fd >= 0:
                    os.close(stats_fd)
        if kspan is not None and "capacity" in phases:
            results["capacity"] = attempt("capacity", b.capacity) or {}
        if kspan is not None and "protocols" in phases:
            results["protocols"] = attempt("protocols", lambda: protocols.run(b)) or []
    except KeyboardInterrupt:
        print("bench: interrupted; reporting what was measured", file=sys.stderr)
        results["interrupted"] = True
    finally:
        for agent in b.agents:
            if agent.proc.proc.poll() is None:
                agent.stop()
        if b.sink is not None:
            results["sink"] = {k: v for k, v in b.sink.stats().items() if k != "phases"}
            b.sink.stop()
        stop_all()
    results["elapsed_s"] = time.monotonic() - started
    steal1, all1 = cpu_times()
    results["machine"]["steal_pct"] = 100 * (steal1 - steal0) / (all1 - all0) if all1 > all0 else None
    results["startup"] = b.startup
    results["idle_cpu_pct"] = b.idle_cpu_pct
    results["first_exec_cpu_s"] = b.first_exec_cpu_s
    hwms = [a.last.hwm_kb / 1024 for a in b.agents if a.last is not None and a.last.hwm_kb]
    rss = [a.last.rss_kb / 1024 for a in b.agents if a.last is not None and a.last.rss_kb]
    # Steady: the RSS at the end of each fixed-rate cost window (the agent under load, after start-up).
    steady = [c["rss_mb"] for c in results.get("cost") or [] if c.get("rss_mb")]
    results["memory"] = {"peak_hwm_mb": max(hwms) if hwms else None, "last_rss_mb": max(rss) if rss else None,
                         "steady_rss_mb": max(steady) if steady else None}
    results["targets"] = report.evaluate_targets(results)

    m = results["machine"]
    steal = "" if m.get("steal_pct") is None else f", CPU stolen by the hypervisor {m['steal_pct']:.1f}%"
    print(f"\nkspan bench: {m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, {m['date']}, "
          f"load average at start {m['loadavg_at_start'][0]:.2f}{steal}, {results['elapsed_s']:.0f} s")
    print(report.render(results))
    report.write_json(results, base + ".json")
    report.write_chart(results, base + ".png")
    print(f"bench: wrote {base}.json, {base}.png, {base}.log")
    if not args.no_latest:
        shutil.copyfile(base + ".json", os.path.join(args.out, "latest.json"))
        shutil.copyfile(base + ".png", os.path.join(args.out, "latest.png"))
        if kspan is not None:
            shutil.copyfile(base + ".png", os.path.join(BENCH_DIR, "LATEST.png"))
            with open(os.path.join(BENCH_DIR, "LATEST.md"), "w") as f:
                f.write(latest_markdown(results))
            print("bench: updated bench/LATEST.md and bench/LATEST.png")
    return 0


def latest_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    notes = ""
    notes_path = os.path.join(BENCH_DIR, "NOTES.md")
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            notes = "\n" + f.read()
    return (
        "# Latest `make bench`\n\n"
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}, {m['memory_gb']} GiB), Linux {m['kernel']}, "
        f"kspan commit `{m['commit']}`; load average {m['loadavg_at_start'][0]:.2f} at the start"
        + ("" if m.get("steal_pct") is None else f"; {m['steal_pct']:.1f}% of the CPU time stolen by the hypervisor")
        + ". "
        "Agent, servers, load generators and the span sink all share the machine. "
        "See [README](README.md) for what each figure means.\n\n"
        "![latest bench chart](LATEST.png)\n\n"
        + report.render(r, markdown=True)
        + notes
    )


if __name__ == "__main__":
    sys.exit(main())
