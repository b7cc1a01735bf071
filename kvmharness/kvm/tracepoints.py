"""The kernel's own view of a run: KVM tracepoints read through tracefs.

``--trace`` on the kvm backend records what KVM itself saw (``kvm_exit`` with
the SVM exit code and exit info, ``kvm_cpuid``, ``kvm_msr``, ``kvm_pio``,
``kvm_mmio``, ``kvm_userspace_exit``, the nested and VMGEXIT events where the
host has them), so a trace means the same on both backends: the simulator
records the same fields from its VMCB.

It uses a private tracefs *instance* (``instances/kvmharness-<pid>``) filtered
to the vCPU thread, so the global trace buffer and anyone else's tracing are
left alone; tracefs is mounted if it is not, and unmounted again afterwards.
Needs root (or tracefs access); without it the trace says why and the run
goes on.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
EVENTS = ("kvm_exit", "kvm_cpuid", "kvm_msr", "kvm_pio", "kvm_mmio", "kvm_userspace_exit",
          "kvm_hypercall", "kvm_nested_vmrun", "kvm_nested_vmenter", "kvm_nested_vmexit",
          "kvm_nested_vmexit_inject", "kvm_vmgexit_enter", "kvm_vmgexit_exit",
          "kvm_vmgexit_msr_protocol_enter", "kvm_vmgexit_msr_protocol_exit", "kvm_inj_exception")

# kvm_exit prints SVM exit reasons symbolically; map them back to codes (docs/facts.md#facts-6)
SVM_EXIT_NAMES = {
    "read_cr0": 0x0, "read_cr3": 0x3, "read_cr4": 0x4, "read_cr8": 0x8, "write_cr0": 0x10,
    "write_cr3": 0x13, "write_cr4": 0x14, "write_cr8": 0x18, "read_dr7": 0x27, "write_dr7": 0x37,
    "DE excp": 0x40, "DB excp": 0x41, "BP excp": 0x43, "UD excp": 0x46, "NM excp": 0x47,
    "DF excp": 0x48, "GP excp": 0x4D, "PF excp": 0x4E, "AC excp": 0x51, "MC excp": 0x52,
    "interrupt": 0x60, "nmi": 0x61, "smi": 0x62, "init": 0x63, "vintr": 0x64,
    "cr0_sel_write": 0x65, "rdtsc": 0x6E, "rdpmc": 0x6F, "pushf": 0x70, "popf": 0x71,
    "cpuid": 0x72, "rsm": 0x73, "iret": 0x74, "swint": 0x75, "invd": 0x76, "pause": 0x77,
    "hlt": 0x78, "invlpg": 0x79, "invlpga": 0x7A, "io": 0x7B, "msr": 0x7C, "task_switch": 0x7D,
    "ferr_freeze": 0x7E, "shutdown": 0x7F, "vmrun": 0x80, "hypercall": 0x81, "vmload": 0x82,
    "vmsave": 0x83, "stgi": 0x84, "clgi": 0x85, "skinit": 0x86, "rdtscp": 0x87, "icebp": 0x88,
    "wbinvd": 0x89, "monitor": 0x8A, "mwait": 0x8B, "xsetbv": 0x8D, "write_efer_trap": 0x8F,
    "write_cr0_trap": 0x90, "write_cr4_trap": 0x94, "write_cr8_trap": 0x98, "invpcid": 0xA2,
    "buslock": 0xA5, "idle-halt": 0xA6, "npf": 0x400, "avic_incomplete_ipi": 0x401,
    "avic_unaccelerated_access": 0x402, "vmgexit": 0x403, "invalid_guest_state": -1,
}

_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>[\d.]+):"
                   r"\s+(?P<event>\w+):\s?(?P<body>.*)$")
_KVM_EXIT = re.compile(r"vcpu (?P<vcpu>\d+) reason (?P<reason>.+?) rip 0x(?P<rip>[0-9a-f]+) "
                       r"info1 0x(?P<info1>[0-9a-f]+) info2 0x(?P<info2>[0-9a-f]+)")
_HEX_FIELD = re.compile(r"(\w+) (?:0x)?([0-9a-fA-F]+)\b")


@dataclass
class TraceEvent:
    """One tracepoint hit: its name, timestamp and the fields it printed."""

    event: str
    timestamp: float
    text: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int | None:
        """For kvm_exit on an SVM host: the SVM exit code (docs/facts.md#facts-6)."""
        code: int | None = self.fields.get("exit_code")
        return code

    def __str__(self) -> str:
        return f"{self.timestamp:.6f} {self.event}: {self.text}"


def parse_trace(text: str) -> list[TraceEvent]:
    events: list[TraceEvent] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        body = m.group("body").strip()
        ev = TraceEvent(m.group("event"), float(m.group("ts")), body)
        if ev.event == "kvm_exit":
            k = _KVM_EXIT.search(body)
            if k:
                reason = k.group("reason").strip()
                ev.fields = {"vcpu": int(k.group("vcpu")), "reason": reason,
                             "exit_code": SVM_EXIT_NAMES.get(reason),
                             "rip": int(k.group("rip"), 16), "info1": int(k.group("info1"), 16),
                             "info2": int(k.group("info2"), 16)}
        elif ev.event == "kvm_cpuid":
            parts = dict(_HEX_FIELD.findall(body))
            ev.fields = {k: int(v, 16) for k, v in parts.items() if k in ("func", "idx", "rax", "rbx", "rcx", "rdx")}
        elif ev.event == "kvm_pio":
            m2 = re.search(r"pio_(read|write) at 0x([0-9a-f]+) size (\d+) count (\d+)", body)
            if m2:
                ev.fields = {"direction": m2.group(1), "port": int(m2.group(2), 16),
                             "size": int(m2.group(3)), "count": int(m2.group(4))}
        elif ev.event == "kvm_userspace_exit":
            m2 = re.search(r"reason (\w+) \((\d+)\)", body)
            if m2:
                ev.fields = {"reason": m2.group(1), "code": int(m2.group(2))}
        elif ev.event == "kvm_msr":
            m2 = re.search(r"msr_(read|write) ([0-9a-f]+) = 0x([0-9a-f]+)", body)
            if m2:
                ev.fields = {"direction": m2.group(1), "index": int(m2.group(2), 16),
                             "value": int(m2.group(3), 16)}
        events.append(ev)
    return events


class KvmTracepoints:
    """Context manager: record KVM tracepoints of the calling thread while active."""

    def __init__(self, events: Iterable[str] = EVENTS, tid: int | None = None) -> None:
        self.wanted = tuple(events)
        self.tid = tid or threading.get_native_id()
        self.root: Path | None = None
        self.instance: Path | None = None
        self.enabled: list[str] = []
        self._mounted = False
        self.error: str | None = None
        self.events: list[TraceEvent] = []

    def _find_tracefs(self) -> Path | None:
        for p in TRACEFS_CANDIDATES:
            if (p / "instances").is_dir():
                return p
        p = TRACEFS_CANDIDATES[0]
        if p.is_dir() and os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(p)], capture_output=True, text=True)
            if r.returncode == 0 and (p / "instances").is_dir():
                self._mounted = True
                return p
        return None

    def __enter__(self) -> KvmTracepoints:
        try:
            self.root = self._find_tracefs()
            if self.root is None:
                self.error = "tracefs is not available (not mounted and cannot be mounted: needs root)"
                return self
            self.instance = self.root / "instances" / f"kvmharness-{os.getpid()}-{self.tid}"
            self.instance.mkdir()
            (self.instance / "set_event_pid").write_text(str(self.tid))
            for ev in self.wanted:
                enable = self.instance / "events" / "kvm" / ev / "enable"
                if enable.exists():
                    enable.write_text("1")
                    self.enabled.append(ev)
            if not self.enabled:
                self.error = "this kernel has none of the KVM tracepoints"
        except OSError as e:
            self.error = f"cannot set up KVM tracing: {e.strerror or e}"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.instance is not None and self.instance.exists():
                self.events = parse_trace((self.instance / "trace").read_text())
                for ev in self.enabled:
                    (self.instance / "events" / "kvm" / ev / "enable").write_text("0")
                self.instance.rmdir()
        except OSError as e:
            self.error = self.error or f"reading the KVM trace failed: {e.strerror or e}"
        finally:
            if self._mounted and self.root is not None:
                subprocess.run(["umount", str(self.root)], capture_output=True)
