"""Head sampling end to end: the real agent decides in the kernel, real services, a real OTLP endpoint.

The kernel decides at each trace's root and every descendant on the host inherits the decision;
metrics count every request whether its trace was kept or not.
"""

from __future__ import annotations

import http.client
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from correlator.sampling import ratio_keeps, threshold_for
from tests.support.agent import ROOT, AgentProcess, free_port, running_agent, service
from tests.support.ebpf import require_ebpf
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"
SERVER, CLIENT = 2, 3  # OTLP span kinds


def _get(port: int, path: str = "/chain", headers: dict[str, str] | None = None) -> int:
    """One request on a fresh connection (so each is a root exchange of its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def _services(tmp_path: Path, names: list[str]) -> list[list[str]]:
    """Commands for a chain names[0] -> names[1] -> ...; each script's name is its service name."""
    py = shutil.which("python3") or "python3"
    ports = [free_port() for _ in names]
    cmds = []
    for i, n in enumerate(names):
        shutil.copy(CHAIN_SERVER, tmp_path / f"{n}.py")
        nxt = f"http://127.0.0.1:{ports[i + 1]}/chain" if i + 1 < len(names) else ""
        cmds.append([py, str(tmp_path / f"{n}.py"), str(ports[i]), nxt])
    return cmds


def _port(cmd: list[str]) -> int:
    return int(cmd[2])


def _summary(agent: AgentProcess) -> dict[str, int]:
    """The counts of the agent's stop line (`kspan: stopped; a=1, b=2`)."""
    lines = [line for line in agent.stderr.splitlines() if line.startswith("kspan: stopped;")]
    assert lines, f"no stop summary:\n{agent.stderr[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])}


def _traces(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["trace_id"], []).append(s)
    return out


def _svc(span: dict[str, Any]) -> str:
    return span["resource"]["service.name"]


def _run_args(receiver: OtlpReceiver, *extra: str) -> list[str]:
    return ["run", "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet",
            "--metrics-interval", "1", *extra]


@pytest.fixture()
def receiver():
    with OtlpReceiver() as rx:
        yield rx


def test_traceidratio_keeps_a_binomial_share_of_root_traces(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    n, ratio = 400, 0.25
    (cmd,) = _services(tmp_path, ["svc_ratio"])
    port = _port(cmd)
    with service(cmd):
        args = _run_args(receiver, "--port", str(port), "--sampler", "traceidratio", "--sampler-arg", str(ratio))
        with running_agent(args, tmp_path) as agent:
            agent.wait_for_log("head sampling traceidratio 0.25")
            for _ in range(n):
                assert _get(port) == 200
            time.sleep(1.0)  # the last exchanges reach the ring buffer
        assert agent.returncode == 0, agent.stderr
    spans = receiver.spans()
    traces = _traces(spans)
    kept = len(traces)
    sd = math.sqrt(n * ratio * (1 - ratio))
    assert abs(kept - n * ratio) <= 4.5 * sd, f"kept {kept} of {n} traces at ratio {ratio} (sd {sd:.1f})"
    threshold = threshold_for(ratio)
    for tid, trace in traces.items():
        # Whole: the test client's root span and the server's span, linked.
        assert sorted(s["kind"] for s in trace) == [SERVER, CLIENT], trace
        root = next(s for s in trace if s["kind"] == CLIENT)
        srv = next(s for s in trace if s["kind"] == SERVER)
        assert root["parent_span_id"] == "" and srv["parent_span_id"] == root["span_id"]
        assert srv["attributes"]["kspan.parent.source"] == "peer"
        # The kernel applied the OTel SDK's rule to the trace id it minted.
        assert ratio_keeps(bytes.fromhex(tid), threshold), tid
    counts = _summary(agent)
    assert counts.get("exchanges_sampled", 0) == 2 * kept, counts
    assert counts.get("exchanges_unsampled", 0) == 2 * (n - kept), counts


def test_a_trace_across_processes_is_kept_or_dropped_whole(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    n = 40
    cmds = _services(tmp_path, ["svc_whole_a", "svc_whole_b"])
    with service(cmds[1]), service(cmds[0]):
        args = _run_args(receiver, "--port", str(_port(cmds[0])), "--port", str(_port(cmds[1])),
                         "--sampler", "traceidratio", "--sampler-arg", "0.5")
        with running_agent(args, tmp_path) as agent:
            for _ in range(n):
                assert _get(_port(cmds[0])) == 200
            time.sleep(1.0)
        assert agent.returncode == 0, agent.stderr
    traces = _traces(receiver.spans())
    assert 0 < len(traces) < n, f"{len(traces)} of {n} traces kept at ratio 0.5"
    for tid, trace in traces.items():
        # test client -> svc_whole_a (server, client) -> svc_whole_b (server): all four or none.
        shape = sorted((_svc(s), s["kind"]) for s in trace if _svc(s).startswith("svc_whole"))
        assert shape == [("svc_whole_a", SERVER), ("svc_whole_a", CLIENT), ("svc_whole_b", SERVER)], trace
        assert len(trace) == 4, trace
        by_id = {s["span_id"]: s for s in trace}
        assert sum(1 for s in trace if s["parent_span_id"] == "") == 1
        assert all(s["parent_span_id"] in by_id for s in trace if s["parent_span_id"]), trace
        assert ratio_keeps(bytes.fromhex(tid), threshold_for(0.5))
    counts = _summary(agent)
    assert counts.get("exchanges_sampled", 0) == 4 * len(traces), counts
    assert counts.get("exchanges_unsampled", 0) == 4 * (n - len(traces)), counts


@pytest.mark.parametrize(("sampler", "arg"), [("parentbased_always_off", None), ("parentbased_traceidratio", "0")])
def test_parent_based_samplers_honour_an_incoming_traceparent(tmp_path: Path, receiver: OtlpReceiver,
                                                              sampler: str, arg: str | None) -> None:
    require_ebpf()
    cmds = _services(tmp_path, ["svc_pb_a", "svc_pb_b"])
    kept_trace, kept_parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    dropped_trace = "5bf92f3577b34da6a3ce929d0e0e4737"
    # Env sets the sampler here (the flags are tested above); the test client is not traced
    # (--pid): the traceparent it sends is svc_pb_a's remote parent.
    env = {"OTEL_TRACES_SAMPLER": sampler}
    if arg is not None:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    with service(cmds[1]) as b, service(cmds[0]) as a:
        args = _run_args(receiver, "--pid", str(a.pid), "--pid", str(b.pid))
        with running_agent(args, tmp_path, env=env) as agent:
            for _ in range(3):
                assert _get(_port(cmds[0]), headers={"traceparent": f"00-{dropped_trace}-{kept_parent}-00"}) == 200
                assert _get(_port(cmds[0]), headers={"traceparent": f"00-{kept_trace}-{kept_parent}-01"}) == 200
            # Without a traceparent the root decides: nothing kept under either sampler.
            assert _get(_port(cmds[0])) == 200
            spans = receiver.wait_for_spans(lambda ss: len(ss) >= 9, timeout_s=30)
            time.sleep(1.5)  # anything else that would (wrongly) arrive
        assert agent.returncode == 0, agent.stderr
    spans = receiver.spans()
    traces = _traces(spans)
    assert set(traces) == {kept_trace}, {t: [(_svc(s), s["kind"]) for s in ss] for t, ss in traces.items()}
    trace = traces[kept_trace]
    assert len(trace) == 9  # 3 requests x (a server, a client, b server)
    a_servers = [s for s in trace if _svc(s) == "svc_pb_a" and s["kind"] == SERVER]
    assert len(a_servers) == 3
    for s in a_servers:
        assert s["parent_span_id"] == kept_parent
        assert s["attributes"]["kspan.parent.source"] == "traceparent"
    by_id = {s["span_id"]: s for s in trace}
    for s in trace:
        if s not in a_servers:
            parent = by_id[s["parent_span_id"]]
            assert parent["trace_id"] == kept_trace
            want = "thread" if s["kind"] == CLIENT else "peer"
            assert s["attributes"]["kspan.parent.source"] == want, s
    counts = _summary(agent)
    assert counts.get("exchanges_sampled", 0) == 9, counts
    assert counts.get("exchanges_unsampled", 0) == 12, counts  # 4 dropped requests x 3 exchanges


def _latest(metrics: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for m in metrics:
        if m["name"] == name:
            key = (m["resource"].get("service.name"), tuple(sorted(m["attributes"].items())))
            if key not in newest or m["time_ns"] >= newest[key]["time_ns"]:
                newest[key] = m
    return list(newest.values())


def _server_count(metrics: list[dict[str, Any]], service_name: str) -> int:
    return sum(m["count"] for m in _latest(metrics, "http.server.request.duration")
               if m["resource"].get("service.name") == service_name)


def test_metrics_count_every_request_at_ten_percent(tmp_path: Path, receiver: OtlpReceiver) -> None:
    require_ebpf()
    n = 100
    cmds = _services(tmp_path, ["svc_red_a", "svc_red_b"])
    with service(cmds[1]), service(cmds[0]):
        args = _run_args(receiver, "--port", str(_port(cmds[0])), "--port", str(_port(cmds[1])),
                         "--sampler", "traceidratio", "--sampler-arg", "0.1")
        with running_agent(args, tmp_path) as agent:
            for i in range(n):
                assert _get(_port(cmds[0]), "/chain" if i % 10 else "/status/503") in (200, 503)
            try:
                metrics = receiver.wait_for_metrics(
                    lambda ms: _server_count(ms, "svc_red_a") >= n and _server_count(ms, "svc_red_b") >= 90,
                    timeout_s=30)
            except TimeoutError:
                raise AssertionError(
                    f"server request counts a={_server_count(receiver.metrics(), 'svc_red_a')} "
                    f"b={_server_count(receiver.metrics(), 'svc_red_b')}, wanted {n} and 90") from None
            time.sleep(2.5)  # a later export must not count more
            metrics = receiver.metrics()
        assert agent.returncode == 0, agent.stderr
    # Every request counted once, sampled or not: svc_red_b only sees the 90 /chain requests.
    assert _server_count(metrics, "svc_red_a") == n
    assert _server_count(metrics, "svc_red_b") == 90
    a = _latest(metrics, "http.server.request.duration")
    by_status = {m["attributes"]["http.response.status_code"]: m["count"] for m in a
                 if m["resource"].get("service.name") == "svc_red_a"}
    assert by_status == {200: 90, 503: 10}
    assert all(m["attributes"]["http.request.method"] == "GET" for m in a)
    client = [m for m in _latest(metrics, "http.client.request.duration")
              if m["resource"].get("service.name") == "svc_red_a"]
    assert sum(m["count"] for m in client) == 90
    # The service graph pairs both halves of each a -> b call (by the kernel's span ids).
    edges = {(m["attributes"]["client"], m["attributes"]["server"]): m["value"]
             for m in _latest(metrics, "traces_service_graph_request_total")}
    assert edges.get(("svc_red_a", "svc_red_b")) == 90, edges
    health = {m["name"]: m["value"] for m in _latest(metrics, "kspan.exchanges.unsampled")
              + _latest(metrics, "kspan.exchanges.sampled")}
    traces = _traces(receiver.spans())
    assert len(traces) < n / 2, f"{len(traces)} traces exported at ratio 0.1"
    assert health["kspan.exchanges.sampled"] + health["kspan.exchanges.unsampled"] >= 2 * n + 2 * 90
