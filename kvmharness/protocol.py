"""The guest <-> host contract: ports, ucall ops and the guest memory map.

Declared once, in ``guests/include/ucall.h``; guest assembly includes that file
and this module parses the same ``#define`` lines, so the two cannot drift
(``tests/test_guest_images.py`` assembles a probe to prove it).
"""

from __future__ import annotations

import re
from pathlib import Path

from .datafiles import data_path

_DEFINE = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0[xX][0-9a-fA-F]+|\d+)\b")


def header_path() -> Path:
    """Where ucall.h lives (installed package data, or the source tree)."""
    return data_path("guests", "include/ucall.h")


def parse_header(text: str) -> dict[str, int]:
    """Every ``#define NAME <integer>`` line of the header, as name -> value."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _DEFINE.match(line.strip())
        if m:
            out[m.group(1)] = int(m.group(2), 0)
    return out


CONSTANTS: dict[str, int] = parse_header(header_path().read_text())

CONSOLE_PORT = CONSTANTS["CONSOLE_PORT"]
UCALL_PORT = CONSTANTS["UCALL_PORT"]
BENCH_PORT = CONSTANTS["BENCH_PORT"]
UCALL_REPORT = CONSTANTS["UCALL_REPORT"]
UCALL_DONE = CONSTANTS["UCALL_DONE"]
UCALL_FAIL = CONSTANTS["UCALL_FAIL"]
UCALL_EXCEPTION = CONSTANTS["UCALL_EXCEPTION"]
GUEST_LOAD_ADDR = CONSTANTS["GUEST_LOAD_ADDR"]
BOOT_PML4 = CONSTANTS["BOOT_PML4"]
BOOT_PDPT = CONSTANTS["BOOT_PDPT"]
BOOT_PD0 = CONSTANTS["BOOT_PD0"]
BOOT_PD3 = CONSTANTS["BOOT_PD3"]
BOOT_GDT = CONSTANTS["BOOT_GDT"]
BOOT_IDT = CONSTANTS["BOOT_IDT"]
BOOT_STUBS = CONSTANTS["BOOT_STUBS"]
KERNEL_CS = CONSTANTS["KERNEL_CS"]
KERNEL_DS = CONSTANTS["KERNEL_DS"]
MMIO_TEST_ADDR = CONSTANTS["MMIO_TEST_ADDR"]

UCALL_NAMES = {UCALL_REPORT: "report", UCALL_DONE: "done", UCALL_FAIL: "fail",
               UCALL_EXCEPTION: "exception"}

EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                   8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                   17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 28: "#HV", 29: "#VC",
                   30: "#SX"}

#: vectors whose exception frame carries an error code
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
