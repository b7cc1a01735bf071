"""The es-* guests: built images, manifest entries, and each guest run end to end against the
VMGEXIT model on a minimal SEV-ES CPU made from unicorn (test-only).

The simulator backend will run these guests for real once its KVM layer calls
kvmharness.sev.vmgexit; until then, :class:`MiniSevEsCpu` checks that the guest code
(guests/include/sev_es.h) and the model agree: unicorn executes the guest, and the
SEV-ES-specific events are modelled here as the hardware does them -- CPUID raises #VC
(error code 0x72) through the guest's IDT, IRETQ returns from it, RDMSR/WRMSR of the GHCB
MSR are not intercepted, VMGEXIT (F3 0F 01 D9) hands the GHCB MSR to the KVM model, and
userspace sees only the exits the model produces (ucalls read RBX/RCX from KVM's register
cache, i.e. from what the guest exposed in the GHCB).  By default unicorn runs these guests with
paging off (its x86-64 default), so the C-bit in the guest's page tables plays no part;
``paging=True`` turns on the harness's long-mode paging, and the guests then run on their
own page tables (sev_es.h) -- which only works with a C-bit position the engine's MMU
ignores: unicorn's EPYC model has 40 physical address bits, so PTE bits 40-51 are reserved
(a C-bit of 47 or 51 faults) while bits 52-58 are ignored.
"""

from __future__ import annotations

import re
import struct

import pytest

from kvmharness import exits as X
from kvmharness import protocol as P
from kvmharness.boot import long_mode_state, long_mode_tables
from kvmharness.images import get_guest, guests_dir
from kvmharness.sev.ghcb import GhcbMsr
from kvmharness.sev.vmgexit import SevEsVmgexitHandler
from kvmharness.x86 import CpuidEntry, CpuidTable

ES_GUESTS = ("es-cpuid-msr", "es-cpuid-ghcb", "es-io", "es-terminate")
LEAVES = (0x0, 0x1, 0x7, 0x80000000, 0x80000001, 0x80000008, 0x8000000A, 0x8000001F, 0x40000000)
MEMORY = 2 << 20
VMGEXIT = b"\xF3\x0F\x01\xD9"
MSR_SEV_ES_GHCB = 0xC0010130


def base_table() -> CpuidTable:
    """Distinct values for every leaf the guests read (0x80000008 absent: reads as zeros)."""
    entries = [CpuidEntry(f, 0, 0, (f ^ 0x11) & 0xFFFFFFFF, (f + 1) & 0xFFFFFFFF,
                          (f * 3) & 0xFFFFFFFF, (~f) & 0xFFFFFFFF)
               for f in LEAVES if f != 0x80000008]
    return CpuidTable(entries)


# -- images and manifest ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ES_GUESTS)
def test_manifest_entries(name):
    g = get_guest(name)
    assert g.mode == "long64" and "sev-es" in g.needs
    assert g.modes == ("sev-es",)  # the host is probed, not written down (issue 11.1)
    data = g.load()
    assert P.GUEST_LOAD_ADDR + len(data) <= 0x10000  # below sev_es.h's page tables
    assert VMGEXIT in data


def test_shipped_images_match_a_rebuild():
    build = pytest.importorskip("guests.build", reason="guests/build.py is not importable")
    if build.missing_tools():
        pytest.skip(f"cannot rebuild guest images: {build.missing_tools()} not installed")
    assert build.check(list(ES_GUESTS)) == []


def test_no_guest_registers_its_ghcb_gpa():
    """KVM terminates a non-SNP guest that sends the register-GPA request (0x012); the
    end-to-end runs below also check the MSR requests actually sent."""
    sources = [guests_dir() / "src" / f"{n}.S" for n in ES_GUESTS]
    for path in sources + [guests_dir() / "include" / "sev_es.h"]:
        code = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.DOTALL)  # drop comments
        assert "0x012" not in code and "REG_GPA" not in code, path.name


# -- the mini SEV-ES CPU ---------------------------------------------------------------------

class MiniSevEsCpu:
    """Unicorn plus the SEV-ES events the guests use; userspace side like Machine's."""

    def __init__(self, name: str, table: CpuidTable, *, ghcb_version: int = 2, c_bit: int = 51,
                 paging: bool = False):
        import unicorn
        from unicorn import x86_const as R
        self.R = R
        self.image = get_guest(name)
        uc = self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(0, MEMORY)
        for gpa, blob in long_mode_tables().items():
            uc.mem_write(gpa, blob)
        uc.mem_write(P.GUEST_LOAD_ADDR, self.image.load())
        regs, sregs = long_mode_state(MEMORY)
        uc.reg_write(R.UC_X86_REG_RSP, regs.rsp)
        uc.reg_write(R.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(R.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        if paging:  # the harness's long-mode paging, then the guest's own tables after es_init
            uc.msr_write(0xC0000080, sregs.efer)
            uc.reg_write(R.UC_X86_REG_CR3, sregs.cr3)
            uc.reg_write(R.UC_X86_REG_CR4, uc.reg_read(R.UC_X86_REG_CR4) | sregs.cr4)
            uc.reg_write(R.UC_X86_REG_CR0, sregs.cr0)
        self.msrs = {m: 0 for m in self.image.user_msrs}
        self.kvm = SevEsVmgexitHandler(cpuid=table, read_guest=self._read, write_guest=self._write,
                                       ghcb_version=ghcb_version, c_bit=c_bit,
                                       user_msrs=self.image.user_msrs)
        self.ghcb_msr = self.kvm.reset_ghcb_msr()
        self.reports, self.console, self.exits, self.traces = [], "", [], []
        self.vc_count = 0
        self.outcome = None
        self.final = None
        uc.hook_add(unicorn.UC_HOOK_CODE, self._step)

    def _read(self, gpa, n):
        if gpa < 0 or gpa + n > MEMORY:
            raise ValueError("unbacked")
        return bytes(self.uc.mem_read(gpa, n))

    def _write(self, gpa, data):
        if gpa < 0 or gpa + len(data) > MEMORY:
            raise ValueError("unbacked")
        self.uc.mem_write(gpa, bytes(data))

    def reg(self, name):
        return self.uc.reg_read(getattr(self.R, f"UC_X86_REG_{name.upper()}"))

    def set(self, name, value):
        self.uc.reg_write(getattr(self.R, f"UC_X86_REG_{name.upper()}"), value & (2 ** 64 - 1))

    def run(self, max_instructions: int = 3_000_000):
        self.uc.emu_start(P.GUEST_LOAD_ADDR, 1 << 40, timeout=20_000_000, count=max_instructions)
        return self

    def _stop(self, outcome, final=None):
        self.outcome, self.final = outcome, final
        self.uc.emu_stop()

    # -- the SEV-ES events ------------------------------------------------------------------
    def _step(self, uc, addr, size, _):
        code = bytes(uc.mem_read(addr, 4))
        if code == VMGEXIT:
            self._vmgexit(addr)
        elif code[:2] == b"\x0F\xA2":  # CPUID: a #VC with error code 0x72
            self._deliver_vc(addr, 0x72)
        elif code[:2] == b"\x48\xCF":  # IRETQ
            rsp = self.reg("rsp")
            rip, _cs, rflags, new_rsp, _ss = struct.unpack("<5Q", uc.mem_read(rsp, 40))
            self.set("rflags", rflags)
            self.set("rsp", new_rsp)
            self.set("rip", rip)
        elif code[:2] in (b"\x0F\x30", b"\x0F\x32") and self.reg("rcx") & 0xFFFFFFFF == MSR_SEV_ES_GHCB:
            if code[1] == 0x30:  # WRMSR: the GHCB MSR is not intercepted under SEV-ES
                self.ghcb_msr = (self.reg("rdx") & 0xFFFFFFFF) << 32 | (self.reg("rax") & 0xFFFFFFFF)
            else:
                self.set("rax", self.ghcb_msr & 0xFFFFFFFF)
                self.set("rdx", self.ghcb_msr >> 32)
            self.set("rip", addr + 2)
        elif code[:1] == b"\xF4":
            self._stop("hlt")
        elif code[:1] in (b"\xE4", b"\xE5", b"\xE6", b"\xE7", b"\xEC", b"\xED", b"\xEE", b"\xEF"):
            self._stop("plain-io", addr)  # would be a #VC the runtime does not handle

    def _deliver_vc(self, rip, error_code):
        """#VC through the guest's IDT: 64-bit frame on the current stack (CPL0, no IST)."""
        self.vc_count += 1
        _, idt_base, _, _ = self.uc.reg_read(self.R.UC_X86_REG_IDTR)
        gate = bytes(self.uc.mem_read(idt_base + 29 * 16, 16))
        lo, mid, hi = struct.unpack_from("<H", gate, 0)[0], struct.unpack_from("<H", gate, 6)[0], \
            struct.unpack_from("<I", gate, 8)[0]
        handler = lo | mid << 16 | hi << 32
        old_rsp = self.reg("rsp")
        rsp = (old_rsp & ~0xF) - 48
        frame = struct.pack("<6Q", error_code, rip, P.KERNEL_CS, self.reg("rflags"), old_rsp, P.KERNEL_DS)
        self.uc.mem_write(rsp, frame)
        self.set("rsp", rsp)
        self.set("rip", handler)

    def _vmgexit(self, addr):
        r = self.kvm.vmgexit(self.ghcb_msr)
        self.traces.append(r.trace.to_dict())
        while r.action == "exit":
            e = r.exit
            self.exits.append(e)
            if isinstance(e, X.SevTermination):
                return self._stop("sev-terminated", e)
            if isinstance(e, X.IoOut) and e.port == P.UCALL_PORT:
                done = self._ucall(e.data[0])
                r = self.kvm.complete()
                if done:
                    return self.uc.emu_stop()
            elif isinstance(e, X.IoOut) and e.port == P.CONSOLE_PORT:
                self.console += e.data.decode()
                r = self.kvm.complete()
            elif isinstance(e, X.IoIn):
                r = self.kvm.complete(bytes(e.size * e.count))  # the null device reads 0
            elif isinstance(e, X.MsrWrite):
                ok = e.index in self.msrs
                if ok:
                    self.msrs[e.index] = e.value
                r = self.kvm.complete(error=not ok)
            elif isinstance(e, X.MsrRead):
                r = self.kvm.complete(self.msrs.get(e.index, 0), error=e.index not in self.msrs)
            else:
                return self._stop("unexpected-exit", e)
        if r.action == "error":
            return self._stop("kvm-run-error", r.errno)
        self.ghcb_msr = r.ghcb_msr
        self.set("rip", addr + 4)

    def _ucall(self, op) -> bool:
        regs = self.kvm.register_cache()  # what KVM knows: the GHCB-exposed registers
        if op == P.UCALL_REPORT:
            self.reports.append((regs["rbx"], regs["rcx"]))
            return False
        self.outcome = {P.UCALL_DONE: "done", P.UCALL_FAIL: "fail",
                        P.UCALL_EXCEPTION: "exception"}.get(op, f"ucall {op}")
        self.final = (regs["rbx"], regs["rcx"])
        return True


def expected_reports(table: CpuidTable):
    out = []
    for f in LEAVES:
        e = table.lookup(f, 0)
        vals = (e.eax, e.ebx, e.ecx, e.edx) if e else (0, 0, 0, 0)
        out += [((f << 32) | reg, v) for reg, v in enumerate(vals)]
    return out


@pytest.mark.parametrize("name", ["es-cpuid-msr", "es-cpuid-ghcb"])
def test_cpuid_guests_report_exactly_the_table(name):
    table = base_table()
    for entry in get_guest(name).cpuid:
        table = table.with_entry(entry)
    cpu = MiniSevEsCpu(name, table).run()
    assert cpu.outcome == "done", (cpu.outcome, cpu.final, cpu.reports[-3:])
    n = 4 * len(LEAVES)
    assert cpu.reports[:n] == expected_reports(table)
    assert cpu.vc_count == len(LEAVES)
    msr_requests = [t["msr_request"] for t in cpu.traces if t["protocol"] == "msr"]
    assert msr_requests[0] == "SEV_INFO_REQ" and "REG_GPA_REQ" not in msr_requests
    ghcb_events = [t["sw_exit_name"] for t in cpu.traces if t["protocol"] == "ghcb"]
    if name == "es-cpuid-msr":
        assert msr_requests.count("CPUID_REQ") == 4 * len(LEAVES)
        assert "CPUID" not in ghcb_events
    else:
        assert msr_requests == ["SEV_INFO_REQ"]
        assert ghcb_events.count("CPUID") == len(LEAVES)
        cpuid_traces = [t for t in cpu.traces if t["sw_exit_name"] == "CPUID"]
        assert all(t["valid"] == ["rax", "rcx", "sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"]
                   and t["protocol_version"] == 2 and t["response"] == [0, 0] for t in cpuid_traces)
        assert cpu.reports[n:] == [(0x6863620000000000, 2)]


def test_cpuid_ghcb_negotiates_version_1_with_a_v1_hypervisor():
    cpu = MiniSevEsCpu("es-cpuid-ghcb", base_table(), ghcb_version=1).run()
    assert cpu.outcome == "done" and cpu.reports[-1] == (0x6863620000000000, 1)
    assert {t["protocol_version"] for t in cpu.traces if t["protocol"] == "ghcb"} == {1}


def test_a_c_bit_below_32_is_refused_with_a_termination_request():
    cpu = MiniSevEsCpu("es-cpuid-ghcb", base_table(), c_bit=31).run()
    assert cpu.outcome == "sev-terminated"
    assert cpu.final == X.SevTermination(GhcbMsr.term_request(0, 1))


def test_io_guest():
    cpu = MiniSevEsCpu("es-io", base_table()).run()
    assert cpu.outcome == "done", (cpu.outcome, cpu.final)
    assert cpu.console == "AES string OUT\n"
    assert cpu.reports == [(0x7B01, 0x1122334455667700), (0x7B04, 0), (0x7C00, 0xFEDCBA9876543210)]
    assert X.IoOut(P.CONSOLE_PORT, 1, 14, b"ES string OUT\n") in cpu.exits
    assert X.MsrWrite(0x40000F00, 0xFEDCBA9876543210, X.KVM_MSR_EXIT_REASON_FILTER) in cpu.exits
    assert cpu.msrs[0x40000F00] == 0xFEDCBA9876543210


def test_terminate_guest():
    cpu = MiniSevEsCpu("es-terminate", base_table()).run()
    assert cpu.outcome == "sev-terminated"
    assert cpu.final == X.SevTermination(0x31100)
    assert (cpu.final.reason_set, cpu.final.reason_code) == (1, 3)
    assert cpu.reports == [(1, 2)]
    assert cpu.traces[-1]["msr_request"] == "TERM_REQ"


def test_a_refused_msr_terminates_the_io_guest_with_the_harness_reason():
    """es_ghcb_exchange: KVM's #GP response (SW_EXIT_INFO_1 = 1, vector 13) -> set 2, code 0x4D."""
    cpu = MiniSevEsCpu("es-io", base_table())
    cpu.msrs.clear()  # userspace refuses the MSR
    cpu.run()
    assert cpu.outcome == "sev-terminated"
    assert cpu.final == X.SevTermination(GhcbMsr.term_request(2, 0x40 | 13))


@pytest.mark.parametrize("name", ["es-cpuid-ghcb", "es-io"])
def test_guests_run_on_their_own_page_tables(name):
    """With paging on, es_init's tables (4 KiB PTEs for the first 2 MiB, the GHCB page without
    the C-bit, 2 MiB pages above) map everything the guest touches afterwards."""
    cpu = MiniSevEsCpu(name, base_table(), c_bit=52, paging=True).run()
    assert cpu.outcome == "done", (cpu.outcome, cpu.final)
    assert cpu.reg("cr3") == 0x10000
    def pte(gpa):  # without the accessed/dirty bits the MMU sets
        return int.from_bytes(cpu.uc.mem_read(0x13000 + 8 * (gpa >> 12), 8), "little") & ~0x60

    assert pte(0x15000) == 0x15003  # the GHCB page: present, writable, shared (no C-bit)
    assert pte(0x8000) == (1 << 52) | 0x8003  # the image: private


def test_a_c_bit_inside_the_engines_physical_address_width_faults_under_paging():
    """Why the simulator must report a C-bit the engine ignores (see the module docstring)."""
    import unicorn
    cpu = MiniSevEsCpu("es-cpuid-ghcb", base_table(), c_bit=51, paging=True)
    with pytest.raises(unicorn.UcError):
        cpu.run()


def test_the_host_sees_only_what_the_ghcb_exposes():
    """At the ucall exits KVM's register cache has RAX/RBX/RCX from the GHCB and nothing else,
    although the guest's R8-R12 hold the CPUID results at that moment."""
    cpu = MiniSevEsCpu("es-cpuid-ghcb", base_table())
    seen = []
    orig = cpu._ucall

    def spy(op):
        seen.append(cpu.kvm.register_cache())
        return orig(op)

    cpu._ucall = spy
    cpu.run()
    assert cpu.outcome == "done" and seen
    for regs in seen:
        assert all(v == 0 for k, v in regs.items() if k not in ("rax", "rbx", "rcx"))
