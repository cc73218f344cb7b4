"""The scrape endpoint end to end: the real agent traces a real two-service chain, the real Prometheus
server (Debian's package) scrapes it on 127.0.0.1 with kspan's rules loaded, and its HTTP API answers
with the request counts the test drove."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import ROOT, free_port, running_agent, service, stop_process
from tests.support.ebpf import fail_or_skip, require_ebpf
from tests.support.promql import dashboard_queries, metric_names, substitute_variables

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"
RULES = ROOT / "deploy" / "prometheus" / "kspan-rules.yaml"


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = "the prometheus server is missing: `make setup` installs Debian's prometheus package"
        fail_or_skip(msg)
    return path


class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def api(self, path: str, **params: str) -> dict:
        q = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{q}", timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, want: float, timeout_s: float = 60.0) -> float:
        deadline = time.monotonic() + timeout_s
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == want:
                return got
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: {expr} = {got}, wanted {want}; targets: "
                             f"{self.api('targets')['activeTargets']}\n{self.log.read_text()[-2000:]}")


@contextlib.contextmanager
def prometheus_scraping(target: str, tmp_path: Path) -> Iterator[Prometheus]:
    """The real Prometheus server on a free loopback port, scraping target every second with kspan's
    rules loaded, its storage in tmp_path."""
    binary = _prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: kspan\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready in 30 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Prometheus(url, log)
    finally:
        stop_process(proc)


def _curl(url: str) -> None:
    subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True, timeout=10)


def _listening(pid: int) -> list[str]:
    """Local addresses pid listens on (TCP), from ss."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True, timeout=10).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_prometheus_scrapes_request_counts_of_a_traced_service(tmp_path: Path) -> None:
    require_ebpf()
    front_port, back_port, scrape_port = free_port(), free_port(), free_port()
    for name in ("prom_front", "prom_back"):
        shutil.copy(CHAIN_SERVER, tmp_path / f"{name}.py")
    py = shutil.which("python3") or "python3"
    args = ["run", "--quiet", "--output", str(tmp_path / "t.jsonl"), "--no-metrics",
            "--port", str(front_port), "--port", str(back_port)]
    with (
        service([py, str(tmp_path / "prom_back.py"), str(back_port)]),
        service([py, str(tmp_path / "prom_front.py"), str(front_port), f"http://127.0.0.1:{back_port}/chain"]),
        running_agent(args, tmp_path, env={"KSPAN_PROMETHEUS_PORT": str(scrape_port)}) as agent,
    ):
        agent.wait_for_log(f"Prometheus scrape endpoint http://127.0.0.1:{scrape_port}/metrics")
        # Off every interface but loopback unless asked.
        assert _listening(agent.proc.pid) == [f"127.0.0.1:{scrape_port}"]
        with prometheus_scraping(f"127.0.0.1:{scrape_port}", tmp_path) as prom:
            front = 'service_name="prom_front"'
            # Two rounds: Prometheus's rate() counts no increase into a series' first sample, so the
            # rules below need each series scraped once before the rest of the traffic.
            _curl(f"http://127.0.0.1:{front_port}/chain")
            _curl(f"http://127.0.0.1:{front_port}/status/500")
            prom.wait_value(f"sum(http_server_request_duration_seconds_count{{{front}}})", 2)
            for _ in range(19):
                _curl(f"http://127.0.0.1:{front_port}/chain")
            for _ in range(4):
                _curl(f"http://127.0.0.1:{front_port}/status/500")
            prom.wait_value(f"sum(http_server_request_duration_seconds_count{{{front}}})", 25)
            assert prom.value(f'sum(http_server_request_duration_seconds_count{{{front},error_type!=""}})') == 5
            assert prom.value(f'sum(http_server_request_duration_seconds_count{{{front},'
                              'http_response_status_code="200"})') == 20
            assert prom.value('sum(http_server_request_duration_seconds_count{service_name="prom_back"})') == 20
            assert prom.value('sum(http_client_request_duration_seconds_count{service_name="prom_front"})') == 20
            prom.wait_value('sum(traces_service_graph_request_total{client="prom_front",server="prom_back"})', 20)
            assert prom.value('up{job="kspan"}') == 1
            assert (prom.value('kspan_probes_attached{job="kspan"}') or 0) >= 10
            assert prom.value('kspan_records_lost_total{job="kspan"}') == 0
            assert (prom.value('process_resident_memory_bytes{job="kspan"}') or 0) > 10e6
            # kspan's own rules, evaluated by the real server on the real series.
            rate = prom.value('kspan:service:request_rate5m{service_name="prom_front"}')
            deadline = time.monotonic() + 30
            while not rate and time.monotonic() < deadline:
                time.sleep(1)
                rate = prom.value('kspan:service:request_rate5m{service_name="prom_front"}')
            assert rate and rate > 0, prom.log.read_text()[-2000:]
            # 4 of the 23 requests after the first scrape failed (rate() extrapolates: roughly).
            assert 0.1 < (prom.value('kspan:service:error_ratio5m{service_name="prom_front"}') or 0) < 0.3
            assert prom.value('kspan:service:error_ratio5m{service_name="prom_back"}') == 0
            rule_health = {r["name"]: r["health"] for g in prom.api("rules")["groups"] for r in g["rules"]}
            assert rule_health and set(rule_health.values()) == {"ok"}, rule_health
            _dashboard_queries_answer(prom)
    assert agent.returncode == 0, agent.stderr


def _dashboard_queries_answer(prom: Prometheus) -> None:
    """Every query of the Grafana dashboard runs on the real server, over the real series."""
    present = set(prom.api("label/__name__/values"))
    results = {}
    for where, expr in dashboard_queries():
        results[where] = prom.query(substitute_variables(expr))
        # Every series a panel reads exists, except TCP trouble this test does not cause.
        missing = {n for n in metric_names(expr) - present if not n.startswith("kspan_network_tcp_")}
        assert not missing, f"{where}: {missing} not in Prometheus"
    edges = {tuple(r["metric"].get(k) for k in ("id", "source", "target"))
             for r in results["panel 'Service graph' edges"]}
    assert ("prom_front->prom_back", "prom_front", "prom_back") in edges, edges
    routes = {r["metric"].get("service_name") for r in results["panel 'Top routes' A"]}
    assert {"prom_front", "prom_back"} <= routes, routes
    assert [r["value"][1] for r in results["panel 'Agents up' A"]] == ["1"]


def test_no_port_is_opened_unless_asked(tmp_path: Path) -> None:
    require_ebpf()
    env = {"KSPAN_PROMETHEUS_PORT": "", "KSPAN_PROMETHEUS_ADDRESS": ""}
    with running_agent(["run", "--quiet", "--output", str(tmp_path / "t.jsonl"), "--port", str(free_port())],
                       tmp_path, env=env) as agent:
        assert _listening(agent.proc.pid) == []
        assert "Prometheus" not in agent.stderr
    assert agent.returncode == 0, agent.stderr


def test_scrapes_of_kspan_itself_are_never_traced(tmp_path: Path) -> None:
    """The scraper's requests to kspan's own endpoint are the agent's own traffic: the kernel knows
    the listening endpoint from the start, so not even the first request of a scrape connection
    becomes a span (only a counted, filtered request)."""
    require_ebpf()
    scrape_port = free_port()
    out = tmp_path / "t.jsonl"
    args = ["run", "--quiet", "--output", str(out), "--no-metrics", "--port", str(scrape_port),
            "--prometheus-port", str(scrape_port)]
    with running_agent(args, tmp_path) as agent:
        agent.wait_for_log(f"Prometheus scrape endpoint http://127.0.0.1:{scrape_port}/metrics")
        with prometheus_scraping(f"127.0.0.1:{scrape_port}", tmp_path) as prom:
            prom.wait_value('up{job="kspan"}', 1)
            time.sleep(3)  # a few more scrapes
    assert agent.returncode == 0, agent.stderr
    spans = out.read_text() if out.exists() else ""
    assert str(scrape_port) not in spans, spans[:2000]
    summary = next(line for line in agent.stderr.splitlines() if line.startswith("kspan: stopped;"))
    filtered = dict(p.strip().split("=", 1) for p in summary.split(";", 1)[1].split(",") if "=" in p)
    assert int(filtered.get("requests_filtered", 0)) >= 1, summary
