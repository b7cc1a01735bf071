"""A simulated vCPU: KVM_RUN over the SVM model over the unicorn core.

``run()`` enters the guest (VMRUN from the VMCB on first run or after a state
change), lets it run until the core stops, and turns what stopped it into the
SVM #VMEXIT (recorded in the VMCB and ``hw_trace``) and then into what KVM
would do: resume the guest in the kernel (CPUID, in-kernel MSRs, CR/DR moves,
exceptions it reflects) or return the userspace exit.

Userspace-visible timing follows KVM: during an MMIO read or MSR exit the guest RIP
is the instruction's (``get_regs`` shows it) and the instruction completes on
the next ``run()`` (``complete_emulated_*``); an MMIO write exits with its instruction
complete (a read-modify-write gives the read exit, then the write exit: sim/kvmlayer.py
``_exit_to_user``).  During an OUT exit RIP depends on the profile (sim/profile.py):
kvm_amd shows it AT the OUT and skips it on the next run (``complete_fast_pio_out``);
kvm_pvm, the hosts' KVM, shows it already past.  An IN shows RIP at the IN and the old
RAX until completed.  If userspace moves RIP before the next run, the pending completion
is dropped, as KVM does.

A ``kick()`` makes the current or next ``run()`` raise ``InterruptedError``
(errno EINTR), the way KVM_RUN returns -EINTR when a signal is pending.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import struct
import threading

import unicorn
from unicorn import x86_const as X

from .. import exits
from ..backend import Vcpu
from ..errors import SimulatorError, UsageError
from ..x86 import CpuidTable, DTable, Regs, Segment, Sregs
from . import core as corem
from . import kvmlayer as K
from .events import DeliveryFault, read_linear
from .profile import resolve as _resolve_profile
from .svm import PASSTHROUGH_MSRS, SVM_EXIT_IOIO, SVM_EXIT_NPF, Svm, ioio_exit_info1
from .ucbinding import pending_hook_exception
from .vcpustate import Phase, SimVcpuState

_M64 = 2**64 - 1
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
_stop = corem._lib.uc_emu_stop
_reg_read = corem._lib.uc_reg_read
_RIP = X.UC_X86_REG_RIP
_CR0 = X.UC_X86_REG_CR0
_SITES = corem.PRECISION == "sites"
_RF = 1 << 16


@functools.cache
def _mov_mnemonics(ix):
    return frozenset((ix.Mnemonic.MOV, ix.Mnemonic.MOVZX, ix.Mnemonic.MOVSX, ix.Mnemonic.MOVSXD))


@functools.cache
def _gpr_ids(ix):
    """iced's 64-bit GPRs -> unicorn's register ids."""
    names = ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
             "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15")
    return {getattr(ix.Register, n): getattr(X, f"UC_X86_REG_{n}") for n in names}


@functools.cache
def _high_bytes(ix):
    return frozenset((ix.Register.AH, ix.Register.CH, ix.Register.DH, ix.Register.BH))
_IO_MNEMONICS = []
EFER_LMA = 1 << 10
CR0_PE = 1


def _io_mnemonics(ix):
    if not _IO_MNEMONICS:
        M = ix.Mnemonic
        _IO_MNEMONICS.append(frozenset((M.IN, M.OUT, M.INSB, M.INSW, M.INSD, M.OUTSB, M.OUTSW,
                                        M.OUTSD)))
    return _IO_MNEMONICS[0]


class SimVcpu(K.KvmExitHandling, Vcpu):
    """One vCPU: its SVM state (``svm``: VMCB, ASID, IOPM/MSRPM, trace), KVM's per-vCPU
    state (CPUID table, in-kernel MSRs) and the core running it."""

    def __init__(self, vm, vcpu_id: int, asid: int):
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.profile = vm.system.profile or _resolve_profile()
        # exits whose RIP userspace sees at the instruction: MMIO reads, MSR exits, and IO
        # exits as the profile says (an MMIO write is complete when it exits: RIP past it)
        self._rip_at_insn = ("mmio_r", "rdmsr", "wrmsr") + \
            (() if self.profile.io_rip_past else ("out",)) + (() if self.profile.in_rip_past else ("in",))
        self.svm = Svm(asid)
        self.cpuid = CpuidTable()
        self.msrs = K.KvmMsrs(self.profile)
        self.single_step = False
        # KVM_RUN's state machine: where the guest state lives, the exit in flight, the
        # completion owed (sim/vcpustate.py; ``run_state.phase`` names where it stands)
        self.run_state = SimVcpuState()
        self._cr8 = 0
        self._apic_base = 0xFEE00900
        self._insn_cache = {}
        self._ioio_cache = {}
        self._out_exits = {}
        self._new_sites = []
        self._new_blocks = []
        self._vetted = set()
        self.core = corem.Core(vm._map_list, self.svm, self)
        self.set_sregs(_reset_sregs())
        self.set_regs(Regs(rip=0xFFF0, rflags=2, rdx=0x600))

    # -- inspection -----------------------------------------------------------
    @property
    def vmcb(self):
        """The VMCB as the hardware left it at the last #VMEXIT.

        The save area is written lazily, on the first access after the guest ran (the
        hardware writes it at every #VMEXIT; nobody can tell the difference).  Edits to
        the save area take effect after :meth:`load_vmcb_state`, as at a VMRUN.
        """
        if not self.run_state.need_entry and self.run_state.save_stale:
            self._sync_save_area()
        return self.svm.vmcb

    def load_vmcb_state(self) -> None:
        """Make the next ``run()`` VMRUN from the VMCB save area (e.g. after a host edited it)."""
        if self.run_state.save_stale and not self.run_state.need_entry:
            self._sync_save_area()
        self._reenter_from_vmcb()

    # -- the entry state, as world switches move it -----------------------------------------
    # ``run_state`` (sim/vcpustate.py) says where the guest state lives: ``need_entry`` (the
    # next run() enters from the VMCB save area, as VMRUN does), ``save_stale`` (the core
    # holds state the save area has not been given: a #VMEXIT's write is owed) and
    # ``shadow`` (the GPRs the VMCB has no room for).  Other modules (sim/nested.py's world
    # switches, the SEV-ES and SNP models) move it through these calls and run_state's
    # transitions, never by writing the fields.

    @property
    def phase(self) -> Phase:
        """Where KVM_RUN's state machine stands (entry, in-guest, pending-io/mmio/msr,
        shutdown, closed)."""
        return self.run_state.phase

    @property
    def in_guest(self) -> bool:
        """The core holds the live guest state (else the next run() enters from the VMCB)."""
        return not self.run_state.need_entry

    def write_save_area(self) -> None:
        """#VMEXIT's write of the core's state into the VMCB save area in force."""
        self._sync_save_area()

    def reenter_from_vmcb(self) -> None:
        """The next run() enters from the VMCB in force (the live GPRs kept in the shadow)."""
        self._reenter_from_vmcb()

    def continue_in_guest(self, gprs) -> None:
        """Go on running the core now, after a world switch the model made itself (VMLOAD,
        VMRUN into L2, a #VMEXIT to L1) into the VMCB in force: ``gprs`` are the (name,
        value) pairs the switch leaves in the registers; from here a #VMEXIT's write of the
        save area is owed again."""
        st = self.run_state
        st.reenter(gprs)  # the shadow takes the switch's registers ...
        st.entered()  # ... and the core runs on from them
        st.save_stale = True
        self.core.enter(st.shadow, None, reuse=True)

    def deliver_exception(self, vector: int, error_code: int | None, rip: int) -> None:
        """Deliver an exception to the running guest at ``rip`` now, as the CPU does for a
        fault the model raises (a delivery that faults escalates: #DF, then shutdown)."""
        self._inject_now(vector, error_code, rip)

    def post_event(self, kind: int, rip: int) -> None:
        """Have the run loop hand event ``kind`` (at ``rip``) to the model once the core
        stops (sim/nested.py's NESTED_IO_EVENT)."""
        self.run_state.post_event(kind, rip)

    def fault_answered(self) -> None:
        """An event handler answered the access the core stopped on (an SEV-ES MMIO #VC, an
        RMP fault): the core's error for it is then not a KVM_RUN result."""
        self.run_state.fault_answered()

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Deliver an exception to the guest before it runs again (KVM_SET_VCPU_EVENTS'
        role; the SEV-ES model uses it for #VC).  A delivery that faults escalates to #DF,
        then to a triple fault (the next run() returns Shutdown)."""
        st = self.run_state
        if st.need_entry:
            st.entered()
            self._insn_cache.clear()
            self._ioio_cache.clear()
            self.core.enter(st.shadow, None)
        self._inject_now(vector, error_code)

    # -- the decode API: the guest's instructions as the exit handlers read them ------------
    # sim/nested.py builds L1's #VMEXIT information from these (the private helpers behind
    # them are the run loop's own and may change).

    def decode_insn(self, rip: int):
        """The instruction at guest RIP ``rip`` (an iced_x86 Instruction, decoded in the
        current mode), or None where it cannot be fetched or is invalid."""
        return self._insn(rip)

    def code_bytes(self, rip: int, n: int) -> bytes:
        """Up to ``n`` bytes at guest RIP ``rip`` (fewer where the page walk stops)."""
        return self._code_bytes(rip, n)

    def is_soft_int(self, vector: int, rip: int) -> bool:
        """Whether ``vector`` raised with RIP ``rip`` past the instruction came from INT n,
        INT3 or INT1 (a trap the guest asked for) rather than a fault."""
        return self._is_soft_int(vector, rip)

    def exception_error_code(self, vector: int, rip: int) -> int:
        """The error code the CPU pushes for ``vector`` at ``rip`` (#PF's, else 0)."""
        return self._error_code(vector, rip)

    def fault_address(self, rip: int) -> tuple[int, int]:
        """(faulting linear address, #PF error code) of the instruction at ``rip``."""
        return self._fault_address(rip)

    def ioio_exit_info(self, rip: int, port: int, size: int, is_in: bool) -> tuple[int, int, bool]:
        """(EXITINFO1, next RIP, string instruction?) of the IN/OUT at ``rip``, as
        #VMEXIT(IOIO) reports it."""
        return self._ioio_decode(rip, port, size, is_in)

    def gdt_descriptor(self, gdt_base: int, gdt_limit: int, sel: int):
        """(selector, VMCB attrib, limit, base) of ``sel`` in the GDT at ``gdt_base``, or
        None (null, beyond the limit, an LDT selector or unreadable)."""
        return self._gdt_descriptor(gdt_base, gdt_limit, sel)

    @property
    def hw_trace(self):
        return self.svm.trace

    def hardware_trace(self) -> list:
        """Every #VMEXIT the SVM model took (sim/trace.py records), oldest first."""
        return self.svm.trace

    def add_vmexit_hook(self, callback) -> None:
        """``callback(record)`` at every #VMEXIT, the ones KVM handles itself included."""
        self.svm.on_vmexit.append(callback)

    def remove_vmexit_hook(self, callback) -> None:
        self.svm.on_vmexit.remove(callback)

    # -- nested state (sim/nested.py) ------------------------------------------------------
    def get_nested_state(self):
        """KVM_GET_NESTED_STATE, as svm_get_nested_state lays it out."""
        from .nested import get_nested_state

        return get_nested_state(self)

    def set_nested_state(self, state) -> None:
        """KVM_SET_NESTED_STATE, with svm_set_nested_state's checks."""
        from .nested import set_nested_state

        set_nested_state(self, state)

    def complete_pending_exit(self) -> None:
        """Nothing to do: the simulator finishes an IO exit's instruction before it returns
        the exit (where RIP then stands is its profile's, sim/profile.py)."""

    # -- KVM_RUN ---------------------------------------------------------------
    def run(self):
        st = self.run_state
        if st.closed:
            raise ValueError("vCPU is closed")
        if st.kicked:
            st.kicked = False
            raise InterruptedError(errno.EINTR, "KVM_RUN interrupted by kick()")
        if st.shutdown:
            return exits.Shutdown()
        p = st.pending
        if p is not None:
            if p[0] == "out" and st.completion is None and not st.rip_moved:
                st.pending = None  # OUT is complete in the core already (fast path)
            else:
                self._apply_completion()
        self._before_run()  # sim/kvmlayer.py: the profile's MSR intercepts; RF of a REP exit
        core = self.core
        st.running = True
        st.save_stale = True
        try:
            while True:
                st.exit = st.event = None
                retrying = False
                if st.need_entry:
                    st.entered()
                    self._insn_cache.clear()
                    self._ioio_cache.clear()
                    self._vetted.clear()
                    err = core.enter(st.shadow, None)
                    if err == corem.UC_ERR_OK:
                        continue  # entered: run from the guest's first instruction below
                elif st.replay is not None:
                    err = self._run_replay()
                else:
                    resume, st.resume = st.resume, None
                    rip = core.rip() if resume is None else resume
                    retrying, st.precise_retry = st.precise_retry, False
                    if self.single_step or retrying:
                        count = 1
                    else:
                        count = corem.RUN_COUNT
                        if _SITES:
                            _reg_read(core.uch, _CR0, core._bufp)
                            lin = rip if core._buf.value & 1 else self._linear(rip)
                            if lin not in self._vetted:
                                self._vet(lin)
                    err = core.start(rip, count) if count != 1 else core.start_counted(rip, 1)
                if self._new_sites:
                    self._hook_new_sites()
                    if st.exit is None and st.event is None:
                        continue
                if core.hook_error is not None or pending_hook_exception(core.uc) is not None:
                    hook_error = core.take_hook_error()
                    raise SimulatorError(f"simulator hook failed: {hook_error!r}") from hook_error
                if st.event is not None:
                    if not retrying and self._fault_needs_precise_retry(st.event[0]):
                        continue
                    self._handle_event()
                if st.exit is not None:
                    return self._exit_to_user()  # sim/kvmlayer.py: what KVM finishes first
                if err != corem.UC_ERR_OK:
                    if not st.fault_consumed:
                        return self._core_error(err)
                    st.fault_consumed = False  # the model turned the access into an event
                if st.kicked:
                    st.kicked = False
                    raise InterruptedError(errno.EINTR, "KVM_RUN interrupted by kick()")
                if self.single_step and st.event is None and not st.need_entry:
                    rip = core.rip()
                    return exits.Debug(exception=1, pc=rip, dr6=0xFFFF4FF0, dr7=0x400)
        finally:
            st.running = False

    def complete(self, value=0, *, error: bool = False) -> None:
        if self.run_state.pending is None:
            raise UsageError("complete() called but the last exit asked for no data")
        self.run_state.completion = (value, error)

    def kick(self) -> None:
        self.run_state.kicked = True
        self.core.stop()

        def again():
            if self.run_state.running and self.run_state.kicked:
                self.core.stop()

        for delay in (0.005, 0.05):
            t = threading.Timer(delay, again)
            t.daemon = True
            t.start()

    # -- hooks (called by the core while the guest runs) ------------------------
    def on_out(self, _uc, port, size, value, _ud):
        """IN/OUT hooks take unicorn's raw callback arguments: this is the hot path.
        (A raw ctypes callback cannot raise: errors are kept and re-raised by run().)"""
        try:
            self._on_out(port, size, value)
        except BaseException as e:  # noqa: BLE001 - re-raised by run()
            self.core.hook_failed(e)

    def on_out_recorded(self, rip, port, size, value) -> bool:
        """An OUT the C hook recorded (sim/simhooks.c), handled after the engine stopped with
        the RIP the hook saw: an OUT exit reads no other register, so the engine need not be
        shown the hook's registers first.  False (nothing done) where something else may read
        the engine meanwhile -- an L2 guest's exit (sim/nested.py) or a #VMEXIT observer
        (SEV-ES's VMSA write, a trace callback) -- and the caller shows it them instead."""
        if self.svm.on_vmexit or self.nested is not None and self.nested.guest_mode:
            return False
        try:
            self._on_out(port, size, value, rip)
        except BaseException as e:  # noqa: BLE001 - re-raised by run(), as from the hook
            self.core.hook_failed(e)
        return True

    def on_in_recorded(self, rip, port, size, rax, rcx, rdi) -> bool:
        """An IN the C hook recorded, with the registers it read at the instruction (RAX for
        KVM_GET_REGS until completion; RCX and RDI for INS); see :meth:`on_out_recorded`."""
        if self.svm.on_vmexit or self.nested is not None and self.nested.guest_mode:
            return False
        try:
            self._on_in(port, size, (rip, rax, rcx, rdi))
        except BaseException as e:  # noqa: BLE001 - re-raised by run(), as from the hook
            self.core.hook_failed(e)
        return True

    def _on_out(self, port, size, value, rip=None):
        core = self.core
        if rip is None:  # a Python hook: the engine stands at the OUT
            _reg_read(core.uch, _RIP, core._bufp)
            rip = core._buf.value
        nested = self.nested
        if nested is not None and nested.guest_mode and nested.io_intercepted(port, size):
            nested.io_exit(rip, port, size, False)  # L1's port: reflected (sim/nested.py)
            _stop(core.uch)
            return
        key = (rip, port, size, False)
        hit = self._ioio_cache.get(key)
        if hit is None:
            hit = self._ioio_cache[key] = self._ioio_decode(rip, port, size, False)
        info1, next_rip, string = hit
        self.svm.vmexit(SVM_EXIT_IOIO, info1, next_rip, rip, next_rip, "IoOut")
        value &= _MASK[size]
        ekey = (port, size, value)
        e = self._out_exits.get(ekey)  # exit values are immutable: reuse them (frozen init is slow)
        if e is None:
            if len(self._out_exits) > 1024:
                self._out_exits.clear()
            e = self._out_exits[ekey] = exits.IoOut(port, size, 1, value.to_bytes(size, "little"))
        st = self.run_state  # the hot path: exit_to_user and owe("out", ...) inlined
        st.exit = e
        st.pending = ("out", rip, next_rip, None)
        # a REP OUTS stops after one element with RIP still on it (one exit per element)
        st.resume = None if string else next_rip
        _stop(core.uch)

    def _ioio_decode(self, rip, port, size, is_in):
        ilen, string, rep, asz = self._io_insn(rip)
        info1 = ioio_exit_info1(port, size, is_in, string=string, rep=rep, addr_size=asz)
        if len(self._ioio_cache) > 4096:
            self._ioio_cache.clear()
        return info1, rip + ilen, string

    def on_in(self, _uc, port, size, _ud):
        try:
            return self._on_in(port, size)
        except BaseException as e:  # noqa: BLE001 - re-raised by run()
            self.core.hook_failed(e)
            return 0

    def _on_in(self, port, size, recorded=None):
        """``recorded``: (RIP, RAX, RCX, RDI) as the C hook read them at the IN; None in a
        Python hook, where the engine stands at the IN and is read."""
        core = self.core
        rip = core.rip() if recorded is None else recorded[0]
        nested = self.nested
        if nested is not None and nested.guest_mode and nested.io_intercepted(port, size):
            nested.io_exit(rip, port, size, True)  # L1's port: reflected (sim/nested.py)
            _stop(core.uch)
            return 0
        key = (rip, port, size, True)
        hit = self._ioio_cache.get(key)
        if hit is None:
            hit = self._ioio_cache[key] = self._ioio_decode(rip, port, size, True)
        info1, next_rip, string = hit
        count, extra = 1, None
        if string:
            rep = bool(info1 & 8)
            if recorded is None:
                rcx, rdi = core.reg(X.UC_X86_REG_RCX), core.reg(X.UC_X86_REG_RDI)
            else:
                rcx, rdi = recorded[2], recorded[3]
            count = self._ins_count(size, rcx, rdi, rep, info1)  # sim/kvmlayer.py
            extra = (rcx, rdi, count, rep, info1)
        self.svm.vmexit(SVM_EXIT_IOIO, info1, next_rip, rip, next_rip, "IoIn")
        # KVM_GET_REGS shows it until completed
        self.run_state.in_old_rax = core.reg(X.UC_X86_REG_RAX) if recorded is None else recorded[1]
        self.run_state.exit_to_user(exits.IoIn(port, size, count))
        self.run_state.owe("in", rip, next_rip, (size, extra))
        self.run_state.resume = None if string else next_rip
        _stop(core.uch)
        return 0

    def on_new_block(self, pc, size):
        """A block was just translated (not yet run): if it holds IN/OUTs not yet hooked,
        stop before it runs; the run loop hooks them and drops the block, which is then
        translated again with the hooks in place.

        A block found to hold no new IN/OUT is remembered (in ``_insn_cache``: cleared when
        the host rewrites code or the guest is entered afresh), so the same block translated
        again -- after an MMIO replay dropped it -- is not scanned again."""
        key = ("no-io", pc, size)
        if key in self._insn_cache:
            return
        found = self._scan_io(pc, pc + size)
        if found:
            self._new_sites.extend(found)
            self._new_blocks.append((pc, pc + size))
            _stop(self.core.uch)
        else:
            self._remember(key, bool, True)

    def _scan_io(self, start, end, *, until_branch=False):
        ix = K._decoder()
        data = self._lin_bytes(start, max(1, end - start))
        found = []
        known = self.core.io_sites
        for insn in ix.Decoder(self._bitness(), data, ip=start):
            if insn.code == ix.Code.INVALID or insn.ip + insn.len > start + len(data):
                break
            if insn.mnemonic in _io_mnemonics(ix) and insn.ip not in known:
                found.append((insn.ip, insn.next_ip))
            if until_branch and insn.flow_control != ix.FlowControl.NEXT:
                break
        return found

    def _vet(self, lin):
        """Before running from ``lin``: hook the IN/OUTs of the straight-line code there
        (the first block of a run is translated without a new-block event)."""
        self._vetted.add(lin)
        found = self._scan_io(lin, (lin | 0xFFF) + 1, until_branch=True)
        if found:
            for site, end in found:
                self.core.add_io_site(site, end)
            self.core.uc.ctl_remove_cache(lin, found[-1][1] + 1)  # blocks made before the hooks

    def code_changed(self) -> None:
        """The host rewrote guest code: decoded instructions and scanned starts are stale."""
        self._insn_cache.clear()
        self._ioio_cache.clear()
        self._vetted.clear()

    def _hook_new_sites(self):
        for site, end in self._new_sites:
            self.core.add_io_site(site, end)
        for start, end in self._new_blocks:
            self.core.uc.ctl_remove_cache(start, end)
        self._new_sites.clear()
        self._new_blocks.clear()

    def on_intr(self, intno):
        self.run_state.post_event(intno, self.core.rip())
        self.core.stop()

    def _fault_needs_precise_retry(self, intno):
        """Without an instruction count, unicorn raises a guest fault twice before the INTR
        hook sees it (so a #PF arrives as #DF, measured).  Faults are restartable: forget
        what was reported, reset QEMU's escalation state and re-execute the instruction
        under a count of 1, which reports the fault exactly."""
        if not _SITES or self.single_step:
            return False
        if intno < 32 and self._is_soft_int(intno, self.run_state.event[1]):
            return False  # INT n / INT3 / INT1 are traps: the hook saw them exactly, RIP past
        if intno < 32 or intno == 0x100 + 0x7F:
            self.core.reset_exception_state()
            self.run_state.precise_retry = True
            return True
        return False

    def on_invalid(self):
        self.run_state.post_event(6, self.core.rip())
        self.core.stop()
        return True

    def on_unmapped(self, access, addr, size, value):
        if access == unicorn.UC_MEM_FETCH_UNMAPPED:
            return False
        rip = self.core.rip()
        write = access in (unicorn.UC_MEM_WRITE_UNMAPPED, unicorn.UC_MEM_WRITE_PROT)
        gpa = addr
        # NPF EXITINFO1: #PF-style error code (P=0 unbacked, W, bit 32 = final GPA); EXITINFO2: GPA
        info1 = (1 << 32) | (2 if write else 0) | (1 if access == unicorn.UC_MEM_WRITE_PROT else 0)
        if write:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.svm.vmexit(SVM_EXIT_NPF, info1, gpa, rip, 0, "MmioWrite")
            self.run_state.exit_to_user(exits.MmioWrite(gpa, size, data))
        else:
            self.svm.vmexit(SVM_EXIT_NPF, info1, gpa, rip, 0, "MmioRead")
            self.run_state.exit_to_user(exits.MmioRead(gpa, size))
        self.run_state.owe("mmio_w" if write else "mmio_r", rip, rip, (gpa, size, access))
        return False

    # -- completion of the previous exit (KVM's complete_userspace_io) -----------
    def _apply_completion(self):
        pending, self.run_state.pending = self.run_state.pending, None
        value, error = self.run_state.completion or (0, False)
        self.run_state.completion = None
        if pending is None:
            return
        kind, insn_rip, next_rip, extra = pending
        core = self.core
        if kind in ("out", "in"):
            if self.run_state.rip_moved:
                self.run_state.rip_moved = False
                return
            if kind == "in":
                size, string = extra
                if string is None:
                    _write_acc(core, size, value)
                else:
                    self._complete_ins(size, string, value, insn_rip, next_rip)
            return
        if self.run_state.rip_moved:
            self.run_state.rip_moved = False
            return
        if kind in ("mmio_r", "mmio_w"):
            gpa, size, access = extra
            data = value if isinstance(value, (bytes, bytearray)) else \
                (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.run_state.replay = (gpa, data if kind == "mmio_r" else b"", access)
            return
        if kind == "rdmsr":
            if error:
                self._inject_now(13, 0)
                return
            v = int(value) & _M64
            core.set_reg(X.UC_X86_REG_RAX, v & 0xFFFFFFFF)
            core.set_reg(X.UC_X86_REG_RDX, v >> 32)
            core.set_reg(X.UC_X86_REG_RIP, next_rip)
        elif kind == "wrmsr":
            if error:
                self._inject_now(13, 0)
                return
            core.set_reg(X.UC_X86_REG_RIP, next_rip)

    def _replay_stop(self, rip):
        """Where the engine can stop after re-running the MMIO instruction at ``rip`` without a
        count (Core.step_to): the next instruction, for one that always falls through to it --
        no branch, no string or REP instruction (one element per exit) -- in protected or long
        mode (linear = RIP) with sites precision (in count precision a run without a count
        drops every translated block); None otherwise."""
        if not _SITES or not self.core.cr(0) & 1:
            return None
        return self._remember(("stop", rip), self._stop_after, rip)

    def _stop_after(self, rip):
        ix = K._decoder()
        insn = self._insn_at(rip)
        if (insn is None or insn.flow_control != ix.FlowControl.NEXT or insn.is_string_instruction
                or insn.has_rep_prefix or insn.has_repe_prefix or insn.has_repne_prefix):
            return None
        return (rip + insn.len) & _M64

    def _mov_plan(self, rip):
        """How to finish an MMIO MOV at ``rip`` without re-executing it, or None (not a plain
        MOV/MOVZX/MOVSX/MOVSXD between a GPR or immediate and memory): ("store", next RIP) --
        the store went out as the exit, nothing is left but RIP -- or ("load", next RIP, the
        full register's unicorn id, bit shift, register width, memory size, sign-extend)."""
        ix = K._decoder()
        insn = self._insn_at(rip)
        if insn is None or insn.op_count != 2 or insn.mnemonic not in _mov_mnemonics(ix):
            return None
        after = (rip + insn.len) & _M64
        if insn.op0_kind == ix.OpKind.MEMORY and insn.mnemonic == ix.Mnemonic.MOV:
            return ("store", after)
        if insn.op0_kind != ix.OpKind.REGISTER or insn.op1_kind != ix.OpKind.MEMORY:
            return None
        info = ix.RegisterInfo(insn.op0_register)
        uc_reg = _gpr_ids(ix).get(info.full_register)
        if uc_reg is None:  # a segment register: not a plain load
            return None
        shift = 8 if insn.op0_register in _high_bytes(ix) else 0
        msize = ix.MemorySizeInfo(insn.memory_size).size
        signed = insn.mnemonic in (ix.Mnemonic.MOVSX, ix.Mnemonic.MOVSXD)
        return ("load", after, uc_reg, shift, info.size, msize, signed)

    def _replay_mov(self, rip, data) -> bool:
        """Finish an MMIO MOV as the CPU would have: the loaded value into its register (a
        32-bit write zero-extends, 8/16-bit writes keep the rest), RIP past it, RFLAGS.RF
        cleared.  False where the instruction is not one (:meth:`_mov_plan`), or in real mode
        (where the next IP wraps at 64 KiB and the general re-run is kept)."""
        core = self.core
        if not core.cr(0) & 1:
            return False
        plan = self._remember(("mov", rip), self._mov_plan, rip)
        if plan is None:
            return False
        if plan[0] == "load":
            _, _, reg, shift, width, msize, signed = plan
            if len(data) != msize:
                return False
            value = int.from_bytes(data, "little")
            if signed and value >> (8 * msize - 1):
                value -= 1 << (8 * msize)
            value &= (1 << (8 * width)) - 1
            if width < 4:
                mask = ((1 << (8 * width)) - 1) << shift
                value = (core.reg(reg) & ~mask) | (value << shift)
            core.set_reg(reg, value)
        elif data:
            return False
        rflags = core.reg(X.UC_X86_REG_RFLAGS)
        if rflags & _RF:
            core.set_reg(X.UC_X86_REG_RFLAGS, rflags & ~_RF)
        core.set_reg(X.UC_X86_REG_RIP, plan[1])
        return True

    def _run_replay(self):
        """Re-execute the MMIO instruction against a scratch page holding userspace's data
        (a plain MOV is finished directly: :meth:`_replay_mov`)."""
        gpa, data, access = self.run_state.replay
        self.run_state.replay = None
        core = self.core
        if access != unicorn.UC_MEM_WRITE_PROT and self._replay_mov(core.rip(), data):
            return corem.UC_ERR_OK
        page = gpa & ~0xFFF
        scratch = bytearray(0x1000 + 8)
        off = gpa - page
        scratch[off:off + len(data)] = data
        buf = (ctypes.c_char * len(scratch)).from_buffer(scratch)
        readonly_region = access == unicorn.UC_MEM_WRITE_PROT
        if readonly_region:
            core.uc.mem_protect(page, 0x1000, unicorn.UC_PROT_ALL)
            saved = core.read_phys(page, 0x1000)
        else:
            core.uc.mem_map_ptr(page, 0x1000, unicorn.UC_PROT_ALL, ctypes.addressof(buf))
        try:
            writes = []
            hook = core.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE,
                                    lambda _uc, _a, addr, size, value, _ud: writes.append((addr, size, value)),
                                    begin=page, end=page + 0xFFF)
            try:
                rip = core.rip()
                after = self._replay_stop(rip)
                err = core.step_to(rip, after) if after is not None else None
                if err is None:
                    err = core.start_counted(rip, 1)
            finally:
                core.uc.hook_del(hook)
            self._replay_writes(writes, data == b"")  # sim/kvmlayer.py: the RMW's write exit
            return err
        finally:
            if readonly_region:
                core.write_phys(page, saved)
                core.uc.mem_protect(page, 0x1000, unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC)
            else:
                core.unmap(page, 0x1000)
            del buf

    # -- state --------------------------------------------------------------------
    def get_regs(self) -> Regs:
        st = self.run_state
        if st.need_entry:
            s = self.svm.vmcb.save
            return Regs(rax=s.rax, rsp=s.rsp, rip=s.rip, rflags=s.rflags,
                        **{k: v for k, v in st.shadow.items()})
        vals = self.core.gprs()
        regs = Regs(*vals)
        if st.pending is not None and not st.rip_moved and st.pending[0] in self._rip_at_insn:
            regs.rip = st.pending[1]
        if st.pending is not None and st.pending[0] == "in" and st.pending[3][1] is None:
            regs.rax = st.in_old_rax  # KVM writes the accumulator only when completing the IN
        return regs

    def set_regs(self, regs: Regs) -> None:
        st = self.run_state
        st.resume = None
        st.save_stale = True
        if st.need_entry:
            s = self.svm.vmcb.save
            s.rax, s.rsp, s.rip, s.rflags = regs.rax, regs.rsp, regs.rip, regs.rflags | 2
            for k in st.shadow:
                st.shadow[k] = getattr(regs, k) & _M64
            return
        if st.pending is not None:
            # MSR and MMIO exits keep RIP at the instruction until completed; IO exits too on
            # kvm_amd, while the hosts' kvm_pvm reports RIP past the IN/OUT (profile.io_rip_past)
            shown = st.pending[1] if st.pending[0] in self._rip_at_insn else self.core.rip()
            if regs.rip != shown:
                st.rip_moved = True
        values = [getattr(regs, n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")]
        if st.pending is not None and not st.rip_moved and st.pending[0] in self._rip_at_insn:
            values.append(self.core.rip())
        else:
            values.append(regs.rip)
        values.append(regs.rflags | 2)
        self.core.set_gprs(values)

    def get_sregs(self) -> Sregs:
        if self.in_guest:
            self._sync_save_area()
        s = self.svm.vmcb.save
        segs = {n: getattr(s, n).to_segment() for n in ("cs", "ds", "es", "fs", "gs", "ss")}
        return Sregs(tr=s.tr.to_segment(), ldt=s.ldtr.to_segment(),
                     gdt=DTable(s.gdtr.base, s.gdtr.limit), idt=DTable(s.idtr.base, s.idtr.limit),
                     cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, cr8=self._cr8, efer=s.efer,
                     apic_base=self._apic_base, **segs)

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS: the state goes into the VMCB save area; the next run() VMRUNs from it."""
        if self.in_guest:
            self._sync_save_area()
        s = self.svm.vmcb.save
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            getattr(s, name).load(getattr(sregs, name))
        s.tr.load(sregs.tr)
        s.ldtr.load(sregs.ldt)
        s.gdtr.base, s.gdtr.limit = sregs.gdt.base, sregs.gdt.limit
        s.idtr.base, s.idtr.limit = sregs.idt.base, sregs.idt.limit
        s.cr0, s.cr2, s.cr3, s.cr4, s.efer = sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer
        self.svm.update_cr0_intercepts(sregs.cr0)
        s.cpl = sregs.cs.dpl if sregs.cr0 & CR0_PE else 0
        self._cr8 = sregs.cr8
        self._apic_base = sregs.apic_base
        self._reenter_from_vmcb()

    def _reenter_from_vmcb(self):
        if self.in_guest:
            vals = self.core.gprs()
            names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                     "r12", "r13", "r14", "r15")
            for n, v in zip(names, vals):
                if n in self.run_state.shadow:
                    self.run_state.shadow[n] = v
        self.run_state.need_entry = True

    def _sync_save_area(self):
        """Write the guest state into the save area, as #VMEXIT does (done lazily here)."""
        self.run_state.save_stale = False
        core = self.core
        s = self.svm.vmcb.save
        real = not core.cr(0) & CR0_PE
        gdt_sel, gdt_base, gdt_limit, _ = core.mmr("gdtr")
        for name in ("es", "cs", "ss", "ds", "fs", "gs"):
            sel = core.selector(name)
            rec = getattr(s, name)
            if sel == rec.selector and not (real and rec.base != sel << 4):
                pass
            elif real:
                rec.selector, rec.base = sel, sel << 4
            else:
                desc = self._gdt_descriptor(gdt_base, gdt_limit, sel)
                if desc is not None:
                    rec.selector, rec.attrib, rec.limit, rec.base = desc
                else:
                    rec.selector = sel
        for name in ("fs", "gs"):
            base = core.reg(X.UC_X86_REG_FS_BASE if name == "fs" else X.UC_X86_REG_GS_BASE)
            getattr(s, name).base = base
        s.gdtr.base, s.gdtr.limit = gdt_base, gdt_limit
        _i, idt_base, idt_limit, _ = core.mmr("idtr")
        s.idtr.base, s.idtr.limit = idt_base, idt_limit
        for name, rec in (("ldtr", s.ldtr), ("tr", s.tr)):
            sel, base, limit, flags = core.mmr(name)
            rec.selector, rec.base, rec.limit = sel, base, limit
            if flags:
                rec.attrib = ((flags >> 8) & 0xFF) | ((flags >> 12) & 0xF00)
        s.cr0, s.cr3, s.cr4 = core.cr(0), core.cr(3), core.cr(4)  # CR2 is kept in s.cr2 (core.py)
        s.efer = core.msr_read_native(corem.MSR_EFER)  # with SVME if the guest set it (KVM_GET_SREGS)
        if s.efer & EFER_LMA or s.star or s.lstar:  # the VMLOAD/VMSAVE set, so a re-entry keeps them
            for index, name in _VMCB_MSR_FIELDS.items():
                if name != "efer":
                    setattr(s, name, core.msr_read_native(index))
        s.dr6, s.dr7 = core.dr(6), core.dr(7)
        vals = core.gprs()
        s.rax, s.rsp, s.rip, s.rflags = vals[0], vals[6], vals[16], vals[17]
        s.cpl = 0 if real else s.cs.attrib >> 5 & 3
        self._cr8 = core.cr(8)

    def _gdt_descriptor(self, gdt_base, gdt_limit, sel):
        if sel & ~3 == 0 or (sel | 7) > gdt_limit or sel & 4:
            return None
        try:
            (d,) = struct.unpack("<Q", read_linear(self.core, gdt_base + (sel & ~7), 8))
        except DeliveryFault:
            return None
        limit = (d & 0xFFFF) | ((d >> 32) & 0xF0000)
        base = ((d >> 16) & 0xFFFFFF) | ((d >> 32) & 0xFF000000)
        attrib = ((d >> 40) & 0xFF) | ((d >> 44) & 0xF00)
        if attrib & 0x800:
            limit = (limit << 12) | 0xFFF
        return sel, attrib, limit, base

    def get_msrs(self, indices) -> dict:
        out = {}
        for i in indices:
            if i in PASSTHROUGH_MSRS:
                out[i] = self.core.msr_read_native(i) if not self.run_state.need_entry else self._entry_msr(i)
            elif self.msrs.known(i):
                out[i] = self.msrs.read(i)
        return out

    def set_msrs(self, values: dict) -> int:
        n = 0
        for i, v in values.items():
            if i in PASSTHROUGH_MSRS:
                if self.run_state.need_entry:
                    _vmcb_msr(self.svm.vmcb.save, i, v)  # VMRUN/VMLOAD load these from the VMCB
                else:
                    self.core.msr_write_native(i, v)
            elif not (self.msrs.known(i) and self.msrs.write(i, v)):
                break
            n += 1
        return n

    def _entry_msr(self, i):
        return _vmcb_msr(self.svm.vmcb.save, i)

    def set_cpuid(self, entries) -> None:
        self.cpuid = entries if isinstance(entries, CpuidTable) else CpuidTable(entries)

    def set_single_step(self, enabled: bool) -> None:
        self.single_step = bool(enabled)

    def close(self) -> None:
        self.run_state.closed = True
        self.core.close()


_VMCB_MSR_FIELDS = {0xC0000080: "efer", 0xC0000081: "star", 0xC0000082: "lstar", 0xC0000083: "cstar",
                    0xC0000084: "sfmask", 0xC0000102: "kernel_gs_base", 0x174: "sysenter_cs",
                    0x175: "sysenter_esp", 0x176: "sysenter_eip"}


def _vmcb_msr(save, index, value=None):
    """Read or write an MSR's home in the save area (FS/GS base live in the segment records)."""
    if index in (0xC0000100, 0xC0000101):
        rec = save.fs if index == 0xC0000100 else save.gs
        if value is not None:
            rec.base = value
        return rec.base
    name = _VMCB_MSR_FIELDS[index]
    if value is not None:
        setattr(save, name, value)
    return getattr(save, name)


def _write_acc(core, size, value):
    rax = core.reg(X.UC_X86_REG_RAX)
    v = int(value) if not isinstance(value, (bytes, bytearray)) else int.from_bytes(value[:size], "little")
    if size == 1:
        rax = (rax & ~0xFF) | (v & 0xFF)
    elif size == 2:
        rax = (rax & ~0xFFFF) | (v & 0xFFFF)
    else:
        rax = v & 0xFFFFFFFF  # a 32-bit destination zero-extends
    core.set_reg(X.UC_X86_REG_RAX, rax)


def _reset_sregs() -> Sregs:
    """The architectural reset state KVM gives a new vCPU (kvm_vcpu_reset / init_vmcb)."""
    data = dict(limit=0xFFFF, type=3, present=1, s=1)
    return Sregs(cs=Segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, type=0xB, present=1, s=1),
                 ds=Segment(**data), es=Segment(**data), fs=Segment(**data), gs=Segment(**data),
                 ss=Segment(**data), tr=Segment(limit=0xFFFF, type=0xB, present=1, s=0),
                 ldt=Segment(limit=0xFFFF, type=2, present=1, s=0),
                 gdt=DTable(0, 0xFFFF), idt=DTable(0, 0xFFFF), cr0=0x60000010, efer=0)
