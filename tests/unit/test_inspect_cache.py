"""The Go inspection cache: a cheap not-Go answer, a round trip, and no stale or foreign entry read."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.agent import go_binary
from tracer import go_binary as gb
from tracer import inspect_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("KSPAN_CACHE_DIR", str(d))
    return d


def test_non_go_executables_are_known_without_inspection() -> None:
    for exe in ("/bin/sh", "/usr/bin/python3", shutil.which("curl") or "/bin/ls"):
        assert inspect_cache.is_go_executable(os.path.realpath(exe)) is False, exe
    assert inspect_cache.is_go_executable("/etc/hostname") is False


def test_round_trip_and_invalidation(tmp_path: Path, cache: Path) -> None:
    binary = go_binary(ROOT / "tests" / "support" / "gochain", tmp_path / "svc")
    assert inspect_cache.is_go_executable(str(binary))
    assert isinstance(inspect_cache.load(str(binary)), inspect_cache.Missing)
    fresh = inspect_cache.inspect_and_store(str(binary))
    assert isinstance(fresh, gb.GoBinary)
    again = inspect_cache.load(str(binary))
    assert isinstance(again, gb.GoBinary)
    assert again.functions == fresh.functions and again.offsets == fresh.offsets
    assert again.version == fresh.version
    # the file changes: the old entry is never read for it
    with open(binary, "ab") as f:
        f.write(b"\0" * 16)
    assert isinstance(inspect_cache.load(str(binary)), inspect_cache.Missing)


def test_entries_writable_by_others_are_not_read(tmp_path: Path, cache: Path) -> None:
    exe = tmp_path / "true_copy"
    shutil.copy("/bin/true", exe)
    inspect_cache.store(str(exe), None)
    entry = next(cache.glob("go-*.pickle"))
    assert inspect_cache.load(str(exe)) is None  # stored "not Go"
    entry.chmod(0o666)
    assert isinstance(inspect_cache.load(str(exe)), inspect_cache.Missing)
    assert (cache.stat().st_mode & 0o777) == 0o700
