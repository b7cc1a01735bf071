"""Run a fuzz guest on a backend, record every exit, and compare two recordings.

At every exit the recording keeps the exit (``to_dict()``), RIP, the 16 GPRs and RFLAGS
as ``get_regs`` shows them *before* the exit is completed (that is what a VMM sees); at
the end it keeps the outcome, the registers, the MMIO device's memory, the RAM scratch
page and the user-space MSR store.  The devices answer every request with a known
function of the request (``Devices``), so both backends get the same answers as long as
they ask the same questions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .. import exits as X
from .. import protocol as P
from ..boot import load_image
from . import gen as G
from .asm import assemble

MAX_EXITS = 4000
RUN_TIMEOUT = 2.0     # seconds per KVM_RUN before the vCPU is kicked (a guest that spins)
_M64 = 2**64 - 1
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")


def _mix(*vals) -> int:
    """A deterministic 64-bit function of the arguments (splitmix64 over them)."""
    x = 0x9E3779B97F4A7C15
    for v in vals:
        x = (x ^ (v & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & _M64
        x ^= x >> 29
    return x


class Devices:
    """The guest's devices, each a known function of what it is asked.

    * ports: IN of element ``i`` of the ``n``-th IO exit answers ``_mix(port, size, n, i)``;
      OUT is recorded in the exit itself.
    * MMIO at :data:`gen.MMIO_BASE`: a RAM-like page (reads return what was written, initially
      the seeded bytes); outside the page reads answer 0xff bytes and writes are dropped.
    * MSRs the filter denies (and unknown ones when that user exit is on): a store; reads of
      a never-written MSR answer ``_mix(index)``; :data:`gen.REFUSED_MSR` is refused (#GP).
    """

    def __init__(self, seed: int, mmio_base: int = G.MMIO_BASE):
        self.mmio_base = mmio_base
        self.mmio = bytearray(G.mmio_init(seed))
        self.msrs: dict = {}
        self.io_count = 0

    def port_in(self, e: X.IoIn) -> bytes:
        self.io_count += 1
        return b"".join(_mix(e.port, e.size, self.io_count, i).to_bytes(8, "little")[:e.size]
                        for i in range(e.count))

    def mmio_read(self, e: X.MmioRead) -> bytes:
        off = e.addr - self.mmio_base
        if 0 <= off and off + e.size <= G.MMIO_SIZE:
            return bytes(self.mmio[off:off + e.size])
        return b"\xff" * e.size

    def mmio_write(self, e: X.MmioWrite) -> None:
        off = e.addr - self.mmio_base
        if 0 <= off and off + e.size <= G.MMIO_SIZE:
            self.mmio[off:off + e.size] = e.data[:e.size]

    def msr_read(self, e: X.MsrRead):
        if e.index == G.REFUSED_MSR:
            return None
        return self.msrs.get(e.index, _mix(e.index))

    def msr_write(self, e: X.MsrWrite) -> bool:
        if e.index == G.REFUSED_MSR:
            return False
        self.msrs[e.index] = e.value
        return True


@dataclass
class Recording:
    backend: str
    steps: list = field(default_factory=list)   # (exit dict, regs dict) per exit
    outcome: str = ""                            # end | exception | shutdown | internal | limit | timeout | error
    detail: str = ""
    regs: dict = field(default_factory=dict)
    mmio: bytes = b""
    ram: bytes = b""
    msrs: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able (a rig's recordings travel home this way: fuzz/remote.py)."""
        return {"backend": self.backend, "steps": [[e, r] for e, r in self.steps], "outcome": self.outcome,
                "detail": self.detail, "regs": self.regs, "mmio": self.mmio.hex(), "ram": self.ram.hex(),
                "msrs": {str(k): v for k, v in self.msrs.items()}, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict, backend: str | None = None) -> Recording:
        def exit_(e: dict) -> dict:  # JSON made the exits' tuples lists
            return {k: tuple(v) if isinstance(v, list) else v for k, v in e.items()}
        return cls(backend or d["backend"], [(exit_(e), r) for e, r in d["steps"]], d["outcome"], d["detail"],
                   d["regs"], bytes.fromhex(d["mmio"]), bytes.fromhex(d["ram"]),
                   {int(k): v for k, v in d["msrs"].items()}, d.get("seconds", 0.0))


def _regs(vcpu) -> dict:
    r = vcpu.get_regs()
    return {n: getattr(r, n) for n in REG_NAMES}


class Target:
    """One backend to run guests on: the kvm backend, or the simulator modelling a KVM."""

    profile = None  # the simulator's KvmProfile

    def __init__(self, name: str, system, cpuid):
        self.name = name
        self.system = system
        self.cpuid = cpuid

    def close(self):
        self.system.close()


def open_targets(pair=("kvm", "sim"), profile: str | None = None) -> list:
    """Open the two backends.  The simulator is offered the kvm host's supported CPUID table
    (the same input on both sides) and models that host's KVM module (sim/profile.py)."""
    from ..backend import kvm_usable
    from ..factory import open_backend
    from ..hostinfo import kvm_device_info
    from ..sim.profile import for_kvm_module
    from ..sim.system import SimSystem

    host_cpuid = None
    if "kvm" in pair:
        ok, why = kvm_usable()
        if not ok:
            from ..errors import DeviceMissing
            raise DeviceMissing(f"fuzz --pair {','.join(pair)} needs /dev/kvm: {why}")
    targets = []
    for name in pair:
        if name == "kvm":
            system = open_backend("kvm")
            host_cpuid = system.capabilities.supported_cpuid
            targets.append(Target("kvm", system, host_cpuid))
    for name in pair:
        if name.startswith("sim"):
            prof = profile or (for_kvm_module(kvm_device_info()["module"]) if host_cpuid is not None
                               else None)
            system = SimSystem(supported_cpuid=host_cpuid, profile=prof)
            t = Target(f"sim[{system.profile}]", system, system.capabilities.supported_cpuid)
            t.profile = system.profile
            targets.append(t)
    order = {n: i for i, n in enumerate(pair)}
    targets.sort(key=lambda t: order.get(t.name.split("[")[0], 99))
    return targets


def assemble_guest(guest: G.Guest) -> tuple[bytes, dict]:
    """The guest's flat image and labels (nested guests: preprocessed and linked)."""
    return assemble(guest.source(), linked=guest.mode == "nested")


def run(target: Target, guest: G.Guest, *, max_exits: int = MAX_EXITS, image: bytes | None = None) -> Recording:
    """Run ``guest`` on ``target`` (``image``: its assembled bytes, e.g. on a rig without
    binutils; default: assemble its source here)."""
    if image is None:
        image, _syms = assemble_guest(guest)
    rec = Recording(target.name)
    lay = guest.layout
    dev = Devices(guest.seed, lay.mmio_base)
    t0 = time.perf_counter()
    vm = target.system.create_vm()
    try:
        vm.add_memory(0, lay.memory_size)
        vcpu = vm.create_vcpu(0)
        load_image(vm, vcpu, image, lay.mode, lay.memory_size, target.cpuid)
        vm.write(lay.ram_base, G.ram_init(guest.seed))
        if guest.msr_user_reasons:
            vm.enable_user_msr_exits(guest.msr_user_reasons)
        vm.set_msr_filter([(G.USER_MSRS[0], len(G.USER_MSRS), False, False)], default_allow=True)
        _loop(vcpu, dev, rec, max_exits)
        rec.regs = _regs(vcpu)
        rec.mmio = bytes(dev.mmio)
        rec.ram = vm.read(lay.ram_base, G.RAM_SIZE)
        rec.msrs = dict(dev.msrs)
        vcpu.close()
    finally:
        vm.close()
    rec.seconds = time.perf_counter() - t0
    return rec


def _loop(vcpu, dev, rec, max_exits):
    for _ in range(max_exits):
        timer = threading.Timer(RUN_TIMEOUT, vcpu.kick)
        timer.daemon = True
        timer.start()
        try:
            e = vcpu.run()
        except InterruptedError:
            rec.outcome, rec.detail = "timeout", f"no exit within {RUN_TIMEOUT}s"
            return
        finally:
            timer.cancel()
        rec.steps.append((e.to_dict(), _regs(vcpu)))
        if isinstance(e, X.IoOut):
            if e.port == G.END_PORT:
                rec.outcome = "end"
                return
            if e.port == P.UCALL_PORT and e.data[:1] == bytes([P.UCALL_EXCEPTION]):
                r = vcpu.get_regs()
                rec.outcome = "exception"
                rec.detail = f"vector {r.rbx & 0xff} at {r.rcx:#x}"
                return
            if e.port == P.UCALL_PORT and e.data[:1] in (bytes([P.UCALL_FAIL]), bytes([P.UCALL_DONE])):
                r = vcpu.get_regs()  # the library's FAIL (nested guests: no SVM offered) or DONE
                rec.outcome = "fail" if e.data[:1] == bytes([P.UCALL_FAIL]) else "end"
                rec.detail = f"ucall {e.data[0]} rbx={r.rbx:#x} rcx={r.rcx:#x}"
                return
        elif isinstance(e, X.IoIn):
            vcpu.complete(dev.port_in(e))
        elif isinstance(e, X.MmioRead):
            vcpu.complete(dev.mmio_read(e))
        elif isinstance(e, X.MmioWrite):
            dev.mmio_write(e)
        elif isinstance(e, X.MsrRead):
            v = dev.msr_read(e)
            vcpu.complete(0, error=True) if v is None else vcpu.complete(v)
        elif isinstance(e, X.MsrWrite):
            if not dev.msr_write(e):
                vcpu.complete(0, error=True)
        elif isinstance(e, X.Hlt):
            continue
        elif isinstance(e, X.Shutdown):
            rec.outcome = "shutdown"
            return
        elif isinstance(e, X.InternalError):
            rec.outcome = "internal"
            rec.detail = f"suberror {e.suberror}"
            return
        else:
            rec.outcome = "other"
            rec.detail = str(e)
            return
    rec.outcome = "limit"
    rec.detail = f"{max_exits} exits"


# -- comparison ------------------------------------------------------------------------
@dataclass
class Mismatch:
    kind: str            # exit | regs | length | outcome | mmio | ram | msrs | final-regs
    step: int            # index of the exit (-1: the end state)
    detail: str
    op: int | None = None  # the op the exit's RIP belongs to

    @property
    def signature(self) -> str:
        """What the shrinker keeps constant: the kind and, for exits/regs, what differs."""
        return self.kind + ":" + self.detail.split(" ", 1)[0]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "detail": self.detail, "op": self.op,
                "signature": self.signature}


def op_ranges(guest: G.Guest) -> list:
    """[(start rip, end rip)] of each op, as loaded."""
    _img, syms = assemble_guest(guest)
    base = P.GUEST_LOAD_ADDR
    return [(base + syms[f"op{i}_start"], base + syms[f"op{i}_end"]) for i in range(len(guest.ops))]


def _op_at(ranges, rip):
    for i, (a, b) in enumerate(ranges):
        if a <= rip < b or (rip == b and a < b):
            return i
    return None


def compare(guest: G.Guest, a: Recording, b: Recording, deviations=frozenset()) -> Mismatch | None:
    """The first difference between two recordings of the same guest, or None.

    ``deviations``: (leaf, subleaf, register) of CPUID results a backend's host is known
    not to honour (hostinfo.cpuid_deviations / the profile): not compared.
    """
    ranges = op_ranges(guest)
    n = min(len(a.steps), len(b.steps))
    for i in range(n):
        (ea, ra), (eb, rb) = a.steps[i], b.steps[i]
        op = _op_at(ranges, ra["rip"])
        if op is None:
            op = _op_at(ranges, rb["rip"])
        skip_regs = set()
        if ea.get("exit") == "IoOut" and ea.get("port") in G.CPUID_PORTS and ea == {**eb, "data": ea["data"]}:
            # CPUID results out one by one (gen.op_cpuid): RAX holds the one being sent,
            # RBX/RCX/RDX still the raw results; a register the host does not honour is
            # not compared, wherever it is
            k = G.CPUID_PORTS.index(ea["port"])
            lr, sr = guest.layout.cpuid_regs
            leaf, sub = ra[lr] & 0xFFFFFFFF, ra[sr] & 0xFFFFFFFF
            names = ("eax", "ebx", "ecx", "edx")
            if (leaf, sub, names[k]) in deviations:
                ea, eb = dict(ea, data="*"), dict(eb, data="*")
                skip_regs.add("rax")
            skip_regs.update("r" + n[1:] for n in names[1:] if (leaf, sub, n) in deviations)
        if ea != eb:
            return Mismatch("exit", i, f"{_exit_diff(ea, eb)} {a.backend}={_fmt_exit(ea)} "
                                       f"{b.backend}={_fmt_exit(eb)}", op)
        undef = guest.ops[op].undef_flags if op is not None else 0
        diff = [k for k in REG_NAMES if k not in skip_regs and
                ((ra[k] ^ rb[k]) & ~undef if k == "rflags" else ra[k] != rb[k])]
        if diff:
            return Mismatch("regs", i, ",".join(diff) + f" at {_fmt_exit(ea)}: " + "; ".join(
                f"{k} {a.backend}={ra[k]:#x} {b.backend}={rb[k]:#x}" for k in diff), op)
    if len(a.steps) != len(b.steps) or a.outcome != b.outcome:
        longer = a if len(a.steps) > len(b.steps) else b
        nxt = _fmt_exit(longer.steps[n][0]) if len(longer.steps) > n else ""
        op = _op_at(ranges, longer.steps[n][1]["rip"]) if len(longer.steps) > n else None
        return Mismatch("outcome", n, f"{a.outcome}/{b.outcome} {a.backend}: {len(a.steps)} exits "
                                      f"({a.outcome} {a.detail}), {b.backend}: {len(b.steps)} exits "
                                      f"({b.outcome} {b.detail}); next: {longer.backend} {nxt}", op)
    if a.outcome in ("end", "exception", "shutdown", "internal", "fail"):
        if a.mmio != b.mmio:
            offs = [i for i in range(len(a.mmio)) if a.mmio[i] != b.mmio[i]]
            return Mismatch("mmio", -1, f"device bytes differ at {guest.layout.mmio_base + offs[0]:#x} "
                                        f"(+{len(offs) - 1} more)")
        if a.ram != b.ram:
            offs = [i for i in range(len(a.ram)) if a.ram[i] != b.ram[i]]
            return Mismatch("ram", -1, f"scratch RAM differs at {guest.layout.ram_base + offs[0]:#x} "
                                       f"(+{len(offs) - 1} more)")
        if a.msrs != b.msrs:
            return Mismatch("msrs", -1, f"user MSR store {a.backend}={a.msrs} {b.backend}={b.msrs}")
    return None


def _fmt_exit(e: dict) -> str:
    rest = ",".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in e.items() if k != "exit")
    return f"{e.get('exit')}({rest})"


def _exit_diff(a: dict, b: dict) -> str:
    if a.get("exit") != b.get("exit"):
        return f"kind({a.get('exit')}/{b.get('exit')})"
    return a.get("exit") + "." + ",".join(sorted(k for k in a if a.get(k) != b.get(k)))


def cpuid_deviations(targets) -> frozenset:
    """CPUID registers not compared: those a kvm host is recorded as not honouring
    (hostinfo) and those the simulated module declares it sets itself (the profile)."""
    from ..hostinfo import cpuid_deviations as host_deviations

    out = set()
    for t in targets:
        if t.name == "kvm":
            out |= host_deviations("kvm")
        elif t.profile is not None:
            out |= t.profile.cpuid_unhonoured
    return frozenset(out)
