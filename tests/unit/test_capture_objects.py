"""What tracer/capture.py must agree on with bpf/: the counter order and the object load order."""

from __future__ import annotations

import re
from pathlib import Path

from tracer.capture import COUNTER_NAMES, OPTIONAL_FAMILIES, TCP_CONTEXT, UPROBE_EXCHANGE, object_names

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "http_exchange.h"


def test_counter_names_follow_the_kernel_enum() -> None:
    enum = re.search(r"enum kspan_counter \{(.*?)\};", HEADER.read_text(), re.S)
    assert enum is not None
    values = {name: int(v) for name, v in re.findall(r"KSPAN_CNT_(\w+) = (\d+)", enum.group(1))}
    counters = sorted((v, name) for name, v in values.items() if name != "MAX")
    assert [v for v, _ in counters] == list(range(len(counters)))
    assert values["MAX"] == len(counters) == len(COUNTER_NAMES)
    # pairwise, in order: the kernel's name and the user-space name share a word, so a counter
    # added on one side only shifts every later pair and fails here
    for (_, kernel), user in zip(counters, COUNTER_NAMES, strict=True):
        stems = {w[:4] for w in kernel.lower().split("_")}
        assert stems & {w[:4] for w in user.split("_")}, (kernel, user)


def test_uprobe_exchange_loads_before_the_uprobe_families_and_only_with_them() -> None:
    assert UPROBE_EXCHANGE not in object_names("tracepoints", [])
    for family in OPTIONAL_FAMILIES:
        names = object_names("kprobes", [family])
        assert names.index(UPROBE_EXCHANGE) < names.index(family)
    names = object_names("fentry", list(OPTIONAL_FAMILIES))
    assert names == ["sockets_fentry", "process", "tcp_events", UPROBE_EXCHANGE, *OPTIONAL_FAMILIES]


def test_the_tcp_context_object_loads_last_and_only_when_asked() -> None:
    assert TCP_CONTEXT not in object_names("tracepoints", [])
    assert object_names("tracepoints", ["openssl"], context=True)[-1] == TCP_CONTEXT
    assert object_names("fentry", [], context=True) == ["sockets_fentry", "process", "tcp_events", TCP_CONTEXT]


def test_self_endpoint_keys_are_the_kernels_endpoint_layout() -> None:
    from tracer.capture import _endpoint_key, _local_addresses

    key = _endpoint_key("127.0.0.1", 9464)
    assert len(key) == 20 and key[:12] == b"\0" * 10 + b"\xff\xff" and key[12:16] == bytes([127, 0, 0, 1])
    assert key[16:18] == (9464).to_bytes(2, "little")
    assert _endpoint_key("::1", 1)[:16] == b"\0" * 15 + b"\1"
    assert _local_addresses("10.1.2.3") == ["10.1.2.3"] and _local_addresses("[::1]") == ["::1"]
    wildcard = _local_addresses("0.0.0.0")
    assert {"127.0.0.1", "::1"} <= set(wildcard)
