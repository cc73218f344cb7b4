"""The protocols beyond HTTP/1 under load: Redis (redis-benchmark against Debian's redis-server)
and gRPC (a grpcio client against a grpcio server, both Python, over h2c). Each runs untraced,
then traced, in one run: throughput ratio, and the agent's CPU per operation, the same figure the
cost phase gives for HTTP. Everything stays on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

from bench.processes import Managed, free_port

REDIS_OPS = 40_000  # SET and GET, 20,000 each
GRPC_CALLS = 4_000

GRPC_SERVER = textwrap.dedent('''
    import sys
    from concurrent.futures import ThreadPoolExecutor
    import grpc
    h = grpc.method_handlers_generic_handler("bench.Echo", {"Say": grpc.unary_unary_rpc_method_handler(
        lambda req, ctx: req)})
    s = grpc.server(ThreadPoolExecutor(8), options=[("grpc.so_reuseport", 0)])
    s.add_generic_rpc_handlers((h,))
    s.add_insecure_port("127.0.0.1:" + sys.argv[1])
    s.start()
    print("listening", flush=True)
    s.wait_for_termination()
''')

GRPC_CLIENT = textwrap.dedent('''
    import sys, time
    from concurrent.futures import ThreadPoolExecutor
    import grpc
    port, n = sys.argv[1], int(sys.argv[2])
    with grpc.insecure_channel("127.0.0.1:" + port, options=[("grpc.enable_http_proxy", 0)]) as ch:
        say = ch.unary_unary("/bench.Echo/Say")
        say(b"warm", timeout=10)
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda i: say(b"x" * 32, timeout=10), range(n)))
        print(n / (time.monotonic() - t0), flush=True)
''')


def _wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:.0f} s")


def _redis_load(port: int) -> float:
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(REDIS_OPS // 2),
                          "-c", "8", "-t", "set,get", "-q", "--csv"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {out.stderr[-500:]}")
    rates = [float(line.split(",")[1].strip('"')) for line in out.stdout.splitlines()
             if line.startswith('"SET"') or line.startswith('"GET"')]
    if len(rates) != 2:
        raise RuntimeError(f"redis-benchmark said: {out.stdout[-500:]}")
    return sum(rates) / len(rates)


def _grpc_load(tmp: str, port: int) -> float:
    out = subprocess.run([sys.executable, os.path.join(tmp, "client.py"), str(port), str(GRPC_CALLS)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"the gRPC client failed: {out.stderr[-500:]}")
    return float(out.stdout.split()[-1])


def _measure(bench: Any, name: str, port: int, ops: int, load: Callable[[], float]) -> dict[str, Any]:
    """The load untraced, then traced (the agent limited to the server's port)."""
    untraced = load()
    agent = bench.launch_agent(["--port", str(port)])
    try:
        bench.settle(agent)
        s0 = agent.sample()
        traced = load()
        bench.settle(agent)
        s1 = agent.sample()
    finally:
        counters = bench.stop_agent(agent)
    cpu_s = s1.cpu_s - s0.cpu_s if s0 is not None and s1 is not None else None
    row = {"protocol": name, "ops": ops, "untraced_ops_s": untraced, "traced_ops_s": traced,
           "ratio": traced / untraced if untraced else None, "cpu_s": cpu_s,
           "cpu_us_per_op": 1e6 * cpu_s / ops if cpu_s is not None else None,
           "protocol_spans": counters.get("protocol_spans", 0), "segments": counters.get("segments", 0)}
    bench.say(f"{name}: {untraced:,.0f} ops/s untraced, {traced:,.0f} traced (ratio {row['ratio']:.2f}), "
              f"agent {row['cpu_us_per_op'] or 0:.1f} us per operation, {row['protocol_spans']:,} spans")
    return row


def run(bench: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="kspan-bench-proto-")
    try:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: run `make setup` (Debian package redis-server)")
        port = free_port()
        redis = Managed("redis-server", [exe, "--save", "", "--appendonly", "no", "--port", str(port),
                                         "--bind", "127.0.0.1", "--dir", tmp], log_path=bench.log)
        try:
            _wait_port(port)
            rows.append(_measure(bench, "redis", port, 2 * (REDIS_OPS // 2), lambda: _redis_load(port)))
        finally:
            redis.stop()
        with open(os.path.join(tmp, "server.py"), "w") as f:
            f.write(GRPC_SERVER)
        with open(os.path.join(tmp, "client.py"), "w") as f:
            f.write(GRPC_CLIENT)
        gport = free_port()
        grpc_srv = Managed("grpc-server", [sys.executable, os.path.join(tmp, "server.py"), str(gport)],
                           log_path=bench.log)
        try:
            _wait_port(gport)
            # +1: each load's connection opens with one warm-up call before the timed ones
            rows.append(_measure(bench, "grpc", gport, GRPC_CALLS + 1, lambda: _grpc_load(tmp, gport)))
        finally:
            grpc_srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
