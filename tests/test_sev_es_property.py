"""Property test (issue 5, item 5): random and mutated GHCB pages and GHCB MSR values thrown at
the model of KVM's VMGEXIT handling.  Never an exception from the harness; always an outcome KVM
defines: resume (with a well-formed GHCB response), one of the userspace exits KVM produces, or
KVM_RUN failing with EINVAL/EFAULT/EIO.

At least 10,000 inputs per run: each test counts what it threw and checks its share, and
checks that the inputs reached every kind of outcome.  Hypothesis runs derandomized (the
same inputs each run), so the suite is reproducible; raise max_examples or set
derandomize=False locally to explore further.
"""

from __future__ import annotations

import errno
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmharness import exits as X
from kvmharness.errors import UsageError
from kvmharness.sev import ghcb as G
from kvmharness.sev.ghcb import Ghcb, GhcbMsr
from kvmharness.sev.vmgexit import SevEsVmgexitHandler
from kvmharness.x86 import CpuidEntry, CpuidTable, sev_cpuid_leaf

MEMORY = 0x40000  # 256 KiB: the GHCB at 0x15000 and room for outside scratch areas
GHCB_GPA = 0x15000
SHARED = GHCB_GPA + 0x800
U64 = (1 << 64) - 1
TABLE = CpuidTable([CpuidEntry(0, 0, 0, 0xD, 1, 2, 3), CpuidEntry(0xD, 0, 1, 7, 0x340, 0x340, 0),
                    sev_cpuid_leaf()])
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

USER_EXITS = (X.IoOut, X.IoIn, X.MmioRead, X.MmioWrite, X.MsrRead, X.MsrWrite, X.SevTermination,
              X.InternalError, X.Unsupported)
RUN_ERRNOS = {errno.EINVAL, errno.EFAULT, errno.EIO}
MSR_RESPONSE_CODES = {0x001, 0x005, 0x007, 0x011, 0x013, 0x015, 0x081}


class Memory:
    def __init__(self):
        self.ram = bytearray(MEMORY)

    def read(self, gpa, n):
        if gpa < 0 or gpa + n > MEMORY:
            raise UsageError("unbacked")
        return bytes(self.ram[gpa:gpa + n])

    def write(self, gpa, data):
        if gpa < 0 or gpa + len(data) > MEMORY:
            raise UsageError("unbacked")
        self.ram[gpa:gpa + len(data)] = data


def new_handler(mem, snp=False, version=2):
    return SevEsVmgexitHandler(cpuid=TABLE, read_guest=mem.read, write_guest=mem.write,
                               ghcb_version=version, snp=snp, user_msrs={0x40000F00},
                               kernel_msrs={0x10: 5})


def drive(h: SevEsVmgexitHandler, mem: Memory, msr: int, rnd: random.Random, seen: set) -> None:
    """One VMGEXIT plus every completion userspace would give; checks the outcome is KVM's
    and adds a label for it to ``seen``."""
    r = h.vmgexit(msr)
    steps = 0
    while True:
        seen.add(f"{r.action}:{type(r.exit).__name__ if r.exit else r.errno or r.trace.protocol}")
        assert r.action in ("resume", "exit", "error"), r
        assert 0 <= r.ghcb_msr <= U64
        if r.action == "error":
            assert r.errno in RUN_ERRNOS and r.exit is None
            break
        if r.action == "resume":
            assert r.exit is None
            if r.trace.protocol == "ghcb":
                g = Ghcb(bytearray(mem.ram[r.ghcb_msr:r.ghcb_msr + 4096]))
                for f in ("rax", "rbx", "rcx", "rdx", "sw_exit_info_1", "sw_exit_info_2"):
                    assert g.is_valid(f), f
                assert set(g.valid_fields()) == {"rax", "rbx", "rcx", "rdx", "sw_exit_info_1",
                                                 "sw_exit_info_2"}
                info1, info2 = g.sw_exit_info_1, g.sw_exit_info_2
                assert info1 in (0, 1, 2)
                if info1 == 2:
                    assert info2 in G.GHCB_ERR_NAMES
                assert r.trace.response == (info1, info2)
                seen.add(f"ghcb:{info1}:{info2 if info1 == 2 else ''}")
            elif r.trace.protocol == "msr":
                assert r.ghcb_msr == msr or r.ghcb_msr & 0xFFF in MSR_RESPONSE_CODES
            break
        assert isinstance(r.exit, USER_EXITS), r.exit
        if isinstance(r.exit, X.SevTermination):
            assert r.exit.ghcb_msr == msr
        if not r.needs_completion:
            break
        steps += 1
        assert steps <= 9000  # a scratch area is at most 64 KiB: 8192 MMIO pieces
        e = r.exit
        if isinstance(e, X.IoIn):
            r = h.complete(rnd.randbytes(e.size * e.count))
        elif isinstance(e, X.MmioRead):
            r = h.complete(rnd.getrandbits(64))
        elif isinstance(e, X.MsrRead):
            r = h.complete(rnd.getrandbits(64), error=rnd.random() < 0.3)
        else:
            r = h.complete(error=rnd.random() < 0.3)
    assert not h.pending


# -- input generators ---------------------------------------------------------------------------
# Hypothesis draws only seeds and a few integers; the pages are built from a seeded
# random.Random, which keeps 10,000 inputs within a few seconds.

KNOWN_CODES = sorted(G.SW_EXIT_CODE_NAMES) + [0x0, 0x78, 0x403, 0x8000FFFC]
REQUIRED = {
    G.SVM_EXIT_WRITE_DR7: {"rax"}, G.SVM_EXIT_RDPMC: {"rcx"}, G.SVM_EXIT_CPUID: {"rax", "rcx", "xcr0"},
    G.SVM_EXIT_IOIO: {"rax", "sw_scratch"}, G.SVM_EXIT_MSR: {"rax", "rcx", "rdx"},
    G.SVM_EXIT_VMMCALL: {"rax", "cpl"}, G.SVM_EXIT_MONITOR: {"rax", "rcx", "rdx"},
    G.SVM_EXIT_MWAIT: {"rax", "rcx"}, G.SVM_VMGEXIT_MMIO_READ: {"sw_scratch"},
    G.SVM_VMGEXIT_MMIO_WRITE: {"sw_scratch"}, G.SVM_VMGEXIT_PSC: {"sw_scratch"},
    G.SVM_VMGEXIT_AP_CREATION: {"rax"},
}


def _pick(rnd: random.Random, *choices):
    return rnd.choice(choices)()


def well_formed_page(rnd: random.Random) -> Ghcb:
    """A request as a correct guest writes it, for one of the events KVM handles."""
    g = Ghcb()
    g.put("protocol_version", rnd.choice([1, 2]))
    kind = rnd.randrange(6)
    if kind == 0:
        g.rax, g.rcx, g.xcr0 = rnd.choice([0, 1, 0xD, 0x8000001F]), 0, 1
        code, info1, info2 = G.SVM_EXIT_CPUID, 0, 0
    elif kind == 1:
        string = rnd.random() < 0.5
        code = G.SVM_EXIT_IOIO
        info1 = G.ioio_exit_info_1(rnd.randrange(0x10000), rnd.choice([1, 2, 4]),
                                   is_in=rnd.random() < 0.5, string=string, rep=string)
        info2 = rnd.randrange(0x80) if string else 0
        g.rax = rnd.getrandbits(64)
        g.sw_scratch = SHARED
    elif kind == 2:
        code, info1, info2 = G.SVM_EXIT_MSR, rnd.randrange(2), 0
        g.rcx, g.rax, g.rdx = rnd.choice([0x40000F00, 0x10, 0x0]), rnd.getrandbits(32), rnd.getrandbits(32)
    elif kind == 3:
        code = rnd.choice([G.SVM_VMGEXIT_MMIO_READ, G.SVM_VMGEXIT_MMIO_WRITE])
        info1, info2 = 0xD0000000 + rnd.randrange(64), rnd.randrange(0x7F0)
        g.sw_scratch = SHARED
    elif kind == 4:
        code = rnd.choice([G.SVM_VMGEXIT_HV_FEATURES, G.SVM_VMGEXIT_TERM_REQUEST,
                           G.SVM_VMGEXIT_AP_JUMP_TABLE, G.SVM_VMGEXIT_NMI_COMPLETE,
                           G.SVM_EXIT_WBINVD, G.SVM_EXIT_READ_DR7])
        info1, info2 = rnd.randrange(3), rnd.getrandbits(16)
    else:
        code, info1, info2 = G.SVM_EXIT_VMMCALL, 0, 0
        g.rax, g.cpl = rnd.randrange(16), rnd.choice([0, 3])
    g.sw_exit_code, g.sw_exit_info_1, g.sw_exit_info_2 = code, info1, info2
    return g


def make_page(rnd: random.Random) -> bytes:
    """A GHCB page: a well-formed request with one mutation, or a random, zero or 0xCC base
    with structured fields and a mutated bitmap."""
    if rnd.random() < 0.35:
        g = well_formed_page(rnd)
        if rnd.random() < 0.3:  # flip one bit somewhere in the save area or the trailer
            off = rnd.choice([rnd.randrange(0x400), rnd.randrange(0xFF0, 0x1000)])
            g.buf[off] ^= 1 << rnd.randrange(8)
        return bytes(g)
    base = rnd.randrange(3)
    g = Ghcb(bytearray(4096) if base == 0 else
             bytearray(rnd.randbytes(4096)) if base == 1 else bytearray(b"\xCC" * 4096))
    u64 = lambda: rnd.getrandbits(64)
    code = _pick(rnd, lambda: rnd.choice(KNOWN_CODES), lambda: rnd.choice(KNOWN_CODES), u64)
    small = lambda: _pick(rnd, lambda: rnd.randrange(65), lambda: rnd.randrange(0x11000),
                          lambda: 1 << 31, u64)
    g.put("sw_exit_code", code)
    if code == G.SVM_EXIT_IOIO:
        g.put("sw_exit_info_1", rnd.getrandbits(32) | (u64() << 32 if rnd.random() < 0.2 else 0))
    elif code == G.SVM_EXIT_MSR:
        g.put("sw_exit_info_1", rnd.choice([0, 1, small()]))
    else:
        g.put("sw_exit_info_1", small())
    g.put("sw_exit_info_2", small())
    g.put("sw_scratch", _pick(rnd, lambda: 0, lambda: rnd.randrange(GHCB_GPA - 16, GHCB_GPA + 4112),
                              lambda: SHARED + rnd.randrange(64), lambda: SHARED + rnd.randrange(64),
                              lambda: rnd.randrange(MEMORY + 0x20000),
                              lambda: U64 - rnd.randrange(0x1000), u64))
    g.put("rax", _pick(rnd, lambda: rnd.choice([0, 1, 0xD, 0x8000001F]), u64))
    g.put("rcx", _pick(rnd, lambda: rnd.choice([0, 0x10, 0x40000F00]), u64))
    g.put("cpl", rnd.randrange(256))
    g.put("ghcb_usage", 0 if rnd.random() < 0.9 else rnd.choice([1, 0xFFFFFFFF]))
    g.put("protocol_version", rnd.randrange(0x10000))
    needed = {"sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"}
    fields = needed | set(rnd.sample(G.BITMAP_FIELDS, rnd.randrange(7)))
    if rnd.random() < 0.7:  # usually also the inputs this exit code requires
        fields |= REQUIRED.get(code, set())
    if rnd.random() < 0.3:
        fields.discard(rnd.choice(sorted(needed)))
    g.valid_bitmap = rnd.randbytes(16) if rnd.random() < 0.1 else G.bitmap_of(*fields)
    return bytes(g)


seeds = st.integers(0, (1 << 64) - 1)
u64 = st.integers(0, U64)
def make_msr_value(rnd: random.Random) -> int:
    """A GHCB MSR value: random, a known code with random data, or a well-formed request."""
    return _pick(
        rnd,
        lambda: rnd.getrandbits(64),
        lambda: (rnd.getrandbits(52) << 12) | rnd.choice(sorted(G.MSR_CODES) + [0x003, 0xFFF, 0x101]),
        lambda: GhcbMsr.cpuid_request(rnd.getrandbits(32), rnd.randrange(4)),
        lambda: GhcbMsr.term_request(rnd.randrange(16), rnd.randrange(256)),
        lambda: rnd.choice([0, GHCB_GPA, 0x7FFF0000, U64 & ~0xFFF]),
    )


# -- the tests -------------------------------------------------------------------------------------

def test_random_and_mutated_ghcb_pages():
    thrown = 0
    seen: set = set()

    @settings(max_examples=1500, **SETTINGS)
    @given(seed=seeds, snp=st.booleans(), version=st.sampled_from([1, 2]))
    def run(seed, snp, version):
        nonlocal thrown
        mem = Memory()
        h = new_handler(mem, snp=snp, version=version)
        rnd = random.Random(seed)
        if snp and rnd.random() < 0.5:
            h.vmgexit(GhcbMsr.reg_gpa_request(GHCB_GPA >> 12))
        for _ in range(3):
            mem.write(GHCB_GPA, make_page(rnd))
            drive(h, mem, GHCB_GPA, rnd, seen)
            thrown += 1

    run()
    assert thrown >= 4500
    # the generator reaches every kind of outcome (so the invariants above were exercised)
    for label in ("ghcb:0:", "ghcb:1:", "ghcb:2:2", "ghcb:2:3", "ghcb:2:4", "ghcb:2:6",
                  "exit:IoOut", "exit:IoIn", "exit:MmioRead", "exit:MmioWrite", "exit:MsrRead",
                  "exit:SevTermination", f"error:{errno.EINVAL}"):
        assert label in seen, (label, sorted(seen))


def test_fully_random_pages_at_random_gpas():
    thrown = 0
    seen: set = set()

    @settings(max_examples=1000, **SETTINGS)
    @given(seed=seeds, gpa=st.one_of(st.just(GHCB_GPA),
                                                       st.integers(0, MEMORY >> 12).map(lambda p: p << 12)))
    def run(seed, gpa):
        nonlocal thrown
        rnd = random.Random(seed)
        mem = Memory()
        page = bytearray(rnd.randbytes(4096))
        for _ in range(2):
            if gpa + 4096 <= MEMORY:
                mem.write(gpa, bytes(page))
            drive(new_handler(mem, snp=rnd.random() < 0.2), mem, gpa, rnd, seen)
            thrown += 1
            page[rnd.randrange(4096)] ^= 1 << rnd.randrange(8)

    run()
    assert thrown >= 2000
    assert {"resume:none", "ghcb:2:2"} <= seen, sorted(seen)


def test_msr_protocol_values():
    thrown = 0
    seen: set = set()

    @settings(max_examples=1000, **SETTINGS)
    @given(seed=seeds, snp=st.booleans())
    def run(seed, snp):
        nonlocal thrown
        mem = Memory()
        h = new_handler(mem, snp=snp)
        rnd = random.Random(seed)
        for _ in range(4):
            drive(h, mem, make_msr_value(rnd), rnd, seen)
            thrown += 1

    run()
    assert thrown >= 4000
    assert {"resume:msr", "exit:SevTermination", "exit:Unsupported"} <= seen, sorted(seen)
