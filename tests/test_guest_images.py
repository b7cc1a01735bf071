"""Guest images: the shipped binaries are what their sources build to, the
manifest agrees with the files, and the assembler reads ucall.h exactly as
``kvmharness.protocol`` does.  No device needed; the build tests need GNU
binutils and cpp and skip, saying so, where they are absent.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from kvmharness import protocol
from kvmharness.images import EXPECTS, MODES, NEEDS, load_manifest, parse_size

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "guests"
INCLUDE = GUESTS / "include"


def _load_build_module():
    # guests/ is the package kvmharness.guests only once installed; load the
    # build script by path so the tests also run from a plain checkout.
    spec = importlib.util.spec_from_file_location("kvmharness_guests_build", GUESTS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()

def _missing_toolchain() -> str:
    missing = []
    if any(shutil.which(tool) is None for tool in ("as", "ld", "objcopy")):
        missing.append("GNU binutils (as, ld, objcopy)")
    if shutil.which("cpp") is None:
        missing.append("the C preprocessor (cpp)")
    return " and ".join(missing) + " not installed" if missing else ""


requires_toolchain = pytest.mark.skipif(bool(_missing_toolchain()), reason=_missing_toolchain())

MANIFEST_RAW = tomllib.loads((GUESTS / "manifest.toml").read_text())["guest"]
SOURCES = {p.stem: p for p in sorted((GUESTS / "src").glob("*.S"))}
IMAGES = {p.stem: p for p in sorted((GUESTS / "bin").glob("*.bin"))}


# --- (a) the shipped images are reproducible --------------------------------

@requires_toolchain
def test_rebuilt_images_equal_shipped(tmp_path):
    proc = subprocess.run([sys.executable, str(GUESTS / "build.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rebuilt = {p.stem: p.read_bytes() for p in tmp_path.glob("*.bin")}
    assert sorted(rebuilt) == sorted(SOURCES)
    shipped = {name: path.read_bytes() for name, path in IMAGES.items()}
    differing = [name for name in rebuilt if rebuilt[name] != shipped.get(name)]
    assert not differing, f"shipped images out of date (run python guests/build.py): {differing}"


@requires_toolchain
def test_check_mode_passes_on_shipped_images():
    proc = subprocess.run([sys.executable, str(GUESTS / "build.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"({len(SOURCES)} checked)" in proc.stdout


@requires_toolchain
def test_check_mode_reports_a_stale_image(tmp_path, monkeypatch):
    for path in IMAGES.values():
        shutil.copy(path, tmp_path / path.name)
    stale = tmp_path / "hello.bin"
    data = bytearray(stale.read_bytes())
    data[0] ^= 0xFF
    stale.write_bytes(bytes(data))
    (tmp_path / "orphan.bin").write_bytes(b"\xf4")
    monkeypatch.setattr(build, "BIN_DIR", tmp_path)
    problems = build.check()
    assert len(problems) == 2, problems
    assert problems[0].startswith("hello.bin: shipped image differs")
    assert problems[1].startswith("orphan.bin: shipped image has no source")


def test_build_names_missing_tools_and_their_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no tools at all
    assert sorted(build.missing_tools()) == ["as", "cpp", "ld", "objcopy"]
    assert build.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "as, ld, objcopy" in err and "apt-get install binutils cpp" in err
    assert not (tmp_path / "out").exists()


# --- guest.h: the macros emit what the contract says ------------------------

def _assemble(tmp_path: Path, text: str) -> bytes:
    source = tmp_path / "probe.S"
    source.write_text(text)
    return build.build_image(source, tmp_path / "probe.bin").read_bytes()


@requires_toolchain
def test_fail_macro_passes_code_and_its_own_source_line(tmp_path):
    image = _assemble(tmp_path, "#define GUEST_MODE_LONG64\n"   # line 1
                                "#include \"guest.h\"\n"        # line 2
                                "GUEST_ENTRY\n"                 # line 3
                                "        nop\n"                 # line 4
                                "        FAIL(0x55)\n")         # line 5
    expected = (b"\x90"
                + b"\x48\xc7\xc3" + struct.pack("<I", 0x55)     # mov $0x55, %rbx
                + b"\x48\xc7\xc1" + struct.pack("<I", 5)        # mov $5, %rcx
                + bytes([0xB0, protocol.UCALL_FAIL, 0xE6, protocol.UCALL_PORT]))
    assert image.startswith(expected), image.hex()


@requires_toolchain
def test_real_mode_report_uses_32_bit_registers(tmp_path):
    image = _assemble(tmp_path, "#define GUEST_MODE_REAL\n#include \"guest.h\"\nGUEST_ENTRY\n"
                                "        REPORT($0x12345678, $0x9abcdef0)\n")
    expected = (b"\x66\xb9" + struct.pack("<I", 0x9ABCDEF0)     # mov $..., %ecx
                + b"\x66\xbb" + struct.pack("<I", 0x12345678)   # mov $..., %ebx
                + bytes([0xB0, protocol.UCALL_REPORT, 0xE6, protocol.UCALL_PORT]))
    assert image.startswith(expected), image.hex()


@requires_toolchain
def test_guest_without_a_mode_is_refused(tmp_path):
    with pytest.raises(build.BuildError, match="GUEST_MODE_REAL or GUEST_MODE_LONG64"):
        _assemble(tmp_path, "#include \"guest.h\"\nGUEST_ENTRY\n        hlt\n")


@requires_toolchain
def test_entry_must_be_the_first_byte(tmp_path):
    # Code before GUEST_ENTRY would move _start off the load address: the
    # linker script's ASSERT stops the build.
    with pytest.raises(build.BuildError, match="_start must be the first byte"):
        _assemble(tmp_path, "#define GUEST_MODE_LONG64\n#include \"guest.h\"\n"
                            "        .section .text.entry, \"ax\"\n        nop\n"
                            "        .text\n        .globl _start\n_start: hlt\n")


# --- (b) manifest, sources and images agree ---------------------------------

def test_every_guest_has_a_source_an_image_and_an_entry():
    assert sorted(MANIFEST_RAW) == sorted(SOURCES) == sorted(IMAGES)


def test_manifest_loads_with_the_harness_validator():
    guests = load_manifest(GUESTS / "manifest.toml")
    assert sorted(guests) == sorted(MANIFEST_RAW)
    for guest in guests.values():
        assert guest.load() == IMAGES[guest.name].read_bytes()  # load() checks the size too


@pytest.mark.parametrize("name", sorted(MANIFEST_RAW))
def test_manifest_entry_is_valid(name):
    entry = MANIFEST_RAW[name]
    assert entry["mode"] in MODES
    assert entry["expect"] in EXPECTS
    assert set(entry["needs"]) <= set(NEEDS)
    assert entry["timeout"] > 0
    assert entry["description"].strip()
    memory = parse_size(entry["memory"], what=name)
    size = IMAGES[name].stat().st_size
    assert 0 < size and protocol.GUEST_LOAD_ADDR + size <= memory
    if entry["mode"] == "real":
        # CS=0 and a 16-bit IP: the whole image must sit in the first 64 KiB.
        assert protocol.GUEST_LOAD_ADDR + size <= 0x10000
    if entry.get("user_msrs"):
        assert "user-msr-exits" in entry["needs"]
    for override in entry.get("cpuid", []):
        assert set(override) == {"function", "index", "eax", "ebx", "ecx", "edx"}
        assert all(0 <= value < 1 << 32 for value in override.values())


@pytest.mark.parametrize("name", sorted(MANIFEST_RAW))
def test_source_declares_the_manifest_mode(name):
    text = SOURCES[name].read_text()
    modes = re.findall(r"^#define GUEST_MODE_(REAL|LONG64)\b", text, re.MULTILINE)
    assert modes == [MANIFEST_RAW[name]["mode"].upper()]
    assert re.search(r"^GUEST_ENTRY\b", text, re.MULTILINE), "the entry point must be GUEST_ENTRY"


def test_linker_script_loads_at_guest_load_addr():
    script = (GUESTS / "flat.ld").read_text()
    assert re.findall(r"^\s*\.\s*=\s*(0x[0-9a-fA-F]+)\s*;", script, re.MULTILINE) == [
        hex(protocol.GUEST_LOAD_ADDR)]


# --- (c) the assembler and kvmharness.protocol read ucall.h alike -----------

def test_protocol_parses_every_define_of_ucall_h():
    text = (INCLUDE / "ucall.h").read_text()
    valued = re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+\S", text, re.MULTILINE)
    assert valued and sorted(valued) == sorted(protocol.CONSTANTS)


@requires_toolchain
def test_assembler_sees_the_values_protocol_parses(tmp_path):
    names = sorted(protocol.CONSTANTS)
    probe = ["#include \"ucall.h\"", "        .section .text.entry, \"a\"",
             "        .globl _start", "_start:"]
    probe += [f"        .quad {name}" for name in names]
    image = _assemble(tmp_path, "\n".join(probe) + "\n")
    assembled = dict(zip(names, struct.unpack(f"<{len(names)}Q", image)))
    print(f"checked {len(names)} ucall.h constants")
    assert assembled == protocol.CONSTANTS
