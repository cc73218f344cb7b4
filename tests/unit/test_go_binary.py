"""tracer/go_binary.py on real Go executables built here by each supported toolchain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.support.agent import go_binary
from tracer import go_binary as gb

GOSRC = Path(__file__).resolve().parents[1] / "support" / "gosrc"
VERSIONS = ("1.21", "1.23", "1.25", "1.27")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gobin")
    return {v: go_binary(GOSRC, out / f"chain-{v}", v) for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
def test_version_functions_rets_and_offsets(built: dict[str, Path], version: str) -> None:
    info = gb.inspect(str(built[version]))
    assert info is not None
    assert info.version.text.startswith(f"go{version}")
    assert (info.version.major, info.version.minor) == tuple(int(x) for x in version.split("."))
    assert info.has_dwarf and info.has_symtab and info.offsets_source == "dwarf"
    assert set(info.functions) == set(gb.WANTED_FUNCTIONS), info.problems
    with open(built[version], "rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".text")
        for fn in info.functions.values():
            assert fn.returns, fn.name
            for ret in fn.returns:
                assert fn.address <= ret < fn.address + fn.size
                # Each address really holds a RET (0xc3) byte.
                f.seek(text["sh_offset"] + ret - text["sh_addr"])
                assert f.read(1) == b"\xc3", (fn.name, hex(ret))
    assert info.missing_offsets() == []
    # The table used for binaries without DWARF must say what this toolchain's DWARF says.
    assert gb.KNOWN_OFFSETS[(info.version.major, info.version.minor)] == info.offsets


def test_pclntab_agrees_with_symtab(built: dict[str, Path]) -> None:
    with open(built["1.27"], "rb") as f:
        elf = ELFFile(f)
        from_pcln = gb.pclntab_functions(elf, gb.WANTED_FUNCTIONS)
        symtab = elf.get_section_by_name(".symtab")
        for name in gb.WANTED_FUNCTIONS:
            sym = symtab.get_symbol_by_name(name)[0]
            addr, size = from_pcln[name]
            # The pclntab size runs to the next function, so it includes the alignment padding.
            assert addr == sym["st_value"] and sym["st_size"] <= size < sym["st_size"] + 64, name


def test_stripped_binary_uses_pclntab_and_known_offsets(built: dict[str, Path], tmp_path: Path) -> None:
    stripped = tmp_path / "chain-stripped"
    shutil.copy(built["1.27"], stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    info = gb.inspect(str(stripped))
    assert info is not None
    assert not info.has_symtab and not info.has_dwarf
    assert set(info.functions) == set(gb.WANTED_FUNCTIONS)
    full = gb.inspect(str(built["1.27"]))
    assert full is not None
    assert {n: f.returns for n, f in info.functions.items()} == {n: f.returns for n, f in full.functions.items()}
    assert info.offsets_source == "known:go1.27"
    assert any("no DWARF" in p for p in info.problems)


def test_unknown_version_without_dwarf_is_reported(built: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    stripped = tmp_path / "chain-stripped"
    shutil.copy(built["1.21"], stripped)
    subprocess.run(["strip", "--strip-debug", str(stripped)], check=True)
    monkeypatch.setattr(gb, "KNOWN_OFFSETS", {})
    info = gb.inspect(str(stripped))
    assert info is not None and info.offsets == {} and info.offsets_source == "none"
    assert any("socket-level capture only" in p for p in info.problems)


def test_not_go(tmp_path: Path) -> None:
    assert gb.inspect("/bin/true") is None
    assert gb.go_version("/bin/true") is None
    text = tmp_path / "x.txt"
    text.write_text("hello")
    assert gb.inspect(str(text)) is None
    with pytest.raises(gb.GoBinaryError):
        gb.inspect(str(tmp_path / "missing"))


def test_version_parse() -> None:
    assert gb.GoVersion.parse("go1.22.0").minor == 22
    assert gb.GoVersion.parse("go1.23rc1").minor == 23
    assert gb.GoVersion.parse("devel go1.28-abcdef Tue").minor == 28
    assert gb.GoVersion.parse("garbage") == gb.GoVersion("garbage", 0, 0)
