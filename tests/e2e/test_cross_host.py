"""Cross-host trace context in a TCP option, on two simulated hosts: network namespaces joined by a
veth pair (198.18.0.1 and 198.18.0.2, inside the namespaces only), each with its own cgroup v2
directory so a sock_ops program attached to one host's cgroup sees that host's sockets only.

The first tests drive the sock_ops program directly through the real capture path: user space
writes a client connection's context into ctx_out, as the exchange machine does for a request,
and the test checks what crossed the veth and what the other end parsed. The agent tests run one
real `kspan run` per host, both exporting to one OTLP endpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import KSPAN, ROOT, running_agent
from tests.support.ebpf import on_load_error, require_ebpf
from tests.support.netns import (
    ADDR6_A,
    ADDR6_B,
    ADDR_A,
    ADDR_B,
    CTX_OPTION_KIND,
    Host,
    make_cert,
    program_copy,
    read_line,
    stop,
    two_hosts,
)
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.ebpf

SERVER, CLIENT = 2, 3  # OTLP span kinds
PORT_B, PORT_A = 8080, 8081
PEER = str(ROOT / "tests" / "support" / "netns.py")
PY = sys.executable


# --- the maps' layouts ------------------------------------------------------------------------


def _v6(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip).packed


def conn_key(local: str, lport: int, remote: str, rport: int) -> bytes:
    """struct kspan_conn_key: addresses in IPv6 form (IPv4 as ::ffff:a.b.c.d), ports in host order."""
    return _v6(local) + _v6(remote) + struct.pack("=HH", lport, rport)


class TraceCtx:
    """struct kspan_trace_ctx, at the offsets the objects' BTF gives."""

    def __init__(self, layout: dict[str, tuple[int, int]], size: int) -> None:
        self.layout, self.size = layout, size

    def pack(self, trace_id: bytes, span_id: int, flags: int = 1, seq: int = 0, state: int = 0) -> bytes:
        buf = bytearray(self.size)
        for name, fmt, value in (("span_id", "=Q", span_id), ("seq", "=I", seq), ("flags", "=B", flags),
                                 ("state", "=B", state), ("ts_ns", "=Q", time.monotonic_ns())):
            struct.pack_into(fmt, buf, self.layout[name][0], value)
        off = self.layout["trace_id"][0]
        buf[off : off + 16] = trace_id
        return bytes(buf)

    def unpack(self, raw: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"trace_id": raw[self.layout["trace_id"][0] :][:16]}
        for name, fmt in (("span_id", "=Q"), ("seq", "=I"), ("flags", "=B"), ("state", "=B")):
            out[name] = struct.unpack_from(fmt, raw, self.layout[name][0])[0]
        return out


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    require_ebpf()
    with two_hosts() as pair:
        yield pair


def _capture(context_cgroup: str | None = None, ctx_out_seen: bool = True) -> Any:
    """The real capture path (every object, the sock_ops program attached to a cgroup), tracing
    only this test process so the socket probes stay quiet. ctx_out_seen: open the gate the
    kernel's ctx_out writers open, since these tests write ctx_out themselves."""
    from tracer.capabilities import probe
    from tracer.capture import Capture, CaptureConfig, CaptureError

    cap = Capture(CaptureConfig(pids={os.getpid()}, context_cgroup=context_cgroup), probe())
    try:
        cap.start()
    except CaptureError as exc:
        on_load_error(exc, "the capture")
    if cap.context_propagation != "tcp":
        cap.close()
        on_load_error(RuntimeError(cap.context_note), "the sock_ops program")
    if ctx_out_seen:
        _ctx_out_seen(cap)
    return cap


def _ctx_out_seen(cap: Any) -> None:
    """Open the gate the kernel's ctx_out writers open before their first write (kspan_gate's
    ctx_out_seen): these tests write ctx_out from user space instead."""
    off, size = cap.struct_layout("kspan_gate")["ctx_out_seen"]
    gates, key = cap.map("kspan_gates"), struct.pack("=I", 0)
    value = bytearray(gates.lookup(key) or bytes(cap.struct_size("kspan_gate")))
    value[off : off + size] = (1).to_bytes(size, "little")
    gates.update(key, bytes(value))


def _server(host: Host, port: int, *extra: str, bind: str = "") -> subprocess.Popen[bytes]:
    proc = host.popen([PY, PEER, "serve", "--host", bind or host.addr, "--port", str(port), *extra],
                      stdout=subprocess.PIPE)
    assert read_line(proc).startswith("listening")
    return proc


def _client(host: Host, url: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = host.popen([PY, PEER, "client", url, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"connect\n")
    proc.stdin.flush()
    word, port = read_line(proc).split()
    assert word == "connected"
    return proc, int(port)


def _request(client: subprocess.Popen[bytes]) -> str:
    assert client.stdin is not None
    client.stdin.write(b"go\n")
    client.stdin.flush()
    return read_line(client)


def _sniffer(host: Host, port: int) -> subprocess.Popen[bytes]:
    proc = host.popen([PY, PEER, "sniff", "--iface", host.iface, "--port", str(port)], stdout=subprocess.PIPE)
    assert read_line(proc) == "sniffing"
    return proc


def _sniffed(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    time.sleep(0.3)  # segments in flight reach the socket
    stop(proc)
    assert proc.stdout is not None
    return [json.loads(line) for line in proc.stdout.read().decode().splitlines() if line.strip()]


def _counter(cap: Any, name: str) -> int:
    return int(cap.counters()[name])


@dataclasses.dataclass
class _Connected:
    """A capture, B's server and A's client connected to it (and B's sniffer, if asked)."""

    cap: Any
    ctx: TraceCtx
    client: subprocess.Popen[bytes]
    lport: int
    client_addr: str
    server_addr: str
    sniffer: subprocess.Popen[bytes] | None

    @property
    def out_key(self) -> bytes:
        """ctx_out's key: the client's end of the connection."""
        return conn_key(self.client_addr, self.lport, self.server_addr, PORT_B)

    @property
    def in_key(self) -> bytes:
        """ctx_in's key: the server's end."""
        return conn_key(self.server_addr, PORT_B, self.client_addr, self.lport)

    def sniffed(self) -> list[dict[str, Any]]:
        assert self.sniffer is not None
        return _sniffed(self.sniffer)


@contextlib.contextmanager
def _connected(hosts: tuple[Host, Host], path: str = "/work", *, server_args: tuple[str, ...] = (),
               client_args: tuple[str, ...] = (), bind: str = "", target: str = ADDR_B, client_addr: str = ADDR_A,
               sniff: bool = False, context_cgroup: str | None = None,
               ctx_out_seen: bool = True) -> Iterator[_Connected]:
    a, b = hosts
    cap = _capture(context_cgroup=context_cgroup, ctx_out_seen=ctx_out_seen)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ctx = TraceCtx(cap.struct_layout("kspan_trace_ctx"), cap.struct_size("kspan_trace_ctx"))
        procs.append(_server(b, PORT_B, *server_args, bind=bind))
        sniffer = _sniffer(b, PORT_B) if sniff else None
        if sniffer is not None:
            procs.append(sniffer)
        client, lport = _client(a, f"http://{target}:{PORT_B}{path}", *client_args)
        procs.append(client)
        yield _Connected(cap, ctx, client, lport, client_addr, target.strip("[]"), sniffer)
    finally:
        for p in reversed(procs):
            stop(p)
        cap.close()


# --- the sock_ops program, driven through ctx_out ------------------------------------------------


def test_the_context_crosses_the_veth_and_each_keep_alive_request_carries_its_own(hosts: tuple[Host, Host]) -> None:
    with _connected(hosts) as c:
        cap, ctx, client, out_key, in_key = c.cap, c.ctx, c.client, c.out_key, c.in_key
        ctx_out, ctx_in = cap.map("ctx_out"), cap.map("ctx_in")
        assert ctx_in.lookup(in_key) is None

        seen: list[dict[str, Any]] = []
        for n, (trace_id, span_id, flags) in enumerate(((bytes(range(1, 17)), 0x1122334455667788, 1),
                                                        (bytes(range(101, 117)), 0x0A0B0C0D0E0F1011, 0))):
            ctx_out.update(out_key, ctx.pack(trace_id, span_id, flags))
            assert _request(client) == "200"
            got_in = ctx_in.lookup(in_key)
            assert got_in is not None, f"request {n}: nothing parsed on the server's socket"
            parsed, sent = ctx.unpack(got_in), ctx.unpack(ctx_out.lookup(out_key) or b"")
            assert (parsed["trace_id"], parsed["span_id"], parsed["flags"]) == (trace_id, span_id, flags)
            assert sent["state"] == 1, "marked as written"
            # Both ends name the segment by the same sequence number: the request's first byte.
            assert sent["seq"] != 0 and parsed["seq"] == sent["seq"]
            seen.append(parsed)
        assert seen[0]["seq"] != seen[1]["seq"]
        written = _counter(cap, "context_options_written")
        assert written >= 2 and _counter(cap, "context_options_parsed") == 2

        # A request with no new context (the entry is marked written) carries nothing.
        assert _request(client) == "200"
        assert ctx.unpack(ctx_in.lookup(in_key) or b"")["span_id"] == 0x0A0B0C0D0E0F1011
        assert _counter(cap, "context_options_written") == written
        assert _counter(cap, "context_options_no_room") == 0 and _counter(cap, "context_options_malformed") == 0


def test_no_segment_carries_a_context_before_the_first_one_is_stored(hosts: tuple[Host, Host]) -> None:
    """Every client connection gets the option callbacks; until the kernel first stores a context
    (kspan_gate.ctx_out_seen), they return before looking ctx_out up, so an entry written behind
    the gate's back is not sent. Once the gate is open, the next request carries it."""
    with _connected(hosts, ctx_out_seen=False) as c:
        cap, ctx, client, out_key, in_key = c.cap, c.ctx, c.client, c.out_key, c.in_key
        ctx_out, ctx_in = cap.map("ctx_out"), cap.map("ctx_in")
        trace_id, span_id = bytes(range(21, 37)), 0x5566778899AABBCC
        ctx_out.update(out_key, ctx.pack(trace_id, span_id, 1))
        assert _request(client) == "200"
        assert ctx_in.lookup(in_key) is None
        assert ctx.unpack(ctx_out.lookup(out_key) or b"")["state"] == 0, "still pending: never looked at"
        assert _counter(cap, "context_options_written") == 0

        _ctx_out_seen(cap)
        assert _request(client) == "200"
        parsed = ctx.unpack(ctx_in.lookup(in_key) or b"")
        assert (parsed["trace_id"], parsed["span_id"]) == (trace_id, span_id)
        assert _counter(cap, "context_options_written") >= 1


@pytest.mark.parametrize(("bind", "target", "client_addr"), [
    (ADDR6_B, f"[{ADDR6_B}]", ADDR6_A),  # IPv6 at both ends
    ("::", ADDR_B, ADDR_A),  # an IPv4 client to a dual-stack server: its socket is IPv6, v4-mapped
], ids=["ipv6", "dual-stack"])
def test_ipv6_and_dual_stack_sockets_use_the_same_keys(hosts: tuple[Host, Host], bind: str, target: str,
                                                      client_addr: str) -> None:
    with _connected(hosts, bind=bind, target=target, client_addr=client_addr) as c:
        c.cap.map("ctx_out").update(c.out_key, c.ctx.pack(bytes(range(9, 25)), 99))
        assert _request(c.client) == "200"
        got = c.cap.map("ctx_in").lookup(c.in_key)
        assert got is not None and c.ctx.unpack(got)["span_id"] == 99


def test_a_retransmit_of_the_first_segment_carries_the_context_again(hosts: tuple[Host, Host]) -> None:
    """B's end of the veth is down while the request goes out: the first transmission is lost, the
    retransmit (the byte is still unacknowledged) carries the option and is what B parses."""
    _, b = hosts
    with _connected(hosts) as c:
        cap, ctx, client, out_key, in_key = c.cap, c.ctx, c.client, c.out_key, c.in_key
        cap.map("ctx_out").update(out_key, ctx.pack(bytes(range(7, 23)), 0x7777))
        b.link("down")
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        # sent and lost, then retransmitted (RTO 200 ms here) and lost again; on a loaded machine
        # the client may take a while to send at all
        deadline = time.monotonic() + 5
        while _counter(cap, "context_options_written") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _counter(cap, "context_options_written") >= 2, "each retransmit carries it"
        assert _counter(cap, "context_options_parsed") == 0
        b.link("up")
        assert read_line(client, timeout=30) == "200"
        parsed = ctx.unpack(cap.map("ctx_in").lookup(in_key) or bytes(ctx.size))
        sent = ctx.unpack(cap.map("ctx_out").lookup(out_key) or b"")
        assert (parsed["trace_id"], parsed["span_id"]) == (bytes(range(7, 23)), 0x7777)
        assert parsed["seq"] == sent["seq"] != 0
        # Segments the down link held back may be delivered with the retransmit once it is up:
        # each carries the same context, so B may parse it more than once.
        assert _counter(cap, "context_options_written") >= 2 and _counter(cap, "context_options_parsed") >= 1


def test_a_request_larger_than_a_segment_carries_the_context_within_the_mtu(hosts: tuple[Host, Host]) -> None:
    """While a request is pending the kernel sizes its segments with room for the option: a
    256 KiB body in MSS-sized packets (no GSO on the veth) crosses, the first carrying it."""
    with _connected(hosts, "/upload", client_args=("--body", str(256 * 1024)), sniff=True) as c:
        cap, ctx = c.cap, c.ctx
        cap.map("ctx_out").update(c.out_key, ctx.pack(bytes(range(3, 19)), 0x1234))
        assert _request(c.client) == "200"
        segments = c.sniffed()
        to_b = [s for s in segments if s["dport"] == PORT_B and s["payload"] > 0]
        carrying = [s for s in to_b if any(kind == CTX_OPTION_KIND for kind, _ in s["options"])]
        assert len(to_b) > 100 and len(carrying) == 1
        assert carrying[0]["seq"] == min(s["seq"] for s in to_b), "on the request's first segment"
        parsed = ctx.unpack(cap.map("ctx_in").lookup(c.in_key) or bytes(ctx.size))
        assert parsed["span_id"] == 0x1234


def test_a_receiver_without_kspan_ignores_the_option(hosts: tuple[Host, Host]) -> None:
    """The program covers host A's cgroup only: B's plain Python server gets segments carrying the
    option (seen on B's end of the veth) and answers as always; nothing on B parses it."""
    with _connected(hosts, sniff=True, context_cgroup=str(hosts[0].cgroup)) as c:
        cap = c.cap
        trace_id, span_id = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), 0x00F067AA0BA902B7
        cap.map("ctx_out").update(c.out_key, c.ctx.pack(trace_id, span_id, 1))
        assert _request(c.client) == "200"
        assert _request(c.client) == "200", "the connection goes on working after the option"
        segments = c.sniffed()
        to_b = [s for s in segments if s["dport"] == PORT_B and s["payload"] > 0]
        carrying = [s for s in to_b if any(kind == CTX_OPTION_KIND for kind, _ in s["options"])]
        assert len(to_b) >= 2 and len(carrying) == 1, segments
        (data,) = [d for kind, d in carrying[0]["options"] if kind == CTX_OPTION_KIND]
        # flags, trace id, span id (big-endian): the W3C traceparent's fields in order
        assert data == "01" + trace_id.hex() + f"{span_id:016x}"
        # beside the timestamps, within the 40 bytes
        assert [kind for kind, _ in carrying[0]["options"]] == [8, CTX_OPTION_KIND]
        assert cap.map("ctx_in").lookup(c.in_key) is None
        assert _counter(cap, "context_options_parsed") == 0 and _counter(cap, "context_options_written") >= 1


def test_a_segment_without_room_for_the_option_is_counted_and_the_request_succeeds(
        hosts: tuple[Host, Host]) -> None:
    """TCP MD5 signatures (18 bytes) beside the timestamps leave no room for 27 bytes."""
    with _connected(hosts, server_args=("--md5", "kspan-test-key", "--md5-peer", ADDR_A),
                    client_args=("--md5", "kspan-test-key")) as c:
        cap, ctx, client, key = c.cap, c.ctx, c.client, c.out_key
        cap.map("ctx_out").update(key, ctx.pack(bytes(range(1, 17)), 42))
        assert _request(client) == "200"
        assert _counter(cap, "context_options_no_room") == 1
        assert ctx.unpack(cap.map("ctx_out").lookup(key) or b"")["state"] == 2, "given up, not retried"
        assert _request(client) == "200"
        assert _counter(cap, "context_options_no_room") == 1 and _counter(cap, "context_options_written") == 0
        assert cap.map("ctx_in").lookup(c.in_key) is None


# --- the real agent ---------------------------------------------------------------------------


def _cgroup_programs(cgroup: str) -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip() or "[]")  # bpftool prints an empty line for no programs


def _holds_link_to(pid: int, prog_id: int) -> bool:
    """Whether `pid` holds a bpf_link fd of the program (its fdinfo names both)."""
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        if "link_type:" in text and f"prog_id:\t{prog_id}\n" in text:
            return True
    return False


def test_an_agent_killed_with_sigkill_leaves_no_program_on_the_cgroup(tmp_path: Path) -> None:
    require_ebpf()
    from tracer.capabilities import cgroup2_mount

    root = cgroup2_mount()
    assert root, "no cgroup v2 hierarchy"
    err_path = tmp_path / "kspan.stderr"
    # another agent on this host (a developer's, a concurrent run) may hold its own program there
    before = {p["id"] for p in _cgroup_programs(root)}
    with open(err_path, "wb") as err:
        agent = subprocess.Popen([*KSPAN, "run", "--pid", str(os.getpid()), "--quiet", "--no-metrics", "--output",
                                  str(tmp_path / "spans.jsonl")], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while "kspan: ready" not in err_path.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        assert "cross-host trace context: TCP option kind 25" in err_path.read_text()
        mine = [p["id"] for p in _cgroup_programs(root)
                if p["name"] == "kspan_tcp_context" and _holds_link_to(agent.pid, p["id"])]
        assert len(mine) == 1, _cgroup_programs(root)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        deadline = time.monotonic() + 10
        while any(p["id"] == mine[0] for p in _cgroup_programs(root)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _cgroup_programs(root)
        assert not any(p["id"] == mine[0] for p in left), left
        assert not any(p["name"].startswith("kspan") and p["id"] not in before for p in left), \
            f"a kspan program is still attached: {left}"
        gone = subprocess.run(["bpftool", "prog", "show", "id", str(mine[0])], capture_output=True, timeout=30)
        assert gone.returncode != 0, "the program itself is freed, not just detached"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


class TraceSplit(AssertionError):
    """The spans of the two hosts did not join one trace: what the kernel-fixed ids of issue 9
    (the client span's id in ctx_out, the server span's parent from ctx_in) make happen."""


def _agent_args(rx: OtlpReceiver, host: Host, pids: list[int], propagation: str = "tcp") -> list[str]:
    args = ["run", "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc", "--quiet", "--no-metrics",
            "--no-go", "--max-hold", "2", "--context-propagation", propagation, "--context-cgroup", str(host.cgroup)]
    for pid in pids:
        args += ["--pid", str(pid)]
    return args


def _host_env(host: Host) -> dict[str, str]:
    return {"OTEL_RESOURCE_ATTRIBUTES": f"host.name=host-{host.name}"}


class Chain:
    """client_a (host A) -> svc_b (host B) -> svc_a (host A), started before the agents (each agent
    traces its host's pids); the client connects only at its first request, after the agents
    are ready, so its connection is one the sock_ops program saw being established."""

    def __init__(self, tmp_path: Path, a: Host, b: Host, tls: bool) -> None:
        scheme = "https" if tls else "http"
        tls_args: list[str] = []
        if tls:
            cert, key = make_cert(tmp_path)
            tls_args = ["--cert", str(cert), "--key", str(key), "--cafile", str(cert)]
        progs = {n: str(program_copy(tmp_path, n)) for n in ("client_a", "svc_b", "svc_a")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.svc_a = self._start(a, [PY, progs["svc_a"], "serve", "--host", ADDR_A, "--port", str(PORT_A), *tls_args])
        self.svc_b = self._start(b, [PY, progs["svc_b"], "serve", "--host", ADDR_B, "--port", str(PORT_B),
                                     "--downstream", f"{scheme}://{ADDR_A}:{PORT_A}/leaf", *tls_args])
        for p in (self.svc_a, self.svc_b):
            assert read_line(p).startswith("listening")
        self.client = a.popen([PY, progs["client_a"], "client", f"{scheme}://{ADDR_B}:{PORT_B}/chain",
                               *tls_args[-2:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(self.client)
        self.a_pids = [self.client.pid, self.svc_a.pid]
        self.b_pids = [self.svc_b.pid]

    def _start(self, host: Host, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = host.popen(argv, stdout=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def requests(self, n: int) -> list[str]:
        return [_request(self.client) for _ in range(n)]

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)


def _by(spans: list[dict[str, Any]], service: str, kind: int) -> list[dict[str, Any]]:
    return sorted((s for s in spans if s["resource"].get("service.name") == service and s["kind"] == kind),
                  key=lambda s: s["start_ns"])


def _wait_chain(rx: OtlpReceiver, want: dict[tuple[str, int], int], agents: list[Any]) -> list[dict[str, Any]]:
    def done(spans: list[dict[str, Any]]) -> bool:
        return all(len(_by(spans, svc, kind)) >= n for (svc, kind), n in want.items())

    try:
        return rx.wait_for_spans(done, timeout_s=40)
    except TimeoutError:
        got = [(s["resource"].get("service.name"), s["kind"], s["resource"].get("host.name")) for s in rx.spans()]
        raise AssertionError(f"spans so far: {got}\n" + "\n".join(a.stderr[-2000:] for a in agents)) from None


N_REQUESTS = 2


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_two_agents_on_two_hosts_make_one_trace(tmp_path: Path, hosts: tuple[Host, Host], tls: bool) -> None:
    a, b = hosts
    chain = Chain(tmp_path, a, b, tls)
    try:
        with OtlpReceiver() as rx, \
                running_agent(_agent_args(rx, a, chain.a_pids), tmp_path, env=_host_env(a)) as agent_a, \
                running_agent(_agent_args(rx, b, chain.b_pids), tmp_path, env=_host_env(b)) as agent_b:
            for agent in (agent_a, agent_b):
                assert "cross-host trace context: TCP option kind 25" in agent.stderr, agent.stderr
            assert chain.requests(N_REQUESTS) == ["200"] * N_REQUESTS
            want = {("client_a", CLIENT): N_REQUESTS, ("svc_b", SERVER): N_REQUESTS, ("svc_b", CLIENT): N_REQUESTS,
                    ("svc_a", SERVER): N_REQUESTS}
            spans = _wait_chain(rx, want, [agent_a, agent_b])
        assert agent_a.returncode == 0 and agent_b.returncode == 0
    finally:
        chain.close()
    # What each agent does on its own, before and after issue 9: its spans, its host, linked within it.
    for svc, host in (("client_a", "host-a"), ("svc_a", "host-a"), ("svc_b", "host-b")):
        assert {s["resource"].get("host.name") for s in spans if s["resource"].get("service.name") == svc} == {host}
    clients_a, servers_b = _by(spans, "client_a", CLIENT), _by(spans, "svc_b", SERVER)
    clients_b, servers_a = _by(spans, "svc_b", CLIENT), _by(spans, "svc_a", SERVER)
    assert len(clients_a) == len(servers_b) == len(clients_b) == len(servers_a) == N_REQUESTS
    for server_b, client_b in zip(servers_b, clients_b, strict=True):
        assert client_b["parent_span_id"] == server_b["span_id"] and client_b["trace_id"] == server_b["trace_id"]
    # Across the hosts: only through the TCP option (the lead's ctx_out/ctx_in integration).
    for i, (ca, sb, cb, sa) in enumerate(zip(clients_a, servers_b, clients_b, servers_a, strict=True)):
        if not (sb["parent_span_id"] == ca["span_id"] and sa["parent_span_id"] == cb["span_id"]
                and ca["trace_id"] == sb["trace_id"] == cb["trace_id"] == sa["trace_id"]):
            raise TraceSplit(f"request {i}: client_a {ca['trace_id']}/{ca['span_id']} -> svc_b "
                             f"{sb['trace_id']}/{sb['parent_span_id']}; svc_b client {cb['span_id']} -> svc_a "
                             f"{sa['trace_id']}/{sa['parent_span_id']}")
    assert len({s["trace_id"] for s in clients_a}) == N_REQUESTS, "each keep-alive request is its own trace"


@pytest.mark.parametrize(("bind", "target"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")], ids=["ipv4", "ipv6"])
def test_a_call_on_loopback_is_paired_in_the_kernel_and_carries_no_option(tmp_path: Path, hosts: tuple[Host, Host],
                                                                          bind: str, target: str) -> None:
    """Both ends of a loopback connection are on this host: the server span finds its client in the
    kernel (source `peer`), so the client's request publishes no context for the TCP option and no
    segment carries one. The same agent's calls across the veth still do (the tests above)."""
    a, _ = hosts
    progs = {n: str(program_copy(tmp_path, n)) for n in ("client_a", "svc_a")}
    svc = a.popen([PY, progs["svc_a"], "serve", "--host", bind, "--port", str(PORT_A)], stdout=subprocess.PIPE)
    client = None
    try:
        assert read_line(svc).startswith("listening")
        client = a.popen([PY, progs["client_a"], "client", f"http://{target}:{PORT_A}/loop"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with OtlpReceiver() as rx, \
                running_agent(_agent_args(rx, a, [client.pid, svc.pid]), tmp_path, env=_host_env(a)) as agent:
            assert "cross-host trace context: TCP option kind 25" in agent.stderr, agent.stderr
            assert [_request(client) for _ in range(N_REQUESTS)] == ["200"] * N_REQUESTS
            spans = _wait_chain(rx, {("client_a", CLIENT): N_REQUESTS, ("svc_a", SERVER): N_REQUESTS}, [agent])
        assert agent.returncode == 0, agent.stderr
    finally:
        for p in (client, svc):
            if p is not None:
                stop(p)
    clients, servers = _by(spans, "client_a", CLIENT), _by(spans, "svc_a", SERVER)
    assert len(clients) == len(servers) == N_REQUESTS
    for c, srv in zip(clients, servers, strict=True):
        assert srv["trace_id"] == c["trace_id"] and srv["parent_span_id"] == c["span_id"]
        assert srv["attributes"]["kspan.parent.source"] == "peer"
    summary = next(line for line in agent.stderr.splitlines() if line.startswith("kspan: stopped; "))
    counts = dict(kv.split("=", 1) for kv in summary.removeprefix("kspan: stopped; ").split(", "))
    assert int(counts.get("context_options_written", 0)) == 0, summary
    assert int(counts.get("context_options_parsed", 0)) == 0, summary


def test_with_kspan_only_on_host_a_requests_succeed_and_b_spans_are_absent(
        tmp_path: Path, hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    chain = Chain(tmp_path, a, b, tls=False)
    try:
        with OtlpReceiver() as rx, \
                running_agent(_agent_args(rx, a, chain.a_pids), tmp_path, env=_host_env(a)) as agent_a:
            assert chain.requests(N_REQUESTS) == ["200"] * N_REQUESTS
            spans = _wait_chain(rx, {("client_a", CLIENT): N_REQUESTS, ("svc_a", SERVER): N_REQUESTS}, [agent_a])
            time.sleep(1)
            spans = rx.spans()
        assert agent_a.returncode == 0, agent_a.stderr
    finally:
        chain.close()
    assert {s["resource"].get("host.name") for s in spans} == {"host-a"}
    assert not [s for s in spans if s["resource"].get("service.name") == "svc_b"]
    # Host B has no sock_ops program: nothing there parsed or answered differently.
    assert not _cgroup_programs(str(b.cgroup))
    for server_a in _by(spans, "svc_a", SERVER):
        assert server_a["parent_span_id"] not in {s["span_id"] for s in spans}, "svc_b's call is not A's own"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_with_propagation_off_the_traces_split_at_the_host_boundary(
        tmp_path: Path, hosts: tuple[Host, Host], tls: bool) -> None:
    a, b = hosts
    chain = Chain(tmp_path, a, b, tls)
    try:
        with OtlpReceiver() as rx, \
                running_agent(_agent_args(rx, a, chain.a_pids, "none"), tmp_path, env=_host_env(a)) as agent_a, \
                running_agent(_agent_args(rx, b, chain.b_pids, "none"), tmp_path, env=_host_env(b)) as agent_b:
            for agent in (agent_a, agent_b):
                assert "cross-host trace context" not in agent.stderr, agent.stderr
                assert not [p for p in _cgroup_programs(str(a.cgroup)) + _cgroup_programs(str(b.cgroup))]
            assert chain.requests(N_REQUESTS) == ["200"] * N_REQUESTS
            want = {("client_a", CLIENT): N_REQUESTS, ("svc_b", SERVER): N_REQUESTS, ("svc_b", CLIENT): N_REQUESTS,
                    ("svc_a", SERVER): N_REQUESTS}
            spans = _wait_chain(rx, want, [agent_a, agent_b])
        assert agent_a.returncode == 0 and agent_b.returncode == 0
    finally:
        chain.close()
    ids = {s["span_id"] for s in spans}
    hops = [_by(spans, "client_a", CLIENT), _by(spans, "svc_b", SERVER), _by(spans, "svc_b", CLIENT),
            _by(spans, "svc_a", SERVER)]
    assert [len(h) for h in hops] == [N_REQUESTS] * 4
    for ca, sb, cb, sa in zip(*hops, strict=True):
        assert sb["trace_id"] != ca["trace_id"] and sb["parent_span_id"] not in ids
        assert cb["trace_id"] == sb["trace_id"] and cb["parent_span_id"] == sb["span_id"], "B's own link stays"
        assert sa["trace_id"] != cb["trace_id"] and sa["parent_span_id"] not in ids


def test_without_sockops_tcp_options_kspan_traces_on_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """A kernel that refuses sock_ops header options (or has no cgroup v2): the capture starts,
    every other probe attached, and one warning names the reason."""
    require_ebpf()
    from dataclasses import replace

    from tracer.capabilities import probe
    from tracer.capture import Capture, CaptureConfig, CaptureError

    caps = replace(probe(), sockops_hdr_opts=False,
                   sockops_detail="loading a sock_ops program that writes TCP options failed: Invalid argument")
    for changed in (caps, replace(probe(), cgroup2="")):
        caplog.clear()
        cap = Capture(CaptureConfig(pids={os.getpid()}), changed)
        try:
            with caplog.at_level("INFO"):
                cap.start()
        except CaptureError as exc:
            on_load_error(exc, "the capture")
        try:
            assert cap.started and cap.probes_attached > 0
            assert cap.context_propagation == "none" and not cap.has_program("kspan_tcp_context")
            warnings = [r.getMessage() for r in caplog.records if "propagation is off" in r.getMessage()]
            assert len(warnings) == 1, caplog.records
            assert ("Invalid argument" if changed is caps else "cgroup v2") in warnings[0]
        finally:
            cap.close()
