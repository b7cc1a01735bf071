"""SEV-SNP in the simulator: the RMP on every guest access, PVALIDATE/RMPADJUST, PSC, the launch.

A ``KVM_X86_SNP_VM`` on the simulator (:func:`create_snp_vm`) carries a
:class:`SimSnpModel`: KVM's SNP side (``snp.launch.KvmSnpVm``) over its own
simulated SNP firmware (``snp.firmware.SimulatedSnpFirmware``, RMP and host
memory) plus what the SEV-ES vCPU model needs (ASID, memory key, VMSA).  Its
vCPUs are :class:`SnpVcpu`: an SEV-ES vCPU (#VC, GHCB, protected state,
encrypted memory: sim/seves.py, sim/sev.py) with, in addition:

* **The RMP checks on guest accesses.**  The SEV MMU's TLB fill hook
  (:class:`SnpMmu`) checks every page the guest's translation reaches, once
  per TLB fill, with ``Rmp.check_guest_access`` (APM Table 15-39) against the
  page KVM's nested page table maps the GPA to (``KvmSnpVm.spa_of``: the
  guest_memfd page when the GPA is private, a hypervisor rewiring when the lab
  remaps one).  A failed check fills the TLB with an address the engine has
  no memory at (:data:`POISON_BASE` + GPA), so the access stops in the
  unmapped-memory hook before it reads or writes anything; the vCPU then
  raises **#VC 0x404** (page not validated; RIP at the instruction) or takes
  the **#NPF** with the RMP bit as KVM does (``KvmSnpVm.handle_npf``: a
  private/shared mismatch is a ``KVM_EXIT_MEMORY_FAULT`` the VMM answers by
  converting the page, as QEMU does, which this model does for it; an
  unassigned guest_memfd page is assigned; anything else re-enters the guest,
  which faults again -- a remapped page never yields the other page's data).
  Every RMP event flushes the engine's TLB so the next access is checked again.
  Deviation: exception frames and other accesses the model itself makes
  through ``translate`` (IDT, stack pushes during delivery) are not checked.
* **PVALIDATE (F2 0F 01 FF) and RMPADJUST (F3 0F 01 FE).**  The engine
  raises #UD for both; the #UD event is decoded here and emulated with
  ``Rmp.pvalidate`` / ``Rmp.rmpadjust`` on the page the guest's linear address
  (RAX) translates to: RAX = the return code, RFLAGS.CF = "no change", RIP
  past the 4 bytes.  Their #NPF (a page not yet assigned) goes through KVM's
  #NPF path and the instruction is re-executed; #GP (CPL > 0) is injected.
* **SNP VMGEXITs** (:class:`SnpVmgexitHandler`): the GHCB MSR protocol's
  page-state change (0x014 -> 0x015) and the PSC NAE event (0x80000010)
  through ``snp.psc`` (``KVM_HC_MAP_GPA_RANGE`` answered by the VMM with
  ``KVM_SET_MEMORY_ATTRIBUTES``, then KVM's RMP update: ``apply_map_gpa_range``);
  AP creation (0x80000013) through ``KvmSnpVm.ap_creation`` (an accepted AP_CREATE
  starts the AP ``smp.run_vcpus`` holds: :func:`start_ap`, VMRUN's VMSA checks, then the
  registers and segments of the guest's VMSA page; each vCPU its own GHCB); GHCB GPA
  registration (0x012) and the preferred-GPA request (0x010) as the SEV-ES
  handler already answers them for an SNP VM.  SEV_STATUS reads 7 (SEV, SEV-ES, SNP).

Counters (``SimSnpModel.stats``): PVALIDATEs, RMPADJUSTs, #VC 0x404s, #NPFs,
page-state changes and pages converted.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from typing import TYPE_CHECKING

import unicorn
from unicorn import x86_const as X

from ..errors import SevError, UsageError
from ..sev.ghcb import (
    SVM_VMGEXIT_AP_CREATION,
    SVM_VMGEXIT_EXT_GUEST_REQUEST,
    SVM_VMGEXIT_GUEST_REQUEST,
    SVM_VMGEXIT_PSC,
)
from ..sev.memcrypt import GuestKey
from ..sev.vmgexit import SevEsVmgexitHandler
from ..snp import rmp as R
from ..snp.firmware import SimulatedSnpFirmware
from ..snp.launch import KvmSnpVm, guest_launch_plan
from ..snp.measure import PAGE_SIZE, PageType
from ..snp.psc import (
    GHCB_MSR_PSC_REQ,
    GhcbResult,
    MapGpaRange,
    PscRequest,
    apply_map_gpa_range,
    begin_psc_msr,
    complete_psc_msr,
    handle_psc,
    scratch_area,
)
from .sev import SHADOW_BASE, SevMemory, SevMmu, c_bit_of
from .seves import SevEsVcpu
from .svm import SVM_EXIT_NPF

if TYPE_CHECKING:
    from .system import SimSystem
    from .vm import SimVm

#: where a page that failed its RMP check is "filled" in the engine's physical space: no
#: memory there, so the access stops in the unmapped hook (below the model CPU's 40-bit
#: limit, above the plaintext alias at sev.SHADOW_BASE = 0x80_0000_0000)
POISON_BASE = 0xC0_0000_0000
POISON_SIZE = 0x10_0000_0000
PVALIDATE_BYTES = b"\xF2\x0F\x01\xFF"
RMPADJUST_BYTES = b"\xF3\x0F\x01\xFE"
RMP_VC_EVENT = 0x3000  # run-loop event: #VC 0x404 owed (sim/seves.py uses 0x2000 + code)
RMP_NPF_EVENT = 0x3001  # run-loop event: an RMP #NPF KVM could not fix
RFLAGS_CF = 1
_UD_EVENTS = frozenset({6, 0x100 + 0x46})  # #UD from the engine, or as KVM's #UD intercept


class SimSnpModel:
    """One simulated SNP VM: KVM's side (:attr:`kvm`), its firmware and the SEV-ES view."""

    snp = True

    @property
    def vcpu_class(self) -> type:
        """The class of this VM's vCPUs (SimVm asks the model: sim/sev.py imports no subclass)."""
        return SnpVcpu

    def __init__(self, vm):
        self.vm = vm
        self.asid = vm.asid
        self.key = GuestKey()  # the firmware's VEK for this guest (AES-XTS, tweaked by GPA)
        self.firmware = None
        self.kvm: KvmSnpVm | None = None
        self.active = False
        self.es_active = False
        self.handle = 0
        self.vmsa_pages: dict = {}
        self.ghcb_version = 2
        self.vmsa_features = 0
        self.launch_digest = b""
        self.launch_seconds = 0.0
        self.stats = dict(pvalidate=0, rmpadjust=0, vc_404=0, npf=0, memory_faults=0,
                          psc_msr=0, psc_nae=0, pages_converted=0, guest_requests=0)
        self._messages = None  # snp.guestreq.GuestMessageFirmware, made on first use
        self._certificate_blob = None  # what KVM hands an extended guest request
        self._attestation = None  # (system, policy) once launched
        #: AP creation (NAE 0x80000013) as the held APs see it: APIC ID -> the VMSA GPA of
        #: the last accepted AP_CREATE / AP_CREATE_ON_INIT (None after AP_DESTROY), and
        #: every request (APIC ID, request, VMSA GPA, (SW_EXITINFO1, SW_EXITINFO2), seconds)
        self.ap_vmsa_gpa: dict = {}
        self.ap_requests: list = []
        self.ap_events: dict = {}  # APIC ID -> threading.Event, set on an accepted AP_CREATE
        #: APIC ID -> callable() -> None or why VMRUN failed: prepares the held AP to enter
        #: (smp.run_vcpus), called on the creating vCPU's thread while the AP is idle
        self.ap_starters: dict = {}
        self.ap_started: dict = {}  # APIC ID -> what its starter returned

    # the attestation side is made on first use: the simulated chip's RSA keys take seconds
    @property
    def messages(self):
        if self._messages is None and self._attestation is not None:
            _attestation_setup(*self._attestation, self)
        return self._messages

    @property
    def certificate_blob(self) -> bytes:
        if self._certificate_blob is None and self._attestation is not None:
            _attestation_setup(*self._attestation, self)
        return self._certificate_blob or b""

    def ap_event(self, apic_id: int):
        """The event an AP held by ``smp.run_vcpus`` waits on (set by its AP_CREATE)."""
        import threading

        return self.ap_events.setdefault(apic_id, threading.Event())

    def ap_created(self, info1: int, info2: int, result: tuple, seconds: float) -> None:
        """After ``KvmSnpVm.ap_creation``: remember the VMSA GPA of an accepted request and
        wake the AP (AP_CREATE; AP_CREATE_ON_INIT waits for an INIT this model never sends)."""
        from ..snp.launch import SVM_VMGEXIT_AP_CREATE, SVM_VMGEXIT_AP_DESTROY

        request, apic_id = info1 & 0xFFFFFFFF, info1 >> 32
        self.ap_requests.append((apic_id, request, info2, result, seconds))
        self.stats["ap_creation"] = self.stats.get("ap_creation", 0) + 1
        if result[0]:
            return
        self.ap_vmsa_gpa[apic_id] = None if request == SVM_VMGEXIT_AP_DESTROY else info2
        if request == SVM_VMGEXIT_AP_CREATE:
            starter = self.ap_starters.pop(apic_id, None)
            if starter is not None:
                self.ap_started[apic_id] = starter()
            self.ap_event(apic_id).set()

    # KVM_SEV_INIT2 on an SNP VM
    def init2(self, memory: int) -> None:
        pages = -(-memory // PAGE_SIZE)
        round_2m = -(-pages // R.PAGES_PER_2M) * R.PAGES_PER_2M
        self.firmware = SimulatedSnpFirmware(host_pages=max(1 << 12, 4 * round_2m
                                                            + 2 * R.PAGES_PER_2M))
        self.kvm = KvmSnpVm(self.firmware, pages * PAGE_SIZE, asid=self.asid)
        self.kvm.sev_init2()
        self.vmsa_features = self.kvm.vmsa_features
        self.ghcb_version = self.kvm.ghcb_version
        self.active = self.es_active = True

    def close(self) -> None:
        self.kvm = None
        self.firmware = None

    # -- the RMP check of one guest access ---------------------------------------------
    def guest_context(self, cpl: int) -> R.GuestContext:
        return R.GuestContext(asid=self.asid, snp_active=True, vmpl=0, cpl=cpl)

    def convert(self, gpa: int, npages: int, private: bool) -> int:
        """The VMM's KVM_SET_MEMORY_ATTRIBUTES plus KVM's RMP work (psc.apply_map_gpa_range)."""
        self.stats["pages_converted"] += npages
        return apply_map_gpa_range(self.kvm, MapGpaRange(gpa, npages, 0x10 if private else 0))

    def check(self, gpa: int, private: bool, access: str, cpl: int, gva: int):
        """None when the access passes, else ("vc", error code, why) or ("npf", EXITINFO1, why).

        KVM's side runs as on hardware: a private/shared mismatch with the GPA's memory
        attribute is a KVM_EXIT_MEMORY_FAULT the VMM resolves by converting the page
        (QEMU's kvm_convert_memory), an unassigned guest_memfd page is assigned
        (handle_npf), and the access is checked again."""
        kvm = self.kvm
        gfn = gpa >> 12
        if gfn >= kvm.npages:
            return None  # MMIO: not RAM, the SEV-ES MMIO path handles it
        last = None
        for _ in range(3):
            if private != (gfn in kvm.private) and gfn not in kvm.npt_override:
                self.stats["memory_faults"] += 1
                self.convert(gpa & ~0xFFF, 1, private)
                continue
            try:
                self.firmware.rmp.check_guest_access(self.guest_context(cpl), gpa,
                                                     kvm.spa_of(gpa), access, c_bit=private,
                                                     gva=gva)
                return None
            except R.VcException as e:
                return ("vc", e.error_code, e.reason)
            except R.NestedPageFault as e:
                self.stats["npf"] += 1
                before = self.firmware.rmp.lookup(kvm.spa_of(gpa) >> 12)
                kvm.handle_npf(gpa, e.error_code)
                last = ("npf", e.error_code, e.reason)
                if self.firmware.rmp.lookup(kvm.spa_of(gpa) >> 12) == before:
                    return last  # KVM changed nothing: the guest faults again
        return last


class _VcpuThread(threading.local):
    core = None  # the engine the current thread's vCPU runs (None: this thread runs none)


_vcpu_thread = _VcpuThread()


class SnpMemory(SevMemory):
    """SevMemory for an SNP VM whose vCPUs run on threads of their own (``smp.run_vcpus``).

    The syncs at a vCPU's run boundaries touch the engines: the TLB re-arm after an exit
    sync (a CR3 reload) and the code flush after an enter sync.  An engine may be touched
    only from the thread that runs it, so another vCPU's engine is not reloaded: the
    pages just synced stay in ``guest_dirty`` (re-compared, cheaply, at the next sync:
    the other vCPU may still write them through the write permission its TLB holds), and
    its code flushes wait in ``pending_flush`` until it next enters (:meth:`SnpVcpu.run`).
    With one vCPU, or from a thread that runs no vCPU, it behaves as SevMemory."""

    def __init__(self, vm, key):
        super().__init__(vm, key)
        self.pending_flush: dict = {}  # engine -> page GPAs whose translated code is stale

    def _mine(self, core) -> bool:
        mine = _vcpu_thread.core
        return mine is None or core is mine

    def exit_sync(self) -> None:
        if not self.guest_dirty:
            return
        pages, self.guest_dirty = self.guest_dirty, set()
        self.bytes_encrypted += self._copy_changed(pages, to_host=True)
        others = False
        for core in self.cores:
            if core.uc is None or not core.in_guest:
                continue
            if self._mine(core):
                core.set_reg(X.UC_X86_REG_CR3, core.reg(X.UC_X86_REG_CR3))
            else:
                others = True
        if others:
            self.guest_dirty |= pages

    def _copy_changed(self, pages, to_host: bool) -> int:
        if to_host:
            return super()._copy_changed(pages, True)
        vcpus = self.vm.vcpus
        flush = [v for v in vcpus if self._mine(v.core)]
        if len(flush) == len(vcpus):
            return super()._copy_changed(pages, False)
        # SevMemory flushes every vCPU's engine: only this thread's here, the rest later
        saved = self.vm.vcpus
        self.vm.vcpus = flush
        try:
            moved = super()._copy_changed(pages, False)
        finally:
            self.vm.vcpus = saved
        if moved:
            for v in vcpus:
                if v not in flush:
                    self.pending_flush.setdefault(v.core, set()).update(pages)
        return moved

    def enter(self, vcpu) -> None:
        """``vcpu``'s thread is about to run it: apply the code flushes it was owed."""
        stale = self.pending_flush.pop(vcpu.core, None)
        if stale:
            for page in stale:
                vcpu.core.flush_code(SHADOW_BASE + page, PAGE_SIZE)
            vcpu.code_changed()


class SnpMmu(SevMmu):
    """The SEV MMU plus the RMP check at every TLB fill of guest RAM."""

    def __init__(self, core, mem, c_bit: int, vcpu: "SnpVcpu"):
        super().__init__(core, mem, c_bit)
        self.vcpu = vcpu
        self.poisoned: dict = {}  # engine page -> (kind, code, gpa, why)

    def _fill(self, uc, vaddr, access, entry, ud):
        ok = super()._fill(uc, vaddr, access, entry, ud)
        if not ok or entry.paddr >= POISON_BASE:
            return ok
        v = self.vcpu
        if v.snp_model.kvm is None:
            return ok
        write = access == unicorn.UC_MEM_WRITE
        # the guest's own GPA (SevMmu's walk: a lab remap, sim/vm.py, wraps self.walk to
        # return the GPA whose memory it points at -- that is the NPT's business here)
        gpa, private, _err = SevMmu.walk(self, vaddr, write)
        if gpa is None:
            return ok
        v.sync_npt()
        if access == unicorn.UC_MEM_FETCH and private:
            kind = "fetch"
        else:
            kind = "write" if write else "read"
        bad = v.snp_model.check(gpa, private, kind, v._cpl(), vaddr)
        if bad is None:
            return ok
        page = POISON_BASE + (gpa & ~0xFFF)
        self.poisoned[page] = (bad[0], bad[1], gpa, bad[2])
        self.poisoned[vaddr & ~0xFFF] = (bad[0], bad[1], gpa, bad[2])
        entry.paddr = page
        entry.perms = unicorn.UC_PROT_ALL
        return True


class SnpVmgexitHandler(SevEsVmgexitHandler):
    """KVM's VMGEXIT handling for an SNP vCPU: the SEV-ES handler with the SNP events
    (page-state changes through snp.psc, AP creation through KvmSnpVm)."""

    def __init__(self, *, vcpu: "SnpVcpu", **kw):
        super().__init__(snp=True, **kw)
        self.vcpu = vcpu

    def _msr_protocol(self, msr: int):
        if msr & 0xFFF == GHCB_MSR_PSC_REQ:
            model = self.vcpu.snp_model
            model.stats["psc_msr"] += 1
            r = super()._msr_protocol(msr)  # the trace record (the base answers "error")
            step = begin_psc_msr(msr)
            if isinstance(step, MapGpaRange):
                new = complete_psc_msr(self.vcpu._psc_convert(step))
                detail = (f"page state change: GFN {step.gpa >> 12:#x} -> "
                          f"{'private' if step.private else 'shared'} (KVM_HC_MAP_GPA_RANGE)")
            else:
                new, detail = step, "page state change: bad operation"
            r.ghcb_msr = new
            r.trace.msr_response = new
            r.trace.detail = detail
            return r
        return super()._msr_protocol(msr)

    def _dispatch(self, gpa, trace, code, info1, info2, cpl):
        if code == SVM_VMGEXIT_PSC:
            model = self.vcpu.snp_model
            model.stats["psc_nae"] += 1
            m = self._mapped
            sa = scratch_area(gpa, m.scratch_gpa, ghcb_version=self.ghcb_version)
            if isinstance(sa, GhcbResult):  # GHCB v2: the descriptor must be in the GHCB
                self._set_response(sa.sw_exit_info_1, sa.sw_exit_info_2)
                return self._unmap_resume(gpa, trace, "page state change: invalid scratch area")
            off, length = sa
            buf = bytearray(m.page.buf[off:off + length])
            result = handle_psc(PscRequest(buf), self.vcpu._psc_convert)
            m.page.buf[off:off + length] = buf  # cur_entry / cur_page as KVM advanced them
            self._set_response(result.sw_exit_info_1, result.sw_exit_info_2)
            status = result.sw_exit_info_2
            return self._unmap_resume(gpa, trace, "page state change: "
                                      + ("done" if not status else f"error {status:#x}"))
        if code in (SVM_VMGEXIT_GUEST_REQUEST, SVM_VMGEXIT_EXT_GUEST_REQUEST):
            return self._guest_request(gpa, trace, code, info1, info2)
        if code == SVM_VMGEXIT_AP_CREATION:
            model = self.vcpu.snp_model
            t0 = time.perf_counter()
            e1, e2 = model.kvm.ap_creation(info1, info2, self._mapped.regs["rax"])
            model.ap_created(info1, info2, (e1, e2), time.perf_counter() - t0)
            self._set_response(e1, e2)
            return self._unmap_resume(gpa, trace, "AP creation " + ("accepted" if not e1
                                                                      else "refused"))
        return super()._dispatch(gpa, trace, code, info1, info2, cpl)


    def _guest_request(self, gpa, trace, code, req_gpa, resp_gpa):
        """``snp_handle_guest_req`` (and the extended request's certificate blob, as KVM
        hands the one the VMM configured): the request page to the firmware, its response
        to the response page, SW_EXITINFO2 = SNP_GUEST_ERR(vmm error, firmware status)."""
        from ..snp.guestreq import SNP_GUEST_VMM_ERR_INVALID_LEN, snp_guest_err

        model = self.vcpu.snp_model
        model.stats["guest_requests"] += 1
        m = self._mapped
        if code == SVM_VMGEXIT_EXT_GUEST_REQUEST:
            blob = model.certificate_blob
            pages = m.regs["rbx"]
            need = -(-len(blob) // PAGE_SIZE)
            if pages < need:  # too small: the pages needed in RBX, the request not issued
                m.regs["rbx"] = need
                self._set_response(0, snp_guest_err(SNP_GUEST_VMM_ERR_INVALID_LEN, 0))
                return self._unmap_resume(gpa, trace, f"extended guest request: {pages} "
                                          f"certificate page(s), {need} needed")
            if blob and not self._write(m.regs["rax"], blob):
                return self._error(gpa, trace, errno.EFAULT, "certificate buffer not writable")
        request = self._read(req_gpa, PAGE_SIZE)
        if request is None:
            return self._error(gpa, trace, errno.EFAULT, "guest request page not readable")
        response, status = model.messages.request(request)
        if response is not None and not self._write(resp_gpa, response.ljust(PAGE_SIZE, b"\0")):
            return self._error(gpa, trace, errno.EFAULT, "guest response page not writable")
        self._set_response(0, snp_guest_err(0, status))
        return self._unmap_resume(gpa, trace, "guest request: firmware status "
                                  f"{int(status):#x}")


class SnpVcpu(SevEsVcpu):
    """A vCPU of an SEV-SNP guest (see the module docstring)."""

    sev_status = 7  # SEV_STATUS: SEV | SEV-ES | SNP

    def __init__(self, vm, vcpu_id: int, asid: int):
        super().__init__(vm, vcpu_id, asid)
        self.snp_model: SimSnpModel = vm._sev_model
        self._rmp_fault = None  # (kind, code, gpa, why) of the access the core stopped on
        self.rmp_faults: list = []  # every RMP #NPF / #VC 0x404: (kind, code, gpa, rip, why)
        self.rmp_fault_hooks: list = []  # callables(kind, code, gpa, rip, why), e.g. the lab's

    def add_rmp_fault_hook(self, callback) -> None:
        """``callback(kind, code, gpa, rip, why)`` at every RMP fault (the lab's remap)."""
        self.rmp_fault_hooks.append(callback)

    def mmu_class(self, core, mem, c_bit):
        return SnpMmu(core, mem, c_bit, self)

    def _sev_setup(self) -> None:
        vm = self.vm
        if vm._sev_memory is None:  # the VM's memory state, safe for vCPU threads
            vm._sev_memory = SnpMemory(vm, self.sev_model.key)
        super()._sev_setup()

    def run(self):
        _vcpu_thread.core = self.core  # this thread runs this engine (SnpMemory)
        try:
            mem = self.vm._sev_memory
            if isinstance(mem, SnpMemory):
                mem.enter(self)
            return super().run()
        finally:
            _vcpu_thread.core = None

    def _make_handler(self, **kw):
        return SnpVmgexitHandler(vcpu=self, **kw)

    # -- RMP changes: the engine's TLB must forget what it checked ---------------------
    def _flush_tlb(self) -> None:
        core = self.core
        if core.uc is not None and core.in_guest:
            core.set_reg(X.UC_X86_REG_CR3, core.reg(X.UC_X86_REG_CR3))

    def _psc_convert(self, req: MapGpaRange) -> int:
        """One KVM_HC_MAP_GPA_RANGE: the guest's private writes reach host memory first
        (they must not land on the page once it is shared), then the conversion."""
        if self.sev_memory is not None:
            self.sev_memory.exit_sync()
        ret = self.snp_model.convert(req.gpa, req.npages, req.private)
        self._flush_tlb()
        return ret

    # -- events ------------------------------------------------------------------------
    def _handle_event(self):
        intno, rip = self.run_state.event
        if intno in _UD_EVENTS and self.sev_memory is not None:
            code = self._code_bytes(rip, 4)
            if code in (PVALIDATE_BYTES, RMPADJUST_BYTES):
                self.run_state.drop_event()
                self._rmp_instruction(rip, code == PVALIDATE_BYTES)
                return
        if intno in (RMP_VC_EVENT, RMP_NPF_EVENT):
            self.run_state.drop_event()
            self.fault_answered()
            kind, code, gpa, why = self._rmp_fault
            self._rmp_fault = None
            self._record_fault(kind, code, gpa, rip, why)
            if intno == RMP_VC_EVENT:
                self.snp_model.stats["vc_404"] += 1
                self.vc_count += 1
                self._inject_now(29, code, rip)
            else:
                # #VMEXIT(NPF) with the RMP bit; KVM could not fix it: re-enter, fault again
                self.svm.vmexit(SVM_EXIT_NPF, code, gpa, rip, 0, "kernel")
                self.core.set_reg(X.UC_X86_REG_RIP, rip)
            self._flush_tlb()
            return
        super()._handle_event()

    def _record_fault(self, kind, code, gpa, rip, why):
        self.rmp_faults.append((kind, code, gpa, rip, why))
        if len(self.rmp_faults) > 1000:
            del self.rmp_faults[:500]
        for hook in list(self.rmp_fault_hooks):
            hook(kind, code, gpa, rip, why)

    def sync_npt(self) -> None:
        """KVM's nested page table as a hypervisor rewired it: ``SimVm.remap_page`` (the
        lab) points a GPA at another guest page's memory, i.e. at its guest_memfd page."""
        kvm = self.snp_model.kvm
        want = {g >> 12: kvm.gmem_pfn(t >> 12) for g, t in self.vm.remapped.items()}
        if want != kvm.npt_override:
            kvm.npt_override = want

    def on_unmapped(self, access, addr, size, value):
        mmu = self.mmu
        if mmu is not None and isinstance(mmu, SnpMmu):
            hit = mmu.poisoned.get(addr & ~0xFFF)
            if hit is None and POISON_BASE <= addr < POISON_BASE + POISON_SIZE:
                hit = mmu.poisoned.get(addr & ~0xFFF)
            if hit is not None:
                self._rmp_fault = hit
                self.run_state.post_event(RMP_VC_EVENT if hit[0] == "vc" else RMP_NPF_EVENT, self.core.rip())
                self.core.stop()
                return False
        return super().on_unmapped(access, addr, size, value)

    # -- PVALIDATE / RMPADJUST -----------------------------------------------------------
    def _rmp_instruction(self, rip: int, pvalidate: bool) -> None:
        core = self.core
        model = self.snp_model
        rax = core.reg(X.UC_X86_REG_RAX)
        rcx = core.reg(X.UC_X86_REG_RCX)
        rdx = core.reg(X.UC_X86_REG_RDX)
        if not self._bitness() == 64:
            rax &= 0xFFFFFFFF
        size_2m = bool(rcx & 1)
        gpa, private, err = SevMmu.walk(self.mmu, rax)
        self.sync_npt()
        if gpa is None:
            self.svm.vmcb.save.cr2 = rax
            self._inject_now(14, err, rip)
            return
        ctx = model.guest_context(self._cpl())
        rmp = model.firmware.rmp
        kvm = model.kvm
        model.stats["pvalidate" if pvalidate else "rmpadjust"] += 1
        for _attempt in range(3):
            if (gpa >> 12) < kvm.npages and (gpa >> 12) not in kvm.private \
                    and (gpa >> 12) not in kvm.npt_override:
                model.stats["memory_faults"] += 1
                model.convert(gpa & ~0xFFF, 1, True)  # a private access to a shared GPA
            spa = kvm.spa_of(gpa)
            try:
                if pvalidate:
                    r = rmp.pvalidate(ctx, gpa, spa, size_2m=size_2m, validate=bool(rdx & 1))
                else:
                    r = rmp.rmpadjust(ctx, gpa, spa, rdx, size_2m=size_2m)
                break
            except R.NestedPageFault as e:
                model.stats["npf"] += 1
                before = rmp.lookup(spa >> 12)
                kvm.handle_npf(gpa, e.error_code)
                if rmp.lookup(kvm.spa_of(gpa) >> 12) == before:
                    self._record_fault("npf", e.error_code, gpa, rip, e.reason)
                    self.svm.vmexit(SVM_EXIT_NPF, e.error_code, gpa, rip, 0, "kernel")
                    core.set_reg(X.UC_X86_REG_RIP, rip)  # re-executed: faults again
                    return
            except R.GuestGP:
                self._inject_now(13, 0, rip)
                return
            except R.GuestUD:
                self._inject_now(6, None, rip)
                return
        else:
            core.set_reg(X.UC_X86_REG_RIP, rip)
            return
        core.set_reg(X.UC_X86_REG_RAX, r.rax)
        flags = core.reg(X.UC_X86_REG_RFLAGS)
        core.set_reg(X.UC_X86_REG_RFLAGS, (flags | RFLAGS_CF) if r.cf else (flags & ~RFLAGS_CF))
        core.set_reg(X.UC_X86_REG_RIP, rip + 4)
        self._flush_tlb()


# -- the VM and its launch ---------------------------------------------------------------

def create_snp_vm(system: SimSystem) -> SimVm:
    """KVM_CREATE_VM(KVM_X86_SNP_VM) on the simulator: a SimVm whose SEV model is SNP's."""
    from ..abi import KVM_X86_SNP_VM
    from .vm import SimVm

    vm = SimVm(system, KVM_X86_SNP_VM, next(system._asids))
    system._vms.append(vm)
    vm._sev_model = SimSnpModel(vm)
    return vm


class SnpMachineLaunch:
    """What an SNP launch of a Machine established (``Machine.launch_result``)."""

    def __init__(self, model: SimSnpModel, plan, policy: int):
        self.model = model
        self.plan = plan
        self.policy = policy
        self.digest = model.launch_digest
        self.seconds = model.launch_seconds
        self.cpuid_corrections: list = []  # (offered, corrected) CPUID entries, if refused

    @property
    def launch_digest(self) -> bytes:
        return self.digest

    def rmp_entry(self, gpa: int) -> dict:
        """The RMP entry of the host page the nested page table maps ``gpa`` to (a simulated
        host reads its own RMP; through KVM the RMP stays in firmware-owned memory)."""
        spa = self.model.kvm.spa_of(gpa) & ~0xFFF
        e, _ = self.model.firmware.rmp.effective(spa >> 12)
        return {"spa": spa, "owner": e.owner, "assigned": e.assigned, "validated": e.validated,
                "asid": e.asid, "gpa": e.gpa, "vmsa": e.vmsa, "immutable": e.immutable}

    def vmsa_rmp_entry(self, vcpu: int = 0) -> dict:
        """The RMP entry of vCPU ``vcpu``'s VMSA page (KVM's launch VMSA, or the page the
        guest gave at AP creation)."""
        pfn = self.model.kvm.vcpus[vcpu].vmsa_pfn
        e, _ = self.model.firmware.rmp.effective(pfn)
        return {"spa": pfn << 12, "owner": e.owner, "assigned": e.assigned,
                "validated": e.validated, "asid": e.asid, "gpa": e.gpa, "vmsa": e.vmsa,
                "immutable": e.immutable}

    def to_dict(self) -> dict:
        return {"mode": "sev-snp", "policy": f"0x{self.policy:x}",
                "launch_digest": self.digest.hex(), "pages": len(self.plan.pages),
                "launch_seconds": round(self.seconds, 6)}


def launch_machine(machine, image, data: bytes, policy: int | None, *,
                   cpuid_entries: list | None = None) -> SnpMachineLaunch:
    """An SEV-SNP launch of a Machine on the simulator, in the order a VMM uses KVM:
    KVM_SEV_INIT2, the vCPU, KVM_SET_MEMORY_ATTRIBUTES (all RAM private), SNP_LAUNCH_START,
    SNP_LAUNCH_UPDATE of the boot tables and image (NORMAL), the SECRETS and CPUID pages,
    SNP_LAUNCH_FINISH with the vCPU's VMSA.  The pages are those ``measure --mode
    sev-snp`` lists, so the firmware's digest equals the offline one.  ``cpuid_entries``:
    the CPUID page the VMM offers instead of the default one; a page the firmware refuses
    comes back corrected and is offered once more, as KVM and QEMU do
    (``SnpMachineLaunch.cpuid_corrections``: (offered, corrected) entry pairs)."""
    from ..snp.firmware import parse_cpuid_page
    from ..snp.policy import DEFAULT_POLICY, SnpPolicy

    vm = machine.vm
    model = vm._sev_model
    if not isinstance(model, SimSnpModel):
        raise UsageError("an SEV-SNP launch needs a KVM_X86_SNP_VM")
    policy = DEFAULT_POLICY if policy is None else int(policy)
    why = SnpPolicy(policy).kvm_check()
    if why:
        raise UsageError(f"SNP policy {policy:#x}: KVM refuses it: {why}")
    t0 = time.perf_counter()
    model.init2(machine.memory)
    machine.vcpu = vm.create_vcpu(0)
    kvm = model.kvm
    kvm.create_vcpu()
    machine.aps = []
    for i in range(1, machine.vcpu_count):  # APs: KVM measures their RESET-state VMSAs
        machine.aps.append(vm.create_vcpu(i))
        kvm.create_vcpu()
    c_bit = c_bit_of(machine.system)  # CPUID 0x8000001F EBX[5:0] (the simulator never imports machine)
    machine.load(image, data, c_bit=c_bit)
    plan = guest_launch_plan(data, image.mode, machine.memory, vcpus=machine.vcpu_count,
                             c_bit=c_bit if image.mode == "long64" else None,
                             source=f"guest {image.name}", cpuid_entries=cpuid_entries)
    kvm.launch_start(policy)
    corrections: list = []
    kvm.set_memory_attributes(0, kvm.npages * PAGE_SIZE, True)
    pages = plan.memory_pages()
    for p in pages:
        if p.page_type == PageType.NORMAL and vm.read(p.gpa, PAGE_SIZE) != p.data:
            raise SevError("KVM_SEV_SNP_LAUNCH_UPDATE", errno.EINVAL, None,
                           f"guest memory at {p.gpa:#x} differs from the launch plan")
        try:
            kvm.launch_update(p.gpa >> 12, p.data, PAGE_SIZE, int(p.page_type))
        except SevError as e:
            copyback = getattr(kvm, "cpuid_copyback", None)  # SEV_RET_INVALID_PARAM: corrected
            if p.page_type != PageType.CPUID or e.fw_error != 0x16 or copyback is None:
                raise
            fixed = copyback[:PAGE_SIZE]  # the firmware's table, written into the source page
            corrections = [(a, b) for a, b in zip(parse_cpuid_page(p.data)[1],
                                                  parse_cpuid_page(fixed)[1], strict=False) if a != b]
            kvm.launch_update(p.gpa >> 12, fixed, PAGE_SIZE, int(p.page_type))
            plan.pages[plan.pages.index(p)] = type(p)(p.gpa, p.page_type, fixed)
    pages = plan.memory_pages()
    kvm.launch_finish([p.data for p in plan.vmsa_pages()])
    # the launched pages, as the firmware left them (secrets filled), encrypted in guest RAM
    for p in pages:
        plain = model.firmware.memory.read_page(kvm.gmem_pfn(p.gpa >> 12))
        vm.write(p.gpa, model.key.encrypt(p.gpa, plain))
    vmsa = plan.vmsa_pages()[0].data
    model.vmsa_pages = {0: (kvm.vcpu_vmsas[0] << 12, bytearray(model.key.encrypt(0, vmsa)))}
    model.handle = kvm.gctx_spa
    model.launch_digest = kvm.launch_digest
    model._attestation = (machine.system, policy)
    model.launch_seconds = time.perf_counter() - t0
    result = SnpMachineLaunch(model, plan, policy)
    result.cpuid_corrections = corrections
    return result


def start_ap(machine, ap, apic_id: int) -> str | None:
    """The first KVM_RUN of an AP after the guest's AP_CREATE for it: VMRUN's VMSA checks
    (``KvmSnpVm.vmrun_check``: APM Table 15-41) on the page the guest chose, then the vCPU
    enters with the state that page holds (the CPU loads the whole VMSA at VMRUN; here its
    registers, segments, descriptor tables, CR0/CR3/CR4 and EFER become the engine's) and
    is protected from then on.  Returns None when it entered, else why VMRUN failed
    (VMEXIT_INVALID: KVM reports KVM_EXIT_FAIL_ENTRY and the AP runs no instruction).
    ``smp.run_vcpus`` calls it on the creating vCPU's thread at the AP_CREATE (the AP's
    thread is idle then: an engine is touched by one thread at a time), so the check sees
    the RMP as it is at the request."""
    from ..sev.vmsa import Vmsa

    model = machine.vm._sev_model
    kvm = model.kvm
    try:
        why = kvm.vmrun_check(apic_id)
    except SevError as e:
        return str(e)
    if why is not None:
        return f"VMRUN: VMEXIT_INVALID: {why}"
    gpa = model.ap_vmsa_gpa.get(apic_id)
    mem = machine.vm._sev_memory
    if gpa is None or mem is None:
        return "VMRUN: VMEXIT_INVALID: no VMSA"
    page = bytes(mem.read_private(gpa, PAGE_SIZE))  # the guest's private page, in plaintext
    v = Vmsa(page)
    ap.set_sregs(v.sregs())
    ap.set_regs(v.regs())
    model.vmsa_pages[apic_id] = (kvm.vcpus[apic_id].vmsa_pfn << 12, bytearray(model.key.encrypt(gpa, page)))
    if ap.sev_memory is None:  # its engine with the SEV MMU, made while it is idle
        ap._sev_setup()
    return None


def snp_chip_for(system):
    """The simulated chip behind a SimSystem's SNP guests (one per host): CHIP_ID, TCBs,
    VCEK, the reports' signer (snp/attest.py), Milan as the firmware's CPUID says."""
    from ..snp.attest import SimulatedSnpChip

    chip = system.snp_chip
    if chip is None:
        chip = system.snp_chip = SimulatedSnpChip("milan")
    return chip


def set_config(system, reported_tcb) -> None:
    """SNP_SET_CONFIG: the REPORTED_TCB reports carry and the VCEK is derived for.
    (model) A TCB above the current one in any component is INVALID_PARAM."""
    from ..sev.status import SevStatus
    from ..snp.firmware import _fail

    chip = snp_chip_for(system)
    cur = chip.current_tcb
    for name in ("bootloader", "tee", "snp", "microcode"):
        if getattr(reported_tcb, name) > getattr(cur, name):
            raise _fail("SNP_SET_CONFIG", SevStatus.INVALID_PARAM,
                        f"REPORTED_TCB {name} {getattr(reported_tcb, name)} is above the "
                        f"current {getattr(cur, name)}")
    chip.reported_tcb = reported_tcb


def platform_status(system, model: SimSnpModel | None = None):
    """SNP_PLATFORM_STATUS with the chip's CURRENT_TCB and REPORTED_TCB (SNP_SET_CONFIG's);
    the platform state and guest count from ``model``'s firmware when given."""
    import dataclasses

    from ..snp.firmware import SimulatedSnpFirmware

    chip = snp_chip_for(system)
    fw = model.firmware if model is not None and model.firmware is not None \
        else SimulatedSnpFirmware(host_pages=1 << 12)
    return dataclasses.replace(fw.platform_status(),
                               current_tcb_version=chip.current_tcb.raw(chip.generation),
                               reported_tcb_version=chip.reported_tcb.raw(chip.generation))


def _attestation_setup(system, policy: int, model: SimSnpModel) -> None:
    """After SNP_LAUNCH_FINISH: the guest's message channel (its VMPCKs, the launch's
    digest, policy, ID block and HOST_DATA in its reports) and the certificate blob the
    VMM gives KVM for extended requests (the chip's ARK, ASK and VCEK)."""
    from ..snp.attest import GuestAttestationContext
    from ..snp.guestreq import GuestMessageFirmware
    from ..snp.messages import certificate_table

    chip = snp_chip_for(system)
    g = model.firmware.guests[model.kvm.gctx_spa >> 12]
    family, image, svn = bytes(16), bytes(16), 0
    if g.id_block:
        _ld, family, image, _ver, svn, _pol = struct.unpack_from("<48s16s16sIIQ", g.id_block)
    ctx = GuestAttestationContext(
        measurement=model.launch_digest, policy=policy, family_id=family, image_id=image,
        guest_svn=svn, host_data=g.host_data, id_key_digest=g.id_key_digest,
        author_key_digest=g.author_key_digest)
    model._messages = GuestMessageFirmware(g.vmpck, chip, ctx)
    model._certificate_blob = certificate_table(chip.certificate_der())


def secrets_page(machine) -> bytes:
    """The guest's secrets page as the firmware filled it (VMPCK0-3 at 0x20..0x9F)."""
    from ..snp.launch import SNP_SECRETS_GPA

    model = machine.vm._sev_model
    return model.firmware.memory.read_page(model.kvm.gmem_pfn(SNP_SECRETS_GPA >> 12))


__all__ = [
    "POISON_BASE", "SimSnpModel", "SnpMachineLaunch", "SnpMmu", "SnpVcpu", "SnpVmgexitHandler",
    "create_snp_vm", "launch_machine", "platform_status", "secrets_page", "set_config",
    "snp_chip_for", "start_ap",
]
