"""The model of KVM's VMGEXIT handling (kvmharness.sev.vmgexit), driven with the exact GHCB
pages and MSR values the es-* guests write (guests/include/sev_es.h), and with malformed ones."""

from __future__ import annotations

import errno

import pytest

from kvmharness import exits as X
from kvmharness import protocol as P
from kvmharness.errors import SimulatorError, UsageError
from kvmharness.sev import ghcb as G
from kvmharness.sev.ghcb import Ghcb, GhcbMsr
from kvmharness.sev.vmgexit import SevEsVmgexitHandler, vc_error_code
from kvmharness.x86 import CpuidEntry, CpuidTable, sev_cpuid_leaf

GHCB_GPA = 0x15000          # sev_es.h GHCB_GPA
SHARED = GHCB_GPA + 0x800   # the GHCB shared buffer
MEMORY = 2 << 20
MSR_TEST = 0x40000F00
TABLE = CpuidTable([
    CpuidEntry(0x0, 0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65),
    CpuidEntry(0x1, 0, 0, 0x00A00F11, 0x00000800, 0xF6D83203, 0x178BFBFF),
    CpuidEntry(0x7, 0, 1, 0, 0x219C91A9, 0x0040068C, 0x00000010),
    CpuidEntry(0xD, 0, 1, 0x7, 0x340, 0x340, 0),
    sev_cpuid_leaf(c_bit=51),
])


class Memory:
    """2 MiB of guest RAM seen from the host, failing like Vm.read on unbacked GPAs."""

    def __init__(self):
        self.ram = bytearray(MEMORY)

    def read(self, gpa, n):
        if gpa < 0 or gpa + n > MEMORY:
            raise UsageError(f"{gpa:#x}+{n:#x} is not backed")
        return bytes(self.ram[gpa:gpa + n])

    def write(self, gpa, data):
        if gpa < 0 or gpa + len(data) > MEMORY:
            raise UsageError(f"{gpa:#x} is not backed")
        self.ram[gpa:gpa + len(data)] = data

    def ghcb(self) -> Ghcb:
        return Ghcb(bytearray(self.ram[GHCB_GPA:GHCB_GPA + 4096]))


@pytest.fixture
def mem():
    return Memory()


def handler(mem, **kw):
    kw.setdefault("user_msrs", {MSR_TEST})
    return SevEsVmgexitHandler(cpuid=TABLE, read_guest=mem.read, write_guest=mem.write, **kw)


def begin(version=2) -> Ghcb:
    """GHCB_BEGIN: an empty bitmap, the protocol version, usage 0 (over a guest-dirty page)."""
    g = Ghcb(bytearray(b"\xCC" * 4096))
    g.valid_bitmap = bytes(16)
    g.put("protocol_version", version)
    g.put("ghcb_usage", 0)
    return g


def exchange(mem, h, g: Ghcb):
    mem.write(GHCB_GPA, bytes(g))
    return h.vmgexit(GHCB_GPA)


def cpuid_ghcb(fn, index=0, xcr0=False) -> Ghcb:
    """What es_cpuid_ghcb writes."""
    g = begin()
    g.rax, g.rcx = fn, index
    if xcr0:
        g.xcr0 = 1
    g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = G.SVM_EXIT_CPUID, 0, 0
    return g


def ucall_ghcb(op, rbx, rcx) -> Ghcb:
    """What es_ucall writes."""
    g = begin()
    g.rax, g.rbx, g.rcx = op, rbx, rcx
    g.sw_exit_code = G.SVM_EXIT_IOIO
    g.sw_exit_info_1 = (P.UCALL_PORT << 16) | 0x10 | 0x200
    g.sw_exit_info_2 = 0
    return g


# -- the MSR protocol ------------------------------------------------------------------

@pytest.mark.parametrize("version, c_bit, expected", [(2, 51, 0x0002_0001_3300_0001),
                                                      (1, 47, 0x0001_0001_2F00_0001)])
def test_sev_information_and_the_reset_value(mem, version, c_bit, expected):
    h = handler(mem, ghcb_version=version, c_bit=c_bit)
    assert h.reset_ghcb_msr() == expected
    r = h.vmgexit(GhcbMsr.sev_info_request())
    assert (r.action, r.ghcb_msr) == ("resume", expected)
    assert r.trace.protocol == "msr" and r.trace.msr_request == "SEV_INFO_REQ"


@pytest.mark.parametrize("fn", [0x0, 0x1, 0x7, 0x8000001F, 0x40000000])
def test_msr_cpuid_answers_every_register_from_the_table(mem, fn):
    h = handler(mem)
    e = TABLE.lookup(fn, 0)
    expected = (e.eax, e.ebx, e.ecx, e.edx) if e else (0, 0, 0, 0)
    for reg in range(4):
        r = h.vmgexit(GhcbMsr.cpuid_request(fn, reg))
        assert r.action == "resume"
        assert r.ghcb_msr == GhcbMsr.cpuid_response(expected[reg], reg)
        assert GhcbMsr.decode(r.ghcb_msr).fields["reg"] == reg
    assert h.register_cache()["rbx"] == expected[1]


def test_msr_cpuid_keeps_bits_31_to_12_of_the_request(mem):
    r = handler(mem).vmgexit(0x0000_0001_7ABC_D004)  # junk in [29:12]
    assert r.ghcb_msr == (0x00000800 << 32) | 0x7ABC_D005  # EBX of leaf 1, junk echoed


def test_termination_request_is_a_sev_termination_exit(mem):
    r = handler(mem).vmgexit(GhcbMsr.term_request(1, 3))
    assert r.action == "exit" and r.exit == X.SevTermination(0x31100)
    assert (r.exit.reason_set, r.exit.reason_code) == (1, 3)
    assert r.trace.msr_request == "TERM_REQ"


@pytest.mark.parametrize("request_value", [GhcbMsr.pref_gpa_request(), GhcbMsr.reg_gpa_request(0x15),
                                           GhcbMsr.psc_request(0x15, G.PSC_OP_SHARED)])
def test_snp_only_requests_terminate_a_non_snp_guest(mem, request_value):
    """The negative test of issue 5: a SEV-ES guest registering its GHCB GPA is terminated."""
    r = handler(mem).vmgexit(request_value)
    assert r.action == "exit" and r.exit == X.SevTermination(request_value)


def test_snp_only_requests_are_answered_for_an_snp_guest(mem):
    h = handler(mem, snp=True)
    assert h.vmgexit(GhcbMsr.pref_gpa_request()).ghcb_msr == GhcbMsr.pref_gpa_response()
    assert h.vmgexit(GhcbMsr.reg_gpa_request(0x15)).ghcb_msr == GhcbMsr.reg_gpa_response(0x15)
    assert h.vmgexit(GhcbMsr.psc_request(0x15, 2)).ghcb_msr == G.GHCB_MSR_PSC_RESP_ERROR


@pytest.mark.parametrize("value", [0x0FF, GhcbMsr.vmpl_request(0), 0xFFFF_FFFF_FFFF_F003, 0x001])
def test_unknown_msr_codes_leave_the_msr_unchanged(mem, value):
    r = handler(mem).vmgexit(value)
    assert (r.action, r.ghcb_msr, r.exit) == ("resume", value, None)


def test_hv_features_and_ap_reset_hold(mem):
    h = handler(mem)
    assert h.vmgexit(GhcbMsr.hv_features_request()).ghcb_msr == 0x3081
    r = h.vmgexit(GhcbMsr.ap_reset_hold_request())
    assert (r.action, r.ghcb_msr, r.exit) == ("exit", 0x007, X.Unsupported(32))


# -- the GHCB page: what the guests write ------------------------------------------------

def test_gpa_zero_and_unbacked_ghcb_resume_untouched(mem):
    h = handler(mem)
    assert h.vmgexit(0).action == "resume"
    r = h.vmgexit(0x7FFF_F000_0000)  # page aligned, beyond RAM
    assert (r.action, r.ghcb_msr, r.trace.protocol) == ("resume", 0x7FFF_F000_0000, "none")
    assert mem.ram == bytearray(MEMORY)


@pytest.mark.parametrize("fn, index", [(0x0, 0), (0x1, 0), (0x7, 0), (0x8000001F, 0), (0x80000008, 0)])
def test_cpuid_through_the_ghcb_as_es_cpuid_ghcb_does(mem, fn, index):
    h = handler(mem)
    r = exchange(mem, h, cpuid_ghcb(fn, index))
    assert r.action == "resume" and r.ghcb_msr == GHCB_GPA
    g = mem.ghcb()
    e = TABLE.lookup(fn, index)
    assert (g.rax, g.rbx, g.rcx, g.rdx) == ((e.eax, e.ebx, e.ecx, e.edx) if e else (0, 0, 0, 0))
    assert g.valid_fields() == ("rax", "rcx", "rdx", "rbx", "sw_exit_info_1", "sw_exit_info_2")
    assert (g.sw_exit_info_1, g.sw_exit_info_2) == (0, 0)
    t = r.trace
    assert (t.protocol, t.sw_exit_name, t.protocol_version, t.response) == ("ghcb", "CPUID", 2, (0, 0))
    assert t.valid == ("rax", "rcx", "sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")


def test_leaf_0xd_needs_xcr0(mem):
    h = handler(mem)
    exchange(mem, h, cpuid_ghcb(0xD))
    assert (mem.ghcb().sw_exit_info_1, mem.ghcb().sw_exit_info_2) == (2, G.GHCB_ERR_MISSING_INPUT)
    exchange(mem, h, cpuid_ghcb(0xD, xcr0=True))
    assert (mem.ghcb().sw_exit_info_1, mem.ghcb().rax) == (0, 0x7)


def test_ucall_exchange_is_an_ioout_with_only_the_exposed_registers(mem):
    """es_ucall: the host sees IoOut on UCALL_PORT; KVM's register cache holds RAX/RBX/RCX."""
    h = handler(mem)
    r = exchange(mem, h, ucall_ghcb(P.UCALL_REPORT, 0x8000001F00000001, 0x73))
    assert r.exit == X.IoOut(P.UCALL_PORT, 1, 1, bytes([P.UCALL_REPORT])) and r.needs_completion
    regs = h.register_cache()
    assert (regs["rax"], regs["rbx"], regs["rcx"]) == (P.UCALL_REPORT, 0x8000001F00000001, 0x73)
    assert all(v == 0 for k, v in regs.items() if k not in ("rax", "rbx", "rcx"))
    r = h.complete()
    assert r.action == "resume" and mem.ghcb().sw_exit_info_1 == 0


def test_es_io_sequence(mem):
    """The exchanges of guests/src/es-io.S, in order, with the results it reports."""
    h = handler(mem)
    g = begin()
    g.rax = ord("A")
    g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = 0x7B, (P.CONSOLE_PORT << 16) | 0x210, 0
    r = exchange(mem, h, g)
    assert r.exit == X.IoOut(P.CONSOLE_PORT, 1, 1, b"A")
    assert h.complete().action == "resume"

    text = b"ES string OUT\n"
    mem.write(SHARED, text)
    g = begin()
    g.sw_scratch = SHARED
    g.sw_exit_code = 0x7B
    g.sw_exit_info_1 = (P.CONSOLE_PORT << 16) | 0x4 | 0x8 | 0x10 | 0x200 | 0xC00
    g.sw_exit_info_2 = len(text)
    g.buf[0x800:0x800 + len(text)] = text
    r = exchange(mem, h, g)
    assert r.exit == X.IoOut(P.CONSOLE_PORT, 1, len(text), text)
    assert h.complete().action == "resume"

    for size_bit, size, expected in ((0x10, 1, 0x1122334455667700), (0x40, 4, 0)):
        g = begin()
        g.rax = 0x1122334455667788
        g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = 0x7B, (P.BENCH_PORT << 16) | 1 | size_bit | 0x200, 0
        r = exchange(mem, h, g)
        assert r.exit == X.IoIn(P.BENCH_PORT, size, 1)
        assert h.complete(0).action == "resume"
        assert mem.ghcb().rax == expected

    g = begin()
    g.rcx, g.rax, g.rdx = MSR_TEST, 0x76543210, 0xFEDCBA98
    g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = 0x7C, 1, 0
    r = exchange(mem, h, g)
    assert r.exit == X.MsrWrite(MSR_TEST, 0xFEDCBA9876543210, X.KVM_MSR_EXIT_REASON_FILTER)
    assert h.complete().action == "resume" and mem.ghcb().sw_exit_info_1 == 0

    g = begin()
    g.rcx = MSR_TEST
    g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = 0x7C, 0, 0
    r = exchange(mem, h, g)
    assert r.exit == X.MsrRead(MSR_TEST, X.KVM_MSR_EXIT_REASON_FILTER)
    h.complete(0xFEDCBA9876543210)
    assert (mem.ghcb().rax, mem.ghcb().rdx) == (0x76543210, 0xFEDCBA98)


def test_a_refused_msr_is_a_gp_response_and_an_unknown_one_never_reaches_userspace(mem):
    h = handler(mem)
    g = begin()
    g.rcx = MSR_TEST
    g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = 0x7C, 0, 0
    exchange(mem, h, g)
    h.complete(error=True)
    assert (mem.ghcb().sw_exit_info_1, mem.ghcb().sw_exit_info_2) == (1, 0x8000030D)
    g.rcx = 0x12345678  # not filtered, unknown to KVM, UNKNOWN exits are off
    r = exchange(mem, h, g)
    assert r.exit is None and (mem.ghcb().sw_exit_info_1, mem.ghcb().sw_exit_info_2) == (1, 0x8000030D)
    h2 = handler(mem, kernel_msrs={0x12345678: 0xAABBCCDD11223344})
    exchange(mem, h2, g)
    assert (mem.ghcb().rax, mem.ghcb().rdx, mem.ghcb().sw_exit_info_1) == (0x11223344, 0xAABBCCDD, 0)


# -- validation (sev_es_validate_vmgexit) --------------------------------------------------

def _fields(**kw) -> Ghcb:
    g = begin()
    for k, v in kw.items():
        g.set(k, v)
    return g


@pytest.mark.parametrize("ghcb, error", [
    (_fields(sw_exit_code=0x72, sw_exit_info_1=0, sw_exit_info_2=0, rax=0, rcx=0, ghcb_usage=1),
     G.GHCB_ERR_INVALID_USAGE),
    (_fields(sw_exit_code=0x72, sw_exit_info_1=0, rax=0, rcx=0), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x72, sw_exit_info_1=0, sw_exit_info_2=0, rax=0), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x7B, sw_exit_info_1=0x10, sw_exit_info_2=0), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x7B, sw_exit_info_1=0x14, sw_exit_info_2=1, rax=0), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x7C, sw_exit_info_1=1, sw_exit_info_2=0, rcx=1, rax=0), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x81, sw_exit_info_1=0, sw_exit_info_2=0, rax=1), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x78, sw_exit_info_1=0, sw_exit_info_2=0), G.GHCB_ERR_INVALID_EVENT),
    (_fields(sw_exit_code=0x80000013, sw_exit_info_1=2, sw_exit_info_2=0), G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x80000010, sw_exit_info_1=0, sw_exit_info_2=8, sw_scratch=SHARED),
     G.GHCB_ERR_MISSING_INPUT),
    (_fields(sw_exit_code=0x80000001, sw_exit_info_1=0xD0000000, sw_exit_info_2=8),
     G.GHCB_ERR_MISSING_INPUT),
])
def test_malformed_inputs_get_kvms_error_code(mem, ghcb, error):
    h = handler(mem)
    r = exchange(mem, h, ghcb)
    assert r.action == "resume" and r.exit is None
    g = mem.ghcb()
    assert (g.sw_exit_info_1, g.sw_exit_info_2) == (2, error)
    assert g.valid_fields() == ("rax", "rcx", "rdx", "rbx", "sw_exit_info_1", "sw_exit_info_2")
    assert r.trace.response == (2, error)


def test_io_in_needs_no_rax_and_the_protocol_version_is_not_checked(mem):
    h = handler(mem)
    r = exchange(mem, h, _fields(sw_exit_code=0x7B, sw_exit_info_1=(0x80 << 16) | 0x11,
                                 sw_exit_info_2=0, protocol_version=0x7777))
    assert r.exit == X.IoIn(0x80, 1, 1) and r.trace.protocol_version == 0x7777


# -- scratch areas, string IO and MMIO --------------------------------------------------------

def _string_io(scratch, count, *, is_in=False, port=0x80, size_bit=0x10):
    info1 = (port << 16) | 0x4 | 0x8 | size_bit | 0x200 | (1 if is_in else 0)
    return _fields(sw_exit_code=0x7B, sw_exit_info_1=info1, sw_exit_info_2=count, sw_scratch=scratch)


@pytest.mark.parametrize("scratch, count", [
    (0, 1),                          # not provided
    (GHCB_GPA + 0x100, 1),           # in the GHCB but not in the shared buffer
    (SHARED + 0x7F0 - 4, 5),         # runs past the shared buffer
    (0x100000, 16 * 4096 + 1),       # outside, more than 16 pages
    ((1 << 64) - 2, 4),              # wraps around
])
def test_invalid_scratch_areas(mem, scratch, count):
    r = exchange(mem, handler(mem), _string_io(scratch, count))
    assert r.action == "resume" and (mem.ghcb().sw_exit_info_1, mem.ghcb().sw_exit_info_2) == (2, 3)


def test_unreadable_scratch_is_efault_and_huge_counts_are_einval(mem):
    assert exchange(mem, handler(mem), _string_io(0x7FFF0000, 8)).errno == errno.EFAULT
    r = exchange(mem, handler(mem), _string_io(SHARED, 1 << 31))
    assert (r.action, r.errno) == ("error", errno.EINVAL)


def test_string_out_from_guest_memory_comes_in_page_sized_exits(mem):
    data = bytes(i & 0xFF for i in range(5000))
    mem.write(0x100000, data)
    h = handler(mem)
    r = exchange(mem, h, _string_io(0x100000, 5000))
    assert r.exit == X.IoOut(0x80, 1, 4096, data[:4096])
    r = h.complete()
    assert r.exit == X.IoOut(0x80, 1, 904, data[4096:])
    assert h.complete().action == "resume"


def test_string_in_to_guest_memory_is_written_back_before_the_guest_runs(mem):
    h = handler(mem)
    r = exchange(mem, h, _string_io(0x100000, 3, is_in=True, size_bit=0x20))
    assert r.exit == X.IoIn(0x80, 2, 3)
    assert h.complete(b"\x01\x02\x03\x04\x05\x06").action == "resume"
    assert mem.ram[0x100000:0x100006] == b"\x01\x02\x03\x04\x05\x06"


def test_mmio_read_in_8_byte_pieces_into_the_shared_buffer(mem):
    h = handler(mem)
    g = _fields(sw_exit_code=G.SVM_VMGEXIT_MMIO_READ, sw_exit_info_1=0xD0000000, sw_exit_info_2=20,
                sw_scratch=SHARED)
    r = exchange(mem, h, g)
    seen = []
    while r.action == "exit":
        seen.append(r.exit)
        r = h.complete(bytes([len(seen)]) * r.exit.size)
    assert seen == [X.MmioRead(0xD0000000, 8), X.MmioRead(0xD0000008, 8), X.MmioRead(0xD0000010, 4)]
    assert mem.ram[SHARED:SHARED + 20] == b"\x01" * 8 + b"\x02" * 8 + b"\x03" * 4


def test_mmio_write_in_8_byte_pieces(mem):
    h = handler(mem)
    g = _fields(sw_exit_code=G.SVM_VMGEXIT_MMIO_WRITE, sw_exit_info_1=0xD0000000, sw_exit_info_2=10,
                sw_scratch=SHARED)
    g.buf[0x800:0x80A] = b"0123456789"
    r = exchange(mem, h, g)
    assert r.exit == X.MmioWrite(0xD0000000, 8, b"01234567")
    assert h.complete().exit == X.MmioWrite(0xD0000008, 2, b"89")
    assert h.complete().action == "resume"


# -- the other events ----------------------------------------------------------------------------

def _event(code, info1=0, info2=0, **more):
    return _fields(sw_exit_code=code, sw_exit_info_1=info1, sw_exit_info_2=info2, **more)


def test_termination_event_reports_the_ghcb_gpa(mem):
    r = exchange(mem, handler(mem), _event(G.SVM_VMGEXIT_TERM_REQUEST, 0x31, 0))
    assert r.exit == X.SevTermination(GHCB_GPA)


def test_events_kvm_answers_in_the_ghcb(mem):
    h = handler(mem)
    exchange(mem, h, _event(G.SVM_VMGEXIT_HV_FEATURES))
    assert (mem.ghcb().sw_exit_info_1, mem.ghcb().sw_exit_info_2) == (0, 3)
    exchange(mem, h, _event(G.SVM_VMGEXIT_AP_JUMP_TABLE, 0, 0x9000))
    exchange(mem, h, _event(G.SVM_VMGEXIT_AP_JUMP_TABLE, 1, 0))
    assert mem.ghcb().sw_exit_info_2 == 0x9000
    exchange(mem, h, _event(G.SVM_VMGEXIT_AP_JUMP_TABLE, 7, 0))
    assert (mem.ghcb().sw_exit_info_1, mem.ghcb().sw_exit_info_2) == (2, G.GHCB_ERR_INVALID_INPUT)
    exchange(mem, h, _event(G.SVM_EXIT_VMMCALL, rax=1, cpl=3))
    assert mem.ghcb().rax == (1 << 64) - 1  # -KVM_EPERM
    exchange(mem, h, _event(G.SVM_EXIT_VMMCALL, rax=0x99, cpl=0))
    assert mem.ghcb().rax == (1 << 64) - 1000  # -KVM_ENOSYS


def test_events_that_leave_the_guest(mem):
    h = handler(mem)
    assert exchange(mem, h, _event(G.SVM_VMGEXIT_UNSUPPORTED_EVENT)).errno == errno.EINVAL
    r = exchange(mem, h, _event(G.SVM_EXIT_RDTSC))
    assert r.exit == X.InternalError(4, (0x6E, 0))
    assert exchange(mem, h, _event(G.SVM_EXIT_RDTSCP)).inject == (6, None)
    assert exchange(mem, h, _event(G.SVM_VMGEXIT_AP_HLT_LOOP)).exit == X.Unsupported(32)


def test_snp_requires_a_registered_ghcb(mem):
    h = handler(mem, snp=True)
    assert exchange(mem, h, cpuid_ghcb(0)).errno == errno.EINVAL
    h.vmgexit(GhcbMsr.reg_gpa_request(GHCB_GPA >> 12))
    assert exchange(mem, h, cpuid_ghcb(0)).action == "resume"


def test_vc_error_codes():
    assert vc_error_code(0x72) == 0x72 and vc_error_code(0x7B) == 0x7B
    assert vc_error_code(0x78) is None  # HLT: an automatic exit
    assert vc_error_code(0x400) is None and vc_error_code(0x400, mmio=True) == 0x400


def test_complete_without_a_pending_exit_is_a_harness_error(mem):
    with pytest.raises(SimulatorError, match="no pending exit"):
        handler(mem).complete()


def test_a_vmgexit_while_an_exit_is_pending_is_a_simulator_bug(mem):
    h = handler(mem)
    exchange(mem, h, ucall_ghcb(P.UCALL_DONE, 0, 0))
    assert h.pending
    with pytest.raises(SimulatorError, match="still waiting"):
        h.vmgexit(GHCB_GPA)
