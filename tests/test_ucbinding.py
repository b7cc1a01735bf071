"""kvmharness.sim.ucbinding: the only module that reaches past unicorn's public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import unicorn

from kvmharness.errors import SimulatorError
from kvmharness.sim import ucbinding

PACKAGE = Path(__file__).resolve().parent.parent / "kvmharness"
# unicorn's private names: the Uc object's attributes, the binding's module, name-mangled ones
PRIVATE = re.compile(r"\buc\._\w|\.(_uch|_hook_exception|_callbacks|_mmio_callbacks)\b|_Uc__\w|unicorn_py3"
                     r"|[\"']_hook_exception")


def test_no_other_module_touches_unicorns_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "ucbinding.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{lineno}: {line.strip()}")
    assert offenders == []


def test_an_unsupported_unicorn_is_refused_in_one_line():
    with pytest.raises(SimulatorError) as info:
        ucbinding.check_version("2.0.1")
    message = str(info.value)
    assert "\n" not in message
    assert "unicorn 2.0.1 is installed" in message
    assert f"unicorn=={ucbinding.SUPPORTED_VERSIONS[-1]}" in message
    ucbinding.check_version(unicorn.__version__)  # the installed one passed at import


def test_a_hook_exception_survives_a_raw_run_and_is_taken_once():
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    base = 0x1000
    uc.mem_map(base, 0x1000)
    uc.mem_write(base, b"\x90\x90\x90")  # nop; nop; nop

    def hook(_uc, address, _size, _data):
        raise ValueError(f"hook at {address:#x}")

    uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    rc = ucbinding.uclib.uc_emu_start(ucbinding.raw_handle(uc), base, base + 3, 0, 0)
    assert rc == unicorn.UC_ERR_OK  # the raw call does not raise: the binding only recorded it
    pending = ucbinding.pending_hook_exception(uc)
    assert isinstance(pending, ValueError) and str(pending) == "hook at 0x1000"
    assert ucbinding.take_hook_exception(uc) is pending
    assert ucbinding.take_hook_exception(uc) is None
    ucbinding.release_engine(uc)
    assert ucbinding.pending_hook_exception(uc) is None
