"""Nested SVM on the simulator: KVM's emulation of VMRUN / #VMEXIT for a guest hypervisor.

A guest (L1) that sets EFER.SVME and executes VMRUN runs its own guest (L2) on
KVM's nested SVM (arch/x86/kvm/svm/nested.c).  This module is that layer of the
model, for one vCPU, written after what kvm_amd does on the SVM rig
(docs/facts.md#rig-nested-svm) and nested.c:

* L1's VMRUN is intercepted by KVM's VMCB (vmcb01) like any VMRUN (exit 0x80,
  traced as handled by the kernel).  ``nested_svm_check_permissions``: #UD
  without EFER.SVME or paging, #GP at CPL > 0; #GP for an unaligned VMCB address
  or no VM_HSAVE_PA.  Then the consistency checks (``nested_vmcb_check_save``
  / ``_controls``: ASID 0, no VMRUN intercept, L2 EFER without SVME, CS.L with
  CS.D in long mode, CR0 CD/NW, reserved CR0/DR6/DR7 bits, long mode without
  PAE/PE, NP_ENABLE which this model cannot nest): on failure only exit code -1
  (VMEXIT_INVALID) and EXITINFO1/2 = 0 are written into L1's VMCB (vmcb12) and
  L1 continues after its VMRUN.
* Otherwise L1's state is kept in vmcb01's save area (RIP = after VMRUN) and a
  vmcb02 is built: KVM's own control area with the intercept vectors OR-ed with
  L1's (``recalc_intercepts``), the save area loaded from vmcb12 (ES/CS/SS/DS,
  GDTR/IDTR, EFER, CR0/2/3/4, RFLAGS, RIP, RSP, RAX, DR6/DR7, CPL), FS/GS/TR/
  LDTR and the VMLOAD MSRs left as L1 had them (VMRUN does not load them).  The
  vCPU's ``svm.vmcb`` becomes vmcb02 (KVM's ``svm_switch_vmcb``) and the core
  VMRUNs it.  A valid EVENTINJ is delivered through L2's IDT before L2's first
  instruction; a fault while delivering it is an exception exit with
  EXITINTINFO = the event.
* An L2 exit that L1 intercepts (its intercept words; its IOPM for IN/OUT; its
  MSRPM for RDMSR/WRMSR; its exception bitmap) is reflected (``nested_svm_vmexit``):
  vmcb12 gets exit code, EXITINFO1/2, EXITINTINFO (+ error code), next_rip only
  where the vCPU's CPUID offers NRIPS, EVENTINJ cleared, int_state from vmcb02,
  and the save area from L2's current state (RIP = the intercepted or faulting
  instruction); int_ctl / tlb_ctl and FS/GS/TR/LDTR/PAT stay as L1 wrote them.
  L1 resumes after its VMRUN with RAX/RSP/RIP/RFLAGS and its segment and control
  state from vmcb01, DR7 = 0x400, GIF = 0, and L2's values in the other GPRs.
  The vCPU's hardware trace records the #VMEXIT of vmcb02 with ``handled="L1"``
  (KVM's ``kvm_nested_vmexit_inject``); L1's VMRUN is a ``"kernel"`` exit 0x80.
* An L2 exit L1 does not intercept stays with KVM: the ordinary handlers of
  :mod:`kvmlayer` run on L2's state (CPUID from the vCPU table, an OUT to a port
  L1 does not intercept becomes a host IO exit with the vCPU in guest mode, an
  exception L1 does not intercept is delivered to L2).

Values where the rig's "hardware" (QEMU TCG) differs from silicon: the model
gives the silicon value, as it does for L1's own exits -- an IOIO EXITINFO1 with
the address-size bits (0x7A0210 for ``out %al, $0x7A`` in 64-bit code; the rig
shows 0x7A0010) and the architectural #NP error code of a not-present IDT gate
reached by an external interrupt, (vector << 3) | IDT | EXT (0x10B for vector
0x21; the rig shows 0x212).  ``tests/test_nested_kvm.comparable`` equates both.  The
profile ``kvm_amd@qemu-tcg`` (sim/profile.py) gives the rig's values where they are
declared: IOIO EXITINFO1 without the address size (``ioio_addr_size_bits``), and a soft
EVENTINJ (type 4, or #BP/#OF as type 3) lost, as kvm_amd with nrips=0 loses it
(``host_nrips``).

Design: why a model-level VMRUN and not unicorn's own nested SVM.  The core runs
every guest inside QEMU's emulated SVM (core.py), and unicorn diverts each
intercept to a hook before QEMU's ``do_vmexit``, so QEMU never performs a
#VMEXIT itself and cannot run a second level: lifting the VMRUN intercept would
let QEMU replace L1's guest-mode state by L2's with only vmcb12's intercepts in
force (KVM's own would be lost) and nobody to write vmcb12 at L2's exit.  So the
model does what KVM does in software: it switches the vCPU between vmcb01 and
vmcb02 and re-enters the core with a fresh VMRUN of the VMCB in force, which is
exact for any L2 mode (real, protected, long) because QEMU's VMRUN loads the
hidden segment state.  Re-entering does not rebuild the engine (~2 ms): the core
restores the host-mode CPU context it saved before its first such VMRUN and
stops at the guest's first instruction by address (``Core.enter(reuse=True)``),
so memory, hooks and translated code stay.  Measured on the 2-core VM: ~0.8-1.1
ms per nested exit round trip (L2 exit -> L1 -> VMRUN -> L2), 900-1,300 nested
exits/s; the rig's kvm_amd under TCG does 5,000-9,000/s.  The remaining cost is
Python: L1's state read at each VMRUN (9 MSRs of the VMLOAD set), L2's at each
exit, two VMRUNs of the engine, and the re-scan of re-translated blocks.

Also here: L1's VMLOAD/VMSAVE (FS/GS/TR/LDTR and the syscall MSRs through a VMCB
page) and STGI/CLGI (GIF), and KVM_GET/SET_NESTED_STATE for simulated vCPUs
(:func:`get_nested_state`, :func:`set_nested_state`, svm_get/set_nested_state's
layout and checks, kvm backend's ``NestedState`` value).

Not modelled: nested NPT (NP_ENABLE in vmcb12 is refused as a VMRUN consistency
failure, and the model's CPUID does not offer NPT to L1 for it), merging L1's
MSRPM into the MSRs the model passes through (an RDMSR/WRMSR of a pass-through
MSR in L2 is not reflected), interrupts, V_INTR and GIF beyond its value, string
IO reflected to L1 (RSI/RDI/RCX may have advanced by one element), an exception
while delivering an L2 exception escalating to an intercepted #DF or SHUTDOWN
(a triple fault in L2 reaches the host as Shutdown), L1's SELECTIVE_CR0
intercept on its own, decode assists (EXITINFO1 of CR/DR exits, insn bytes),
TSC offset merging, and L2 changes to the VMLOAD-set MSRs reaching L1 (L1 gets
its values of VMRUN time back, as with KVM's vmcb01).
"""

from __future__ import annotations

import errno
import struct

from unicorn import x86_const as X

from ..abi import KVM_STATE_NESTED_FORMAT_SVM as FORMAT_SVM
from ..abi import KVM_STATE_NESTED_GIF_SET as FLAG_GIF_SET
from ..abi import KVM_STATE_NESTED_GUEST_MODE as FLAG_GUEST_MODE
from ..abi import KVM_STATE_NESTED_RUN_PENDING as FLAG_RUN_PENDING
from ..abi import KVM_STATE_NESTED_SVM_VMCB_SIZE as VMCB_SIZE
from ..abi import NESTED_STATE_HEADER_SIZE as HEADER_SIZE
from ..abi import NestedState
from ..errors import KvmError
from .events import EXC_WITH_ERROR_CODE, DeliveryFault, deliver_long
from .vmcb import SAVE_AREA_OFFSET, Vmcb

MSR_EFER = 0xC0000080
MSR_VM_HSAVE_PA = 0xC0010117
EFER_LME, EFER_LMA, EFER_SVME = 1 << 8, 1 << 10, 1 << 12
CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
CR4_PAE = 1 << 5
SVM_EXIT_ERR = 2**64 - 1
SVM_EXIT_VMRUN = 0x80
SVM_EXIT_IOIO = 0x7B
SVM_EXIT_MSR = 0x7C
SVM_EXIT_SHUTDOWN = 0x7F
EVTINJ_VALID = 1 << 31
EVTINJ_VALID_ERR = 1 << 11
EVTINJ_TYPE_INTR, EVTINJ_TYPE_NMI, EVTINJ_TYPE_EXEPT, EVTINJ_TYPE_SOFT = 0, 2, 3, 4
SVM_EDX_NRIPS = 1 << 3
# an IO exit L1 intercepts, stopped from the IN/OUT hook: handled after the core stops
NESTED_IO_EVENT = 0x1000 + SVM_EXIT_IOIO

_Q = struct.Struct("<Q")
_SEG = struct.Struct("<HHIQ")
_I = struct.Struct("<I")
# vmcb12 save-area fields nested_svm_vmexit writes, and VMRUN loads (absolute offsets, sizes)
_SEGS = {"es": 0x400, "cs": 0x410, "ss": 0x420, "ds": 0x430, "gdtr": 0x460, "idtr": 0x480}
_SAVE_Q = {"efer": 0x4D0, "cr4": 0x548, "cr3": 0x550, "cr0": 0x558, "dr7": 0x560, "dr6": 0x568,
           "rflags": 0x570, "rip": 0x578, "rsp": 0x5D8, "rax": 0x5F8, "cr2": 0x640}
_CPL = 0x4CB
_SEL_IDS = {"es": X.UC_X86_REG_ES, "cs": X.UC_X86_REG_CS, "ss": X.UC_X86_REG_SS, "ds": X.UC_X86_REG_DS}
# VMLOAD/VMSAVE state: FS, GS, TR, LDTR records; STAR..KernelGsBase, SYSENTER_CS/ESP/EIP
_VMLOAD_STATE = ((0x440, 0x460), (0x470, 0x480), (0x490, 0x4A0), (0x600, 0x640))
_L1_SVM_INSNS = (SVM_EXIT_VMRUN, 0x82, 0x83, 0x84, 0x85)  # VMRUN VMLOAD VMSAVE STGI CLGI
_GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
              "r13", "r14", "r15")


def _mode_key(cr0, cr3, efer):
    return cr0 & (CR0_PE | CR0_PG), cr3, efer & EFER_LMA


def handle_event(vcpu, intno: int, rip: int) -> bool:
    """The vCPU's hook: True when nested SVM took the event (L1's VMRUN, an L2 exit L1
    intercepts), False when KVM's ordinary handling applies."""
    nested = vcpu.nested
    if nested is None:
        if intno - 0x100 not in _L1_SVM_INSNS:
            return False
        nested = vcpu.nested = NestedSvm(vcpu)
    return nested.on_event(intno, rip)


class NestedSvm:
    """KVM's nested-SVM state of one vCPU (``svm->nested``)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.guest_mode = False
        self.gif = True
        self.vmcb12_pa = 0
        self.vmcb01 = vcpu.svm.vmcb
        self.vmcb02 = None
        self.l1_efer = 0
        self.ctl12 = None  # vmcb12's control area as cached at VMRUN (svm->nested.ctl)
        self.vmruns = 0
        self.reflected = 0
        self._io_pending = None

    # -- dispatch ---------------------------------------------------------------
    def on_event(self, intno: int, rip: int) -> bool:
        if not self.guest_mode:
            if intno == 0x100 + SVM_EXIT_VMRUN:
                self.vmrun(rip)
                return True
            if intno - 0x100 in _L1_SVM_INSNS:
                self.svm_insn(intno - 0x100, rip)
                return True
            return False
        if intno == NESTED_IO_EVENT:
            self._reflect_io(rip)
            return True
        return self._l2_exit(intno, rip)

    # -- L1's VMLOAD / VMSAVE / STGI / CLGI ---------------------------------------
    def _permitted(self, rip) -> bool:
        """nested_svm_check_permissions: #UD without EFER.SVME or paging, #GP at CPL > 0."""
        v = self.vcpu
        core = v.core
        if not core.msr_read_native(MSR_EFER) & EFER_SVME or not core.cr(0) & CR0_PG:
            v.deliver_exception(6, None, rip)
            return False
        if core.selector("cs") & 3:
            v.deliver_exception(13, 0, rip)
            return False
        return True

    def svm_insn(self, code, rip) -> None:
        """KVM's stgi/clgi_interception and vmload_vmsave_interception for L1."""
        v = self.vcpu
        core = v.core
        v.svm.vmexit(code, 0, 0, rip, rip + 3)
        if not self._permitted(rip):
            return
        if code in (0x84, 0x85):  # STGI, CLGI
            self.gif = code == 0x84
            core.set_reg(X.UC_X86_REG_RIP, rip + 3)
            return
        pa = core.reg(X.UC_X86_REG_RAX)
        other = self._read_vmcb12(pa)
        if other is None:
            v.deliver_exception(13, 0, rip)
            return
        v.write_save_area()
        raw = v.svm.vmcb.raw
        if code == 0x83:  # VMSAVE: the CPU's VMLOAD/VMSAVE state into the page at RAX
            for lo, hi in _VMLOAD_STATE:
                other[lo:hi] = raw[lo:hi]
            core.write_phys(pa, bytes(other))
            core.set_reg(X.UC_X86_REG_RIP, rip + 3)
            return
        for lo, hi in _VMLOAD_STATE:  # VMLOAD: into vmcb01, which the core VMLOADs at entry
            raw[lo:hi] = other[lo:hi]
        v.svm.vmcb.save.rip = rip + 3
        v.continue_in_guest(zip(_GPR_NAMES, core.gprs(), strict=False))  # gprs() ends with RIP, RFLAGS

    # -- L1's VMRUN (vmrun_interception -> nested_svm_vmrun) --------------------
    def vmrun(self, rip: int) -> None:
        v = self.vcpu
        core = v.core
        svm = v.svm
        efer = core.msr_read_native(MSR_EFER)
        svm.vmexit(SVM_EXIT_VMRUN, 0, 0, rip, rip + 3)
        if not efer & EFER_SVME or not core.cr(0) & CR0_PG:
            v.deliver_exception(6, None, rip)
            return
        if core.selector("cs") & 3:
            v.deliver_exception(13, 0, rip)
            return
        pa = core.reg(X.UC_X86_REG_RAX)
        raw12 = self._read_vmcb12(pa)
        if raw12 is None or not v.msrs.read(MSR_VM_HSAVE_PA):
            v.deliver_exception(13, 0, rip)
            return
        core.set_reg(X.UC_X86_REG_RIP, rip + 3)  # kvm_skip_emulated_instruction
        if not (self._check_controls(raw12) and self._check_save(raw12)):
            buf = bytearray(8 * 3)
            _Q.pack_into(buf, 0, SVM_EXIT_ERR)
            core.write_phys(pa + 0x70, bytes(buf))  # exit code (and _hi), EXITINFO1/2 only
            return
        self._enter_l2(pa, raw12, efer)

    def _read_vmcb12(self, pa):
        if pa & 0xFFF:
            return None
        try:
            return bytearray(self.vcpu.core.read_phys(pa, 4096))
        except Exception:  # noqa: BLE001 - unbacked GPA: kvm_vcpu_map fails, #GP
            return None

    @staticmethod
    def _check_controls(raw) -> bool:
        w4 = _I.unpack_from(raw, 0x10)[0]
        asid = _I.unpack_from(raw, 0x58)[0]
        nested_ctl = _Q.unpack_from(raw, 0x90)[0]
        msrpm, iopm = _Q.unpack_from(raw, 0x48)[0], _Q.unpack_from(raw, 0x40)[0]
        maxpa = 1 << 48
        return bool(w4 & 1) and asid != 0 and not nested_ctl & 1 \
            and msrpm + 0x2000 <= maxpa and iopm + 0x3000 <= maxpa

    @staticmethod
    def _check_save(raw) -> bool:
        def q(name):
            return _Q.unpack_from(raw, _SAVE_Q[name])[0]

        efer, cr0, cr4, cr3 = q("efer"), q("cr0"), q("cr4"), q("cr3")
        if not efer & EFER_SVME:
            return False
        if (not cr0 & CR0_CD and cr0 & CR0_NW) or cr0 >> 32:
            return False
        if q("dr6") >> 32 or q("dr7") >> 32:
            return False
        if efer & EFER_LME and cr0 & CR0_PG:
            if not cr4 & CR4_PAE or not cr0 & CR0_PE or cr3 >> 48:
                return False
            cs_attrib = struct.unpack_from("<H", raw, _SEGS["cs"] + 2)[0]
            if cs_attrib & (1 << 9) and cs_attrib & (1 << 10):  # CS.L with CS.D
                return False
        return True

    def _enter_l2(self, pa, raw12, l1_efer) -> None:
        """enter_svm_guest_mode: vmcb01 keeps L1, vmcb02 = KVM's controls | L1's, L2's state."""
        v = self.vcpu
        core = v.core
        v.write_save_area()  # vmcb01's save area = L1 now
        s1 = self.vmcb01.save
        s1.rip = core.rip()  # after the VMRUN
        s1.efer = l1_efer
        self.l1_efer = l1_efer
        gprs = core.gprs()
        vmcb02 = self.vmcb02 = Vmcb()
        raw02 = vmcb02.raw
        raw02[:] = self.vmcb01.raw
        for off in range(0, 0x18, 4):  # intercept vectors: KVM's | L1's (recalc_intercepts)
            _I.pack_into(raw02, off, _I.unpack_from(raw02, off)[0] | _I.unpack_from(raw12, off)[0])
        raw02[0x70:0x90] = bytes(0x20)  # exit code / info / EXITINTINFO
        raw02[0xA8:0xB0] = bytes(8)     # EVENTINJ: delivered by the model below
        raw02[0xC8:0xD0] = bytes(8)
        for off in _SEGS.values():
            raw02[off:off + 16] = raw12[off:off + 16]
        for off in _SAVE_Q.values():
            raw02[off:off + 8] = raw12[off:off + 8]
        raw02[_CPL] = raw12[_CPL]
        self.ctl12 = bytes(raw12[:SAVE_AREA_OFFSET])
        self.vmcb12_pa = pa
        self.guest_mode = True
        self.gif = True
        self.vmruns += 1
        v.svm.vmcb = vmcb02
        l2 = vmcb02.save
        self._switch_caches(_mode_key(s1.cr0, s1.cr3, l1_efer), _mode_key(l2.cr0, l2.cr3, l2.efer))
        # VMRUN leaves all GPRs but RAX/RSP to L2 as they are
        v.continue_in_guest(zip(_GPR_NAMES, gprs, strict=False))
        event = _I.unpack_from(raw12, 0xA8)[0]
        if event & EVTINJ_VALID:
            self._inject(event, _I.unpack_from(raw12, 0xAC)[0])

    def _inject(self, event, error) -> None:
        """The EVENTINJ of vmcb12, delivered through L2's IDT before L2's first instruction."""
        v = self.vcpu
        core = v.core
        vector, etype = event & 0xFF, (event >> 8) & 7
        soft = etype == EVTINJ_TYPE_SOFT or (etype == EVTINJ_TYPE_EXEPT and vector in (3, 4))
        if soft and not v.profile.host_nrips:
            return  # kvm_amd with nrips=0 loses it (nested.c is_evtinj_soft; sim/profile.py host_nrips)
        rip = core.rip()
        err = error if event & EVTINJ_VALID_ERR else None
        try:
            deliver_long(core, vector, err, rip)
        except DeliveryFault as fault:
            fvec, ferr = fault.vector, fault.error
            if fvec in (10, 11, 13) and ferr & 2 and etype != EVTINJ_TYPE_SOFT:
                ferr |= 1  # EXT: the event came from outside the program
            if self._l1_intercepts_exception(fvec):
                info2 = 0
                if fvec == 14:
                    info2 = v.svm.vmcb.save.cr2
                self.reflect(0x40 + fvec, ferr if fvec in EXC_WITH_ERROR_CODE else 0, info2, rip, 0,
                             int_info=event & 0x80000FFF, int_err=error if event & EVTINJ_VALID_ERR else 0)
            else:
                v.deliver_exception(fvec, ferr if fvec in EXC_WITH_ERROR_CODE else None, rip)

    # -- L2's exits ----------------------------------------------------------------
    def _l1_intercepts_exception(self, vector) -> bool:
        return bool(_I.unpack_from(self.ctl12, 0x08)[0] >> vector & 1)

    def _l1_intercepts(self, code) -> bool:
        c = self.ctl12
        if code < 0x20:
            return bool(_I.unpack_from(c, 0)[0] >> code & 1)
        if code < 0x40:
            return bool(_I.unpack_from(c, 4)[0] >> (code - 0x20) & 1)
        if code < 0x60:
            return self._l1_intercepts_exception(code - 0x40)
        if code < 0xC0:
            word, bit = divmod(code - 0x60, 32)
            return bool(_I.unpack_from(c, 0x0C + 4 * word)[0] >> bit & 1)
        return False

    def _l2_exit(self, intno, rip) -> bool:
        v = self.vcpu
        core = v.core
        if intno < 0x100:
            if intno >= 32 or v.is_soft_int(intno, rip):
                return False  # INTn: KVM's path (the SWINT intercept would arrive as 0x175)
            code = 0x40 + intno
        else:
            code = intno - 0x100
        if 0x40 <= code < 0x60:
            vector = code - 0x40
            if not self._l1_intercepts_exception(vector):
                return False
            core.reset_exception_state()
            info1 = info2 = 0
            if vector == 14:
                info2, info1 = v.fault_address(rip)
            elif vector in EXC_WITH_ERROR_CODE:
                info1 = v.exception_error_code(vector, rip)
            self.reflect(code, info1, info2, rip, 0)
            return True
        if code == SVM_EXIT_MSR:
            write = v.code_bytes(rip, 2) == b"\x0f\x30"
            if not self._l1_msr_intercepted(core.reg(X.UC_X86_REG_RCX) & 0xFFFFFFFF, write):
                return False
            self.reflect(code, int(write), 0, rip, rip + 2)
            return True
        if not self._l1_intercepts(code):
            return False
        if code == SVM_EXIT_SHUTDOWN:
            self.reflect(code, 0, 0, rip, 0)
            return True
        insn = v.decode_insn(rip)
        self.reflect(code, 0, 0, rip, rip + (insn.len if insn is not None else 0))
        return True

    def _l1_msr_intercepted(self, msr, write) -> bool:
        from .svm import msrpm_position

        if not _I.unpack_from(self.ctl12, 0x0C)[0] >> 28 & 1:
            return False
        pos = msrpm_position(msr)
        if pos is None:
            return True
        off, bit = pos
        base = _Q.unpack_from(self.ctl12, 0x48)[0]
        try:
            byte = self.vcpu.core.read_phys(base + off, 1)[0]
        except Exception:  # noqa: BLE001 - an unbacked bitmap reads as all ones
            return True
        return bool(byte >> (bit + int(write)) & 1)

    def io_intercepted(self, port, size) -> bool:
        """Called from the IN/OUT hooks while L2 runs: does L1's IOPM take this access?"""
        c = self.ctl12
        if not _I.unpack_from(c, 0x0C)[0] >> 27 & 1:
            return False
        base = _Q.unpack_from(c, 0x40)[0]
        first, last = port, port + size - 1
        try:
            bits = self.vcpu.core.read_phys(base + first // 8, last // 8 - first // 8 + 1)
        except Exception:  # noqa: BLE001
            return True
        return any(bits[p // 8 - first // 8] >> (p % 8) & 1 for p in range(first, last + 1))

    def io_exit(self, rip, port, size, is_in) -> None:
        """An IN/OUT of L2 in L1's IOPM: remember it; the vCPU stops the core and the run
        loop hands NESTED_IO_EVENT back here (``_reflect_io``)."""
        v = self.vcpu
        info1, next_rip, _string = v.ioio_exit_info(rip, port, size, is_in)
        if not v.profile.ioio_addr_size_bits:
            info1 &= ~0x380  # A16/A32/A64: the CPU's value, passed through (sim/profile.py)
        self._io_pending = (info1, next_rip, rip, v.core.reg(X.UC_X86_REG_RAX))
        v.post_event(NESTED_IO_EVENT, rip)

    def _reflect_io(self, rip):
        info1, next_rip, insn_rip, rax = self._io_pending
        self._io_pending = None
        # the core completed the IN/OUT (the hook ran): L2 is back at the instruction
        self.reflect(SVM_EXIT_IOIO, info1, next_rip, insn_rip, next_rip, rax=rax)

    # -- nested_svm_vmexit ------------------------------------------------------------
    def reflect(self, code, info1, info2, rip, next_rip, *, int_info=0, int_err=0, rax=None) -> None:
        v = self.vcpu
        core = v.core
        svm = v.svm
        svm.vmexit(code, info1, info2, rip, next_rip, "L1")  # vmcb02's #VMEXIT, seen by KVM
        self.reflected += 1
        core.set_reg(X.UC_X86_REG_RIP, rip)
        raw02 = svm.vmcb.raw
        gprs = core.gprs()
        pa = self.vmcb12_pa
        buf = bytearray(core.read_phys(pa, 4096))
        l2_key = self._save_l2_state(buf, gprs, rip, rax)
        _I.pack_into(buf, 0x68, _I.unpack_from(raw02, 0x68)[0])  # int_state
        _Q.pack_into(buf, 0x70, code & SVM_EXIT_ERR)
        _Q.pack_into(buf, 0x78, info1 & SVM_EXIT_ERR)
        _Q.pack_into(buf, 0x80, info2 & SVM_EXIT_ERR)
        _I.pack_into(buf, 0x88, int_info)
        if int_info & EVTINJ_VALID_ERR:
            _I.pack_into(buf, 0x8C, int_err)
        if self._nrips():
            _Q.pack_into(buf, 0xC8, next_rip)
        _Q.pack_into(buf, 0xA8, 0)  # EVENTINJ and its error code
        core.write_phys(pa, bytes(buf))
        self._leave_guest_mode(gprs, l2_key)

    def _save_l2_state(self, buf, gprs, rip, rax):
        """L2's state as nested_svm_vmexit copies it into vmcb12: ES/CS/SS/DS, GDTR/IDTR,
        EFER, CR0/2/3/4, RFLAGS, RIP, RSP, RAX, DR6/7, CPL (FS/GS/TR/LDTR are not copied, so
        the VMLOAD MSRs are not read either).  Returns L2's mode key."""
        v = self.vcpu
        core = v.core
        raw02 = v.svm.vmcb.raw
        cr0 = core.cr(0)
        real = not cr0 & CR0_PE
        _gsel, gdt_base, gdt_limit, _f = core.mmr("gdtr")
        for name in ("es", "cs", "ss", "ds"):
            off = _SEGS[name]
            rec = bytes(raw02[off:off + 16])
            sel = core.reg(_SEL_IDS[name]) & 0xFFFF
            if real:
                rec = struct.pack("<H", sel) + rec[2:8] + _Q.pack(sel << 4)
            elif sel != struct.unpack_from("<H", rec)[0]:
                desc = v.gdt_descriptor(gdt_base, gdt_limit, sel)
                rec = _SEG.pack(*desc) if desc is not None else struct.pack("<H", sel) + rec[2:]
            buf[off:off + 16] = rec
        for name in ("gdtr", "idtr"):
            _sel, base, limit, _f = core.mmr(name)
            buf[_SEGS[name]:_SEGS[name] + 16] = _SEG.pack(0, 0, limit, base)
        efer = core.msr_read_native(MSR_EFER)  # vcpu->arch.efer, SVME included
        cr3 = core.cr(3)
        for name, value in (("efer", efer), ("cr0", cr0), ("cr3", cr3), ("cr4", core.cr(4)),
                            ("cr2", v.svm.vmcb.save.cr2), ("dr6", core.dr(6)), ("dr7", core.dr(7)),
                            ("rflags", gprs[17]), ("rip", rip), ("rsp", gprs[6]),
                            ("rax", gprs[0] if rax is None else rax)):
            _Q.pack_into(buf, _SAVE_Q[name], value)
        buf[_CPL] = 0 if real else (struct.unpack_from("<H", buf, _SEGS["cs"] + 2)[0] >> 5) & 3
        return _mode_key(cr0, cr3, efer)

    def _switch_caches(self, old_key, new_key) -> None:
        """The vCPU's decoded-instruction and scanned-start caches are by linear address:
        they stay valid across a VMCB switch when paging and mode stay the same."""
        if old_key != new_key:
            self.vcpu.code_changed()

    def _nrips(self) -> bool:
        e = self.vcpu.cpuid.lookup(0x8000000A)
        return bool(e is not None and e.edx & SVM_EDX_NRIPS)

    def _leave_guest_mode(self, l2_gprs, l2_key) -> None:
        """Back to L1: vmcb01's state, the GPRs VMRUN/#VMEXIT do not switch stay L2's."""
        v = self.vcpu
        s1 = self.vmcb01.save
        s1.efer = self.l1_efer
        s1.dr7 = 0x400
        s1.cpl = 0
        v.svm.vmcb = self.vmcb01
        self.guest_mode = False
        self.gif = False
        self._switch_caches(l2_key, _mode_key(s1.cr0, s1.cr3, s1.efer))
        v.continue_in_guest(zip(_GPR_NAMES, l2_gprs, strict=False))  # L1 after its VMRUN


# -- KVM_GET_NESTED_STATE / KVM_SET_NESTED_STATE on the simulator ------------------------
# The same value object as the kvm backend (kvmharness.abi.NestedState); the layout
# is svm_get_nested_state's: a 128-byte header (flags, format SVM, size, vmcb_pa) and, in
# guest mode, a 4 KiB VMCB image whose control area is L1's vmcb12 controls as KVM caches
# them (nested_copy_vmcb_cache_to_control) and whose save area is L1's own state (vmcb01).

# control-area bytes KVM keeps in svm->nested.ctl (the rest of the image is zero)
_CACHED_CONTROL = ((0x00, 0x18), (0x3C, 0x6C), (0x70, 0x98), (0xA8, 0xC0), (0xC8, 0xD0))
_SAVE_SIZE = 0x2E8


def get_nested_state(vcpu):
    """KVM_GET_NESTED_STATE for a simulated vCPU."""
    nested = vcpu.nested
    flags = FLAG_GIF_SET if nested is None or nested.gif else 0
    if nested is None or not nested.guest_mode:
        return NestedState(flags, FORMAT_SVM, HEADER_SIZE, bytes(120), b"")
    image = bytearray(VMCB_SIZE)
    for lo, hi in _CACHED_CONTROL:
        image[lo:hi] = nested.ctl12[lo:hi]
    image[SAVE_AREA_OFFSET:SAVE_AREA_OFFSET + _SAVE_SIZE] = \
        nested.vmcb01.raw[SAVE_AREA_OFFSET:SAVE_AREA_OFFSET + _SAVE_SIZE]
    header = _Q.pack(nested.vmcb12_pa).ljust(120, b"\0")
    return NestedState(flags | FLAG_GUEST_MODE, FORMAT_SVM, HEADER_SIZE + VMCB_SIZE, header, bytes(image))


def set_nested_state(vcpu, state) -> None:
    """KVM_SET_NESTED_STATE for a simulated vCPU, with svm_set_nested_state's checks.

    As on KVM, the vCPU's current registers are L2's (set CPUID, SREGS with EFER.SVME and
    REGS first); L1's come from the state's save area.  Refusals raise the same KvmError
    (EINVAL) the kvm backend raises.
    """
    def refuse(why):
        raise KvmError("KVM_SET_NESTED_STATE", errno.EINVAL, f"KVM refused the state: {why}")

    if state.format != FORMAT_SVM:
        refuse("not the SVM format")
    if state.flags & ~(FLAG_GUEST_MODE | FLAG_RUN_PENDING | FLAG_GIF_SET):
        refuse(f"unknown flags {state.flags:#x}")
    nested = vcpu.nested
    live = vcpu.in_guest
    efer = vcpu.core.msr_read_native(MSR_EFER) if live else vcpu.svm.vmcb.save.efer
    if not efer & EFER_SVME and state.flags != FLAG_GIF_SET:
        refuse("the vCPU's EFER has no SVME: set SREGS (EFER.SVME) before guest mode")
    if live:  # the current state into the VMCB in force, GPRs into the shadow: re-enter from it
        vcpu.write_save_area()
        vcpu.reenter_from_vmcb()
    if nested is None:
        nested = vcpu.nested = NestedSvm(vcpu)
    if not state.flags & FLAG_GUEST_MODE:
        if nested.guest_mode:  # svm_leave_nested: back to vmcb01 without a #VMEXIT
            vcpu.svm.vmcb = nested.vmcb01
            nested.guest_mode = False
        nested.gif = bool(state.flags & FLAG_GIF_SET)
        return
    pa = _Q.unpack_from(state.header)[0]
    if pa & 0xFFF or state.size < HEADER_SIZE + VMCB_SIZE:
        refuse("vmcb_pa not page aligned, or no 4 KiB VMCB image")
    image = bytearray(state.vmcb)
    cr0 = vcpu.svm.vmcb.save.cr0
    l1 = _Q.unpack_from
    l1_cr0, l1_rflags = l1(image, _SAVE_Q["cr0"])[0], l1(image, _SAVE_Q["rflags"])[0]
    if not NestedSvm._check_controls(image) or (not cr0 & CR0_CD and cr0 & CR0_NW) \
            or not l1_cr0 & CR0_PG or not l1_cr0 & CR0_PE or l1_rflags & (1 << 17) \
            or not NestedSvm._check_save(image):
        refuse("the controls or L1's save area fail KVM's VMRUN checks")
    current = vcpu.svm.vmcb  # holds L2's state now (and KVM's own controls)
    if nested.guest_mode:
        vmcb01 = nested.vmcb01
    else:
        vmcb01 = Vmcb()
        vmcb01.raw[:] = current.raw
    vmcb01.raw[SAVE_AREA_OFFSET:SAVE_AREA_OFFSET + _SAVE_SIZE] = \
        image[SAVE_AREA_OFFSET:SAVE_AREA_OFFSET + _SAVE_SIZE]
    vmcb02 = Vmcb()
    vmcb02.raw[:] = current.raw
    vmcb02.raw[:SAVE_AREA_OFFSET] = vmcb01.raw[:SAVE_AREA_OFFSET]
    for off in range(0, 0x18, 4):
        _I.pack_into(vmcb02.raw, off, _I.unpack_from(vmcb01.raw, off)[0] | _I.unpack_from(image, off)[0])
    nested.vmcb01 = vmcb01
    nested.vmcb02 = vmcb02
    nested.ctl12 = bytes(image[:SAVE_AREA_OFFSET])
    nested.vmcb12_pa = pa
    nested.l1_efer = l1(image, _SAVE_Q["efer"])[0]
    nested.guest_mode = True
    nested.gif = bool(state.flags & FLAG_GIF_SET)
    vcpu.svm.vmcb = vmcb02
    vcpu.reenter_from_vmcb()  # (the vCPU re-enters from the VMCB: it does already, live or not)
