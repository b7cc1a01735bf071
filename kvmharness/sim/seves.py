"""SEV-ES in the simulator: protected guest state, #VC, the GHCB MSR and VMGEXIT.

A vCPU of a VM that ran KVM_SEV_ES_INIT / KVM_SEV_INIT2 on an SEV-ES VM type is a
:class:`SevEsVcpu` (chosen by ``SimVm._vcpu_class``).  It has everything ``SevVcpu``
has (encrypted memory, the C-bit walk) and, once LAUNCH_UPDATE_VMSA encrypted its
VMSA (the guest state is then *protected*):

* **The VMSA.**  KvmSevModel keeps the encrypted page (``vmsa_pages``); the host
  sees only that ciphertext.  The VMCB the host reads (:attr:`SevEsVcpu.vmcb`)
  has its control area (with SEV_ENABLE | SEV_ES_ENABLE in nested_ctl, the
  VMSA pointer at 0x108 and the GHCB GPA at 0x0A0) and an all-zero save area:
  the guest's registers are not in it.  (The engine itself still enters from
  the model's own copy of the state, which is what the VMSA held: the
  decryption the CPU does at VMRUN is not re-done.)
* **NAE events.**  An intercept whose exit code ``vmgexit.vc_error_code`` maps
  (CPUID, RDMSR/WRMSR, VMMCALL, RDTSC, INVD, WBINVD, DR7, MONITOR/MWAIT ...)
  raises #VC (vector 29) inside the guest with the exit code as error code and
  RIP at the instruction; nothing reaches KVM or userspace and nothing is
  traced (no #VMEXIT happens).
* **IN/OUT and MMIO.**  An IN/OUT/INS/OUTS (REP too) the guest executes itself
  raises #VC with error code 0x7B (SVM_EXIT_IOIO), and a load or store to a
  GPA no memory slot backs (the NPF KVM turns into a reserved-bit fault for
  MMIO) raises #VC with error code 0x400 (SVM_EXIT_NPF): RIP at the
  instruction, no IO/MMIO exit, nothing traced, the instruction without
  architectural effect.  IN/OUTs the core finds before they run (precision
  "sites", core.py) get a code hook on the instruction itself that stops the
  core before it; otherwise (precision "count") the IN/OUT hook, which runs
  inside the instruction, records the registers and the event handler puts
  them back -- exact except that INS's first element then stays zero (QEMU's
  restartable dummy store happens before the hook).  A write to a read-only
  slot is not an unbacked GPA and still exits as MMIO.
* **MSRs 0xC0010130 (GHCB) and 0xC0010131 (SEV_STATUS = 3)** are answered by
  the CPU: no #VC, no exit.
* **VMGEXIT** (F3 0F 01 D9, delivered by the engine as a VMMCALL intercept at
  the F3 prefix): RIP moves past it, ``SevEsVmgexitHandler.vmgexit`` handles
  the GHCB MSR value exactly as vmgexit.py's docstring prescribes (resume:
  new GHCB MSR value and any injected exception; exit: ``run()`` returns the
  userspace exit, completed by ``complete()`` or the next ``run()``; error:
  ``run()`` raises ``KvmError("KVM_RUN", errno)``).  Every VMGEXIT is one
  ``hw_trace`` record (exit code 0x403, EXITINFO1 = the GHCB MSR value,
  EXITINFO2 = SW_EXIT_CODE for the page protocol, ``handled`` = what KVM did),
  and its decoded form (``VmgexitTrace``) is kept in :attr:`vmgexit_trace`.
* **Registers.**  On the SEV-ES VM type (KVM_X86_SEV_ES_VM, ``KVM_SEV_INIT2``;
  KVM sets ``kvm->arch.has_protected_state`` for it) KVM refuses KVM_GET_REGS,
  KVM_GET_SREGS and their SET_ counterparts with EINVAL once the VMSA is
  encrypted (x86.c: ``has_protected_state && guest_state_protected``, Linux
  6.10, "KVM: x86: add fields to struct kvm_arch for CoCo features"), and so
  does this model: ``KvmError`` naming the ioctl, errno EINVAL.  On a legacy
  ``KVM_SEV_ES_INIT`` VM (type 0) KVM still answers from its register cache
  (the GPRs the guest exposed in the GHCB, 0 otherwise; RIP 0, RFLAGS 2), and
  so does this model; ``set_regs()`` is refused there too.  Machine reads a
  protected guest's ucall arguments from the GHCB page, never from registers.
"""

from __future__ import annotations

import errno
import struct

import unicorn
from unicorn import x86_const as X

from ..backend import KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM
from ..errors import KvmError
from ..sev.vmgexit import X86_TRAP_VC, SevEsVmgexitHandler, vc_error_code
from ..x86 import Regs
from .events import DeliveryFault, read_linear, write_linear
from .kvmlayer import _decoder
from .sev import MSR_SEV_ES_GHCB, MSR_SEV_STATUS, SevVcpu, c_bit_of
from .svm import (
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_NPF,
    SVM_EXIT_VMGEXIT,
    SVM_EXIT_VMMCALL,
)
from .vcpu import _io_mnemonics
from .vmcb import Vmcb

VMGEXIT_BYTES = b"\xF3\x0F\x01\xD9"
NESTED_CTL_SEV = 1 << 1
NESTED_CTL_SEV_ES = 1 << 2
TRACE_KEEP = 100_000
_VMGEXIT_EVENTS = frozenset({6, 0x100 + 0x46, 0x100 + SVM_EXIT_VMMCALL})
# run-loop events of this model (above the 0x100 + exit code intercepts and nested.py's 0x1000 + code)
VC_IO_EVENT = 0x2000 + SVM_EXIT_IOIO
VC_MMIO_EVENT = 0x2000 + SVM_EXIT_NPF
#: VM types for which KVM sets has_protected_state (svm.c svm_vm_init)
PROTECTED_STATE_VM_TYPES = frozenset({KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM})
PROTECTED_STATE_DETAIL = ("the vCPU's state is protected (SEV-ES: its VMSA is encrypted since "
                          "LAUNCH_UPDATE_VMSA); the host cannot read or write its registers")


class SevEsVcpu(SevVcpu):
    """A vCPU of an SEV-ES guest (see the module docstring)."""

    sev_status = 3  # SEV_STATUS: SEV | SEV-ES

    def __init__(self, vm, vcpu_id: int, asid: int):
        super().__init__(vm, vcpu_id, asid)
        self.ghcb = None  # SevEsVmgexitHandler, made when the guest state becomes protected
        self.ghcb_msr = 0
        self.vmgexit_trace = []
        self.vc_count = 0
        self._es_completion = None
        self._es_rip = 0
        self._sregs_at_launch = None
        self._vc_io_undo = None  # (GPRs, (INS destination, its old bytes) or None)
        self._vc_sites = set()   # IN/OUT sites with a #VC code hook on the instruction itself
        self.core.build_hooks.append(self._hook_vc_sites)

    # -- protected state ------------------------------------------------------------
    @property
    def protected(self) -> bool:
        """LAUNCH_UPDATE_VMSA encrypted this vCPU's VMSA."""
        return self.vm.vcpus.index(self) in self.sev_model.vmsa_pages if self in self.vm.vcpus else False

    def _handler(self):
        if self.ghcb is None and self.protected:
            model = self.sev_model
            p = self.vm.msr_policy
            user_msrs = set()
            for base, n, read_ok, write_ok in p.filter_ranges:
                if not (read_ok and write_ok) and n <= 0x10000:
                    user_msrs.update(range(base, base + n))
            self.ghcb = self._make_handler(
                cpuid=self.cpuid, read_guest=self.vm.read, write_guest=self._write_shared,
                ghcb_version=model.ghcb_version, c_bit=c_bit_of(self.vm.system),
                user_msrs=user_msrs, user_msr_reasons=p.user_exit_reasons,
                vmsa_features=model.vmsa_features,
                vcpu_ids=tuple(v.vcpu_id for v in self.vm.vcpus), vcpu_id=self.vcpu_id)
            self.ghcb_msr = self.ghcb.reset_ghcb_msr()
            if not self.in_guest:
                self._sregs_at_launch = super().get_sregs()
        return self.ghcb

    def _make_handler(self, **kw):
        """The VMGEXIT handler of this vCPU's mode (SNP's: sim/snp.py)."""
        return SevEsVmgexitHandler(**kw)

    def _write_shared(self, gpa: int, data: bytes) -> None:
        """kvm_write_guest: host-view memory (the GHCB and its scratch area are shared)."""
        self.vm.write(gpa, data)

    @property
    def vmcb(self):
        """The VMCB as the host sees it: control area only, the save area is unused."""
        if not self.protected:
            return super().vmcb
        shown = Vmcb()
        shown.raw[:0x400] = self.svm.vmcb.raw[:0x400]
        shown.raw[0x90] |= NESTED_CTL_SEV | NESTED_CTL_SEV_ES
        spa = self.sev_model.vmsa_pages[self.vm.vcpus.index(self)][0]
        struct.pack_into("<Q", shown.raw, 0x108, spa)
        struct.pack_into("<Q", shown.raw, 0x0A0, self.ghcb_msr)
        return shown

    def vmsa_ciphertext(self) -> bytes:
        """The encrypted VMSA page, as the host can read it."""
        return bytes(self.sev_model.vmsa_pages[self.vm.vcpus.index(self)][1])

    _vmsa_at_exit = False
    _VMSA_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                  "r12", "r13", "r14", "r15", "rip", "rflags")  # Core.gprs()'s order

    def save_vmsa_at_exit(self) -> None:
        """From now on every #VMEXIT writes the GPRs, RIP and RFLAGS into the VMSA page,
        encrypted with the guest's key and the page's address as tweak, as SEV-ES hardware
        does (otherwise the model keeps the launch-time VMSA), so :meth:`vmsa_ciphertext`
        follows the guest: what kvmharness.lab's ciphertext scenario reads."""
        if not self._vmsa_at_exit:
            self._vmsa_at_exit = True
            self.svm.on_vmexit.append(self._write_vmsa)

    def _write_vmsa(self, _record) -> None:
        from ..sev.vmsa import Vmsa

        spa, page = self.sev_model.vmsa_pages[self.vm.vcpus.index(self)]
        v = Vmsa()
        for name, value in zip(self._VMSA_GPRS, self.core.gprs(), strict=True):
            v.put(name, value)
        page[:] = self.sev_model.key.encrypt(spa, bytes(v.buf))

    def _refuse_protected(self, ioctl: str) -> None:
        """KVM's EINVAL for a state ioctl on a protected vCPU of a VM type with protected state."""
        if self.vm.vm_type in PROTECTED_STATE_VM_TYPES:
            raise KvmError(ioctl, errno.EINVAL, PROTECTED_STATE_DETAIL)

    def get_regs(self) -> Regs:
        if not self.protected:
            return super().get_regs()
        self._refuse_protected("KVM_GET_REGS")
        return Regs(**self._handler().register_cache(), rip=0, rflags=0x2)

    def get_sregs(self):
        """Protected: refused on the SEV-ES VM type; on a legacy VM what KVM cached before
        the launch (the live state is in the VMSA)."""
        if not self.protected:
            return super().get_sregs()
        self._refuse_protected("KVM_GET_SREGS")
        if self._sregs_at_launch is None:
            self._sregs_at_launch = super().get_sregs()
        return self._sregs_at_launch

    def set_regs(self, regs: Regs) -> None:
        if self.protected:
            raise KvmError("KVM_SET_REGS", errno.EINVAL, PROTECTED_STATE_DETAIL)
        super().set_regs(regs)

    def set_sregs(self, sregs) -> None:
        if self.protected:
            self._refuse_protected("KVM_SET_SREGS")
        super().set_sregs(sregs)

    # -- KVM_RUN --------------------------------------------------------------------
    def run(self):
        h = self._handler()
        if h is not None and h.pending:
            value, error = self._es_completion or (None, False)
            self._es_completion = None
            e = self._after(h.complete(value, error=error), self._es_rip, in_run=False)
            if e is not None:
                return e
        return super().run()

    def complete(self, value=0, *, error: bool = False) -> None:
        if self.ghcb is not None and self.ghcb.pending:
            self._es_completion = (value, error)
            return
        super().complete(value, error=error)

    # -- intercepts -------------------------------------------------------------------
    def _handle_event(self):
        """VMGEXIT reaches the engine as #UD (invalid opcode / the #UD intercept) or as a
        VMMCALL intercept, RIP at the F3 prefix: either way it is the VMGEXIT exit."""
        intno, rip = self.run_state.event
        if intno in _VMGEXIT_EVENTS and self._handler() is not None \
                and self._code_bytes(rip, 4) == VMGEXIT_BYTES:
            self.run_state.drop_event()
            self._vmgexit(self.ghcb, rip)
            return
        if intno in (VC_IO_EVENT, VC_MMIO_EVENT):
            self.run_state.drop_event()
            if intno == VC_IO_EVENT and self._vc_io_undo is not None:
                gprs, ins = self._vc_io_undo
                self._vc_io_undo = None
                self.core.set_gprs(gprs)  # undo the IN/OUT the core already ran
                if ins is not None:
                    write_linear(self.core, *ins)
            else:
                self.fault_answered()
            self.vc_count += 1
            self._inject_now(X86_TRAP_VC, intno - 0x2000, rip)
            return
        super()._handle_event()

    # -- IN/OUT and MMIO: #VC, not exits -----------------------------------------------
    # Where the IN/OUTs are found before they run (precision "sites", core.py), a code hook
    # on the instruction itself stops the core before it: #VC with nothing executed.  The
    # IN/OUT hooks below are the fallback (precision "count", or a site not yet found):
    # they undo what the instruction did -- registers exactly; for INS the element's bytes
    # only as the hook finds them, and QEMU has already stored zeros there (its restartable
    # dummy store), so that fallback leaves them zero.
    def _scan_io(self, start, end, *, until_branch=False):
        found = super()._scan_io(start, end, until_branch=until_branch)
        for site, _after in found:
            if site not in self._vc_sites:
                self._vc_sites.add(site)
                self._hook_vc_site(self.core, site)
        return found

    def _hook_vc_sites(self, core):
        """A core build hook: the #VC hooks again on a fresh engine."""
        for site in self._vc_sites:
            self._hook_vc_site(core, site)

    def _hook_vc_site(self, core, site):
        core.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_vc_site, begin=site, end=site)

    def _on_vc_site(self, _uc, address, _size, _ud):
        if self._handler() is None or self.run_state.event is not None:
            return
        insn = self._insn(address)  # the code may have changed since the scan
        if insn is not None and insn.mnemonic in _io_mnemonics(_decoder()):
            self._vc_io_undo = None
            self.run_state.post_event(VC_IO_EVENT, address)
            self.core.stop()  # takes effect before the instruction runs

    def _on_out(self, port, size, value, rip=None):
        if self._handler() is None:
            return super()._on_out(port, size, value, rip)
        self._vc_io(False, size)
        return None

    def _on_in(self, port, size, recorded=None):
        if self._handler() is None:
            return super()._on_in(port, size, recorded)
        return self._vc_io(True, size)

    # An IO that raises #VC reads every GPR from the engine as the IN/OUT hook saw them:
    # a C hook's record is then shown to the engine first (sim/core.py _dispatch_io).
    def on_out_recorded(self, rip, port, size, value) -> bool:
        return self._handler() is None and super().on_out_recorded(rip, port, size, value)

    def on_in_recorded(self, rip, port, size, rax, rcx, rdi) -> bool:
        return self._handler() is None and super().on_in_recorded(rip, port, size, rax, rcx, rdi)

    def _vc_io(self, is_in, size):
        """From the IN/OUT hook (the instruction is executing): keep what it changes,
        stop, and let the event handler undo it and raise #VC."""
        core = self.core
        gprs = core.gprs()
        rip = gprs[16]
        ins = None
        if is_in and self._io_insn(rip)[1]:
            rdi = gprs[5]  # INS stores its first element at ES:RDI (base 0) whatever DF is
            try:
                ins = (rdi, read_linear(core, rdi, size))
            except DeliveryFault:
                ins = None  # the store faults: nothing to restore
        self._vc_io_undo = (gprs, ins)
        self.run_state.post_event(VC_IO_EVENT, rip)
        core.stop()
        return gprs[0] & ((1 << (8 * size)) - 1)

    def on_unmapped(self, access, addr, size, value):
        if access in (unicorn.UC_MEM_READ_UNMAPPED, unicorn.UC_MEM_WRITE_UNMAPPED) \
                and self._handler() is not None:
            self.run_state.post_event(VC_MMIO_EVENT, self.core.rip())
            return False
        return super().on_unmapped(access, addr, size, value)

    def _intercept(self, code, rip):
        h = self._handler()
        if h is None:
            return super()._intercept(code, rip)
        if code == SVM_EXIT_MSR:
            index = self.core.reg(X.UC_X86_REG_RCX) & 0xFFFFFFFF
            if index in (MSR_SEV_ES_GHCB, MSR_SEV_STATUS):
                self._native_msr(index, rip)
                return None
        vc = vc_error_code(code)
        if vc is not None:
            self.vc_count += 1
            self._inject_now(X86_TRAP_VC, vc, rip)
            return None
        return super()._intercept(code, rip)

    def _native_msr(self, index, rip):
        core = self.core
        write = self._code_bytes(rip, 2) == b"\x0f\x30"
        if write:
            if index == MSR_SEV_STATUS:
                self._inject_now(13, 0, rip)
                return
            self.ghcb_msr = ((core.reg(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32
                             | core.reg(X.UC_X86_REG_RAX) & 0xFFFFFFFF)
        else:
            value = self.ghcb_msr if index == MSR_SEV_ES_GHCB else self.sev_status
            core.set_reg(X.UC_X86_REG_RAX, value & 0xFFFFFFFF)
            core.set_reg(X.UC_X86_REG_RDX, value >> 32)
        core.set_reg(X.UC_X86_REG_RIP, rip + 2)

    def _vmgexit(self, h, rip):
        self.core.set_reg(X.UC_X86_REG_RIP, rip + 4)
        self._es_rip = rip
        r = h.vmgexit(self.ghcb_msr)
        e = self._after(r, rip, in_run=True)
        if e is not None:
            self.run_state.exit_to_user(e)

    def _after(self, r, rip, *, in_run: bool):
        """Act on a VmgexitResult: trace it; resume / return the exit / raise.

        ``in_run``: the result of a VMGEXIT (one #VMEXIT: traced); otherwise of a
        userspace completion, which is no new exit (the handler updates the same
        decoded record in place)."""
        t = r.trace
        if in_run:
            self.vmgexit_trace.append(t)
            if len(self.vmgexit_trace) > TRACE_KEEP:
                del self.vmgexit_trace[: TRACE_KEEP // 2]
            handled = "kernel" if r.action == "resume" else (
                type(r.exit).__name__ if r.exit is not None else "error")
            self.svm.vmexit(SVM_EXIT_VMGEXIT, t.ghcb_msr, t.sw_exit_code or 0, rip, rip + 4,
                            handled)
        if r.action == "error":
            raise KvmError("KVM_RUN", r.errno or errno.EINVAL, f"VMGEXIT: {t.detail}")
        self.ghcb_msr = r.ghcb_msr
        if r.action == "resume":
            if r.inject is not None:
                vector, err = r.inject
                if in_run:
                    self._inject_now(vector, err)
                else:
                    self.inject_exception(vector, err)
            return None
        return r.exit


__all__ = ["VC_IO_EVENT", "VC_MMIO_EVENT", "VMGEXIT_BYTES", "SevEsVcpu"]
