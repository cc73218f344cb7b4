import os
from pathlib import Path

import pytest

from tracer.processes import ProcessTable, service_name_from_cmdline


@pytest.mark.parametrize(
    ("exe", "argv", "want"),
    [
        ("python3.11", ["python3", "/srv/app/svc_a.py", "8080"], "svc_a"),
        ("python3.11", ["python3", "-u", "-W", "ignore", "worker.py"], "worker"),
        ("python3.11", ["python3", "-m", "http.server", "8000"], "http.server"),
        ("node", ["node", "--require", "x", "server.js"], "server"),
        ("java", ["java", "-Xmx1g", "-jar", "/opt/orders.jar"], "orders"),
        ("nginx", ["nginx: worker process"], "nginx"),
        ("goa", ["/tmp/goa", "-listen", ":1"], "goa"),
        ("python3.11", ["python3"], "python3.11"),
    ],
)
def test_service_name_is_script_for_interpreters_else_executable(exe: str, argv: list[str], want: str) -> None:
    assert service_name_from_cmdline(exe, argv) == want


def test_process_table_reads_proc_of_a_real_process() -> None:
    table = ProcessTable()
    info = table.get(os.getpid())
    assert info.pid == os.getpid()
    assert info.executable_name.startswith("python")
    assert "pytest" in info.command_line
    assert info.attributes["host.name"]


def test_process_table_uses_extra_metadata_and_override(tmp_path: Path) -> None:
    proc = tmp_path / "proc" / "4242"
    proc.mkdir(parents=True)
    (proc / "cmdline").write_bytes(b"/usr/bin/python3\0/app/orders.py\0")
    (proc / "comm").write_text("python3\n")
    table = ProcessTable(proc_root=str(tmp_path / "proc"),
                         extra=lambda pid: ("orders-svc", {"k8s.pod.name": "orders-1"}))
    info = table.get(4242)
    assert info.service_name == "orders-svc"
    assert info.attributes["k8s.pod.name"] == "orders-1"
    assert info.command_line == "/usr/bin/python3 /app/orders.py"
    forced = ProcessTable(proc_root=str(tmp_path / "proc"), service_name_override="forced")
    assert forced.get(4242).service_name == "forced"


def test_process_table_is_bounded_and_forgets(tmp_path: Path) -> None:
    table = ProcessTable(proc_root=str(tmp_path), max_entries=3)
    for pid in range(10):
        table.get(pid + 1)  # vanished processes still get a usable resource
    assert len(table._cache) == 3
    assert table.get(10).service_name == "pid-10"
    table.forget(10)
    assert 10 not in table._cache


def test_a_process_gone_before_its_first_span_keeps_its_exec_name(tmp_path: Path) -> None:
    table = ProcessTable(proc_root=str(tmp_path))
    table.note_exec(777, "curl")  # /proc/777 does not exist: the process already exited
    info = table.get(777)
    assert info.service_name == "curl"
    assert info.executable_name == "curl"
