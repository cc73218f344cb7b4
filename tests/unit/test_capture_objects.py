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
    # the newest ones, appended last on both sides, pin the order
    assert [n for _, n in counters[-6:]] == ["TAIL_CALL_MISSED", "AMBIGUOUS", "CTX_WRITTEN", "CTX_NO_ROOM",
                                            "CTX_PARSED", "CTX_MALFORMED"]
    assert COUNTER_NAMES[-6:] == ["exchange_tail_call_missed", "ambiguous_parent_requests", "context_options_written",
                                  "context_options_no_room", "context_options_parsed", "context_options_malformed"]


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
