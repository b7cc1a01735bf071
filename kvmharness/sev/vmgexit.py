"""A model of KVM's VMGEXIT handling for SEV-ES guests (arch/x86/kvm/svm/sev.c).

When an SEV-ES guest executes VMGEXIT (``rep vmmcall``, F3 0F 01 D9) the CPU
exits with code 0x403 and the GHCB MSR value in ``VMCB.ghcb_gpa``; KVM's
``sev_handle_vmgexit()`` then either answers an MSR-protocol request
(``sev_handle_vmgexit_msr_protocol``) or maps the guest's GHCB page, copies the
valid inputs (``sev_es_sync_from_ghcb``), validates them
(``sev_es_validate_vmgexit``), dispatches on SW_EXIT_CODE, and at the next
VMRUN writes RAX/RBX/RCX/RDX back (``sev_es_unmap_ghcb`` ->
``sev_es_sync_to_ghcb``).  :class:`SevEsVmgexitHandler` is that logic as a
pure object, for the simulator's "KVM layer" and for tests:

    h = SevEsVmgexitHandler(cpuid=table, read_guest=vm.read, write_guest=vm.write,
                            ghcb_version=2, c_bit=51)
    msr = h.reset_ghcb_msr()              # what KVM preloads at vCPU reset
    r = h.vmgexit(msr_value_at_vmgexit)   # at exit code 0x403
    r.action    -> "resume" | "exit" | "error"
    r.ghcb_msr  -> the GHCB MSR value the guest sees when it runs again
    r.exit      -> an exits.* value for userspace (IoOut, IoIn, MmioRead, MmioWrite,
                   MsrRead, MsrWrite, SevTermination, InternalError, Unsupported)
    r.inject    -> (vector, error_code|None): an exception KVM queues (EVENTINJ)
    r.errno     -> for "error": KVM_RUN fails with this errno (EINVAL, EFAULT, EIO)
    r.trace     -> VmgexitTrace: the VMGEXIT decoded (names, exit info, valid fields)
    if r.needs_completion:   # after userspace handled r.exit:
        r = h.complete(value, error=False)   # -> the next result (resume or another exit)

Guest memory is reached only through the two callables (host view, i.e. what
``kvm_read_guest``/``kvm_write_guest`` see); a read that raises (an unbacked GPA)
is treated as KVM's failed mapping.  No input, however malformed, makes the
handler raise: every VMGEXIT ends in one of the outcomes KVM defines.

What is modelled, function by function (current upstream, GHCB v2, read for
this module):

* ``sev_handle_vmgexit_msr_protocol``: SEV_INFO (max = the VM's GHCB version,
  min 1, C-bit), CPUID (one register, function from [63:32], ECX = 0, answered
  from the CPUID table), AP_RESET_HOLD (no in-kernel LAPIC: exit
  KVM_EXIT_AP_RESET_HOLD = 32 to userspace, reported as ``Unsupported(32)``),
  HV_FT (0x3), PREF_GPA / REG_GPA / PSC terminate a non-SNP guest
  (``KVM_EXIT_SYSTEM_EVENT`` / ``KVM_SYSTEM_EVENT_SEV_TERM``), TERM_REQ
  terminates, every other code leaves the MSR unchanged and resumes.
* ``sev_handle_vmgexit``: GPA 0 or an unmappable GHCB: resume untouched;
  SNP: an unregistered GHCB GPA is -EINVAL; then validation, ``svm_vmgexit_success(0)``
  and dispatch: MMIO read/write through the scratch area (8-byte
  ``KVM_EXIT_MMIO`` pieces, ``complete_sev_es_emulated_mmio``), NMI complete,
  AP HLT loop, AP jump table, HV features, termination, SNP PSC (hypercall exits
  are off: generic PSC error), AP creation, guest requests (no SNP firmware in
  the model: -EIO), UNSUPPORTED_EVENT (-EINVAL), and ``svm_invoke_exit_handler``
  for the validated SVM exit codes: DR7 read/write (``dr_interception``: no-op
  for SEV-ES), RDTSC (no SVM handler: ``svm_handle_invalid_exit`` ->
  KVM_EXIT_INTERNAL_ERROR suberror 4), RDPMC (counters modelled as absent:
  #GP), CPUID (``kvm_emulate_cpuid``), INVD/WBINVD (no-op), IOIO
  (``kvm_fast_pio`` / ``sev_es_string_io`` in PAGE_SIZE/size chunks), MSR
  (``kvm_emulate_rdmsr/wrmsr``: in-kernel MSRs, the MSR filter, user MSR exits,
  #GP through the GHCB's ISSUE_EXCEPTION response), VMMCALL
  (``kvm_emulate_hypercall``: CPL != 0 -> -KVM_EPERM, VAPIC_POLL_IRQ /
  KICK_CPU / SCHED_YIELD -> 0, others -KVM_ENOSYS), RDTSCP (``kvm_handle_invalid_op``:
  #UD), MONITOR/MWAIT (NOP under the default MWAIT_NEVER_UD_FAULTS quirk).
* ``setup_vmgexit_scratch``: scratch GPA 0, a wrapping range, a range that
  starts in the GHCB page but leaves the shared buffer (0x800-0xFEF), or more
  than 16 pages outside it -> ``GHCB_ERR_INVALID_SCRATCH_AREA``; an unreadable
  outside buffer -> -EFAULT; an outside buffer that the operation fills is
  written back to guest memory before the guest runs again.

How the simulator uses it (one handler per SEV-ES vCPU):

* create: ``SevEsVmgexitHandler(cpuid=<the table given to set_cpuid>, read_guest=vm.read,
  write_guest=vm.write, ghcb_version=<1 for KVM_SEV_ES_INIT, else INIT2's, 0 -> 2>,
  c_bit=<host CPUID 0x8000001F EBX & 0x3F>, user_msrs=<MSRs the MSR filter denies>,
  user_msr_reasons=<the enable_user_msr_exits mask>)``; load the guest's GHCB MSR
  with ``h.reset_ghcb_msr()``.  RDMSR/WRMSR of 0xC0010130 in the guest are not
  intercepted (no #VC, no exit): the CPU keeps the value.
* an intercepted instruction or event with SVM exit code ``c``: if
  ``vc_error_code(c)`` is not None, deliver #VC (vector 29) with that error code
  inside the guest, RIP at the instruction; nothing reaches KVM or userspace.
  Otherwise it is an automatic exit, handled as for plain SEV (HLT, shutdown, ...).
* VMGEXIT (F3 0F 01 D9): the guest resumes after the 4 bytes.  Call
  ``r = h.vmgexit(<guest GHCB MSR>)`` and record ``r.trace``; then
  ``resume``: load ``r.ghcb_msr`` into the guest's GHCB MSR, deliver ``r.inject``
  if set (``(vector, error_code or None)``), keep running;
  ``exit``: ``Vcpu.run()`` returns ``r.exit``.  When ``r.needs_completion``, the
  next ``Vcpu.complete(value, error=...)`` -- or, for IoOut / MmioWrite, which
  Machine does not complete, the next ``run()`` -- calls ``h.complete(value,
  error=error)`` and handles its result the same way (string IO and MMIO come
  in several exits);  ``error``: ``Vcpu.run()`` raises
  ``KvmError("KVM_RUN", r.errno)``.
* ``Vcpu.get_regs()`` of an SEV-ES vCPU returns ``h.register_cache()`` for the
  GPRs (what KVM's cache holds; the VMSA is encrypted), so Machine's ucall reads
  the RBX/RCX the guest exposed in the GHCB.

Known deviation: a string IOIO with operand size 0 (EXITINFO1 bits 6:4 = 0)
would make the kernel divide PAGE_SIZE by zero in ``kvm_sev_es_outs/ins``; the
model reports -EINVAL instead of modelling a host crash.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from dataclasses import dataclass

from .. import exits as X
from ..errors import HarnessError, SimulatorError
from ..x86 import CpuidTable
from . import ghcb as G

MASK64 = (1 << 64) - 1
PAGE_SIZE = 4096
PAGE_MASK = MASK64 & ~(PAGE_SIZE - 1)
GHCB_SCRATCH_AREA_LIMIT = 16 * PAGE_SIZE
INT_MAX = (1 << 31) - 1

KVM_EXIT_AP_RESET_HOLD = 32
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32

from ..sim import kvmpolicy as _kvm_policy  # noqa: E402 - KVM's policy, one model for both paths

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

GP_VECTOR = 13
UD_VECTOR = 6

#: SVM exit codes that, under SEV-ES, the CPU turns into a #VC inside the guest
#: (non-automatic exits, "NAE events"; docs/facts.md#facts-6b).  The #VC error code is the
#: exit code.  Everything else the harness intercepts (HLT, SHUTDOWN, INTR, the
#: CR/EFER write traps, NPF on private memory, VMGEXIT itself) exits to KVM
#: without a #VC.
NAE_EXIT_CODES = frozenset({
    G.SVM_EXIT_READ_DR7, G.SVM_EXIT_WRITE_DR7, G.SVM_EXIT_EXCP_AC, G.SVM_EXIT_RDTSC,
    G.SVM_EXIT_RDPMC, G.SVM_EXIT_CPUID, G.SVM_EXIT_INVD, G.SVM_EXIT_IOIO, G.SVM_EXIT_MSR,
    G.SVM_EXIT_VMMCALL, G.SVM_EXIT_RDTSCP, G.SVM_EXIT_WBINVD, G.SVM_EXIT_MONITOR,
    G.SVM_EXIT_MWAIT, G.SVM_EXIT_NPF,
})
X86_TRAP_VC = 29


def vc_error_code(exit_code: int, *, mmio: bool = False) -> int | None:
    """The #VC error code an intercept of ``exit_code`` raises in an SEV-ES guest, or None
    when the intercept is an automatic exit.  An NPF raises #VC only for MMIO
    (a reserved-bit fault on a shared page, ``mmio=True``)."""
    if exit_code == G.SVM_EXIT_NPF:
        return exit_code if mmio else None
    return exit_code if exit_code in NAE_EXIT_CODES else None


RESUME = "resume"
EXIT = "exit"
ERROR = "error"


@dataclass
class VmgexitTrace:
    """One VMGEXIT, decoded (what the ``kvm_vmgexit_*`` tracepoints show on hardware).

    ``protocol``: "msr" (GHCB MSR protocol), "ghcb" (full page) or "none"
    (GPA 0 / unmappable page).  For the page protocol: SW_EXIT_CODE and its
    name, EXITINFO1/2, SW_SCRATCH, the fields the guest marked valid,
    ghcb_usage and protocol_version as written, and KVM's response
    (SW_EXIT_INFO_1/2).  ``outcome`` is the result's action, ``detail`` says why.
    """

    ghcb_msr: int
    protocol: str
    msr_request: str | None = None
    msr_response: int | None = None
    ghcb_gpa: int | None = None
    sw_exit_code: int | None = None
    sw_exit_name: str | None = None
    exit_info_1: int | None = None
    exit_info_2: int | None = None
    sw_scratch: int | None = None
    valid: tuple = ()
    ghcb_usage: int | None = None
    protocol_version: int | None = None
    response: tuple | None = None  # (SW_EXIT_INFO_1, SW_EXIT_INFO_2) KVM left in the GHCB
    outcome: str = RESUME
    detail: str = ""

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["valid"] = list(self.valid)
        d["response"] = list(self.response) if self.response is not None else None
        return d


@dataclass
class VmgexitResult:
    """What KVM does after one VMGEXIT (or after a userspace completion)."""

    action: str
    ghcb_msr: int
    trace: VmgexitTrace
    exit: X.Exit | None = None
    errno: int = 0
    inject: tuple | None = None
    needs_completion: bool = False


@dataclass
class _Pending:
    """KVM's state across a userspace exit (vcpu->arch.complete_userspace_io & co)."""

    kind: str  # "pio_out", "pio_in", "str_out", "str_in", "mmio", "rdmsr", "wrmsr"
    size: int = 0
    port: int = 0
    remaining: int = 0  # string IO: elements left (sev_pio_count)
    chunk: int = 0  # string IO: elements in the current exit
    pos: int = 0  # byte offset into the scratch buffer (sev_pio_data / frag->data)
    gpa: int = 0  # MMIO: current fragment GPA
    length: int = 0  # MMIO: bytes left in the fragment
    is_write: bool = False


@dataclass
class _Mapped:
    """The GHCB page KVM has mapped for one VMGEXIT (svm->sev_es.ghcb & scratch state)."""

    gpa: int
    page: G.Ghcb
    regs: dict
    scratch_gpa: int = 0
    sa_in_ghcb: bool = True
    sa_off: int = 0  # scratch offset in the GHCB page, when in the GHCB
    sa_buf: bytearray | None = None  # the kernel copy, when outside the GHCB
    sa_len: int = 0
    sa_sync: bool = False


class SevEsVmgexitHandler:
    """KVM's VMGEXIT handling for one SEV-ES vCPU (see the module docstring).

    ``cpuid``: the vCPU's CPUID table (KVM_SET_CPUID2).  ``read_guest(gpa, n)`` /
    ``write_guest(gpa, data)``: host-view guest memory.  ``ghcb_version``: the
    VM's GHCB protocol version (1 for KVM_SEV_ES_INIT; INIT2's value, 0 meaning 2).
    ``c_bit``: KVM's ``sev_enc_bit`` (host CPUID 0x8000001F EBX[5:0]).
    ``snp``: the VM is an SNP VM.  ``user_msrs``: MSRs the MSR filter denies
    (they exit to userspace when ``user_msr_reasons`` has
    KVM_MSR_EXIT_REASON_FILTER); ``kernel_msrs``: MSR values KVM itself
    handles (a dict the handler reads and writes; absent MSRs are unknown to
    KVM and give #GP unless KVM_MSR_EXIT_REASON_UNKNOWN exits are on).
    ``vmsa_features``: the VM's SEV features (checked by SNP AP creation).
    ``tsc``: a callable returning the guest TSC for RDTSC-style reads.
    """

    def __init__(self, *, cpuid: CpuidTable, read_guest: Callable[[int, int], bytes],
                 write_guest: Callable[[int, bytes], None], ghcb_version: int = G.GHCB_VERSION_MAX,
                 c_bit: int = 51, snp: bool = False, user_msrs=(),
                 user_msr_reasons: int = X.KVM_MSR_EXIT_REASON_FILTER,
                 kernel_msrs: dict | None = None, vmsa_features: int = 0, vcpu_ids=(0,),
                 vcpu_id: int = 0):
        self.cpuid = cpuid
        self._read_guest = read_guest
        self._write_guest = write_guest
        # KVM_SEV_INIT2 with ghcb_version 0 means the default, 2 (__sev_guest_init)
        self.ghcb_version = ghcb_version or G.GHCB_VERSION_MAX
        self.c_bit = c_bit
        self.snp = snp
        self.user_msrs = frozenset(user_msrs)
        self.user_msr_reasons = user_msr_reasons
        self.kernel_msrs = kernel_msrs if kernel_msrs is not None else _kvm_policy.initial_kernel_msrs()
        self.vmsa_features = vmsa_features
        self.vcpu_ids = frozenset(vcpu_ids)
        self.vcpu_id = vcpu_id
        # per-vCPU / per-VM KVM state the handler keeps
        self.xcr0 = 1
        self.ap_jump_table = 0
        self.registered_ghcb_gpa: int | None = None  # SNP GHCB registration
        self.snp_ap_vmsa_gpa: dict = {}
        #: KVM's register cache (vcpu->arch.regs): all KVM knows of the guest's GPRs.
        #: Zeroed and refilled from the valid GHCB fields at each GHCB VMGEXIT.
        self.kvm_regs: dict = dict.fromkeys(GPRS, 0)
        self._mapped: _Mapped | None = None
        self._pending: _Pending | None = None
        self._pending_trace: VmgexitTrace | None = None
        self._pending_msr = 0

    # -- public API ----------------------------------------------------------------
    def reset_ghcb_msr(self) -> int:
        """The GHCB MSR value KVM loads at vCPU RESET (``sev_es_vcpu_reset``)."""
        return G.GhcbMsr.sev_info_response(self.ghcb_version, G.GHCB_VERSION_MIN, self.c_bit)

    def register_cache(self) -> dict:
        """What KVM's register cache holds now: the GPRs the guest exposed through the
        GHCB (RAX, RBX, RCX, RDX, RSI when marked valid), as updated by KVM's handling;
        every other GPR reads 0.  The simulator's KVM_GET_REGS for an SEV-ES vCPU
        should return these (the VMSA itself is encrypted)."""
        return dict(self.kvm_regs)

    @property
    def pending(self) -> bool:
        """True while a userspace exit awaits :meth:`complete`."""
        return self._pending is not None

    def vmgexit(self, ghcb_msr: int) -> VmgexitResult:
        """Handle one VMGEXIT (``sev_handle_vmgexit``) with this GHCB MSR value."""
        if self._pending is not None:
            raise SimulatorError("SevEsVmgexitHandler.vmgexit() called while a userspace exit "
                               "is still waiting for complete() (a simulator bug)")
        ghcb_msr &= MASK64
        if ghcb_msr & G.GHCB_MSR_INFO_MASK:
            return self._msr_protocol(ghcb_msr)
        trace = VmgexitTrace(ghcb_msr=ghcb_msr, protocol="none", ghcb_gpa=ghcb_msr)
        if not ghcb_msr:
            return self._resume(ghcb_msr, trace, "GHCB gpa is not set: resumed untouched")
        raw = self._read(ghcb_msr, PAGE_SIZE)
        if raw is None:
            return self._resume(ghcb_msr, trace,
                                f"error mapping GHCB {ghcb_msr:#x}: resumed untouched")
        return self._ghcb_protocol(ghcb_msr, bytearray(raw), trace)

    def complete(self, value: int | bytes | None = None, *, error: bool = False) -> VmgexitResult:
        """Finish a userspace exit the way KVM's ``complete_userspace_io`` callback does.

        ``value``: the data of an IoIn (bytes of size*count, or an int), MmioRead
        (bytes or int) or MsrRead (int); ``error``: refuse an MsrRead/MsrWrite
        (the guest gets #GP through the GHCB).
        """
        p, m, trace, msr = self._pending, self._mapped, self._pending_trace, self._pending_msr
        if p is None or m is None or trace is None:
            raise SimulatorError("SevEsVmgexitHandler.complete() called with no pending exit")
        self._pending = None
        self._pending_trace = None
        if p.kind == "pio_out":  # complete_fast_pio_out
            return self._unmap_resume(msr, trace, "port OUT completed")
        if p.kind == "pio_in":  # complete_fast_pio_in
            data = _as_bytes(value, p.size)
            rax = m.regs["rax"] if p.size < 4 else 0
            val = bytearray(rax.to_bytes(8, "little"))
            val[:min(p.size, 8)] = data[:min(p.size, 8)]
            m.regs["rax"] = int.from_bytes(val, "little")
            return self._unmap_resume(msr, trace, "port IN completed")
        if p.kind == "str_out":  # complete_sev_es_emulated_outs
            p.remaining -= p.chunk
            p.pos += p.chunk * p.size
            return self._string_io_next(msr, trace, p)
        if p.kind == "str_in":  # complete_sev_es_emulated_ins
            n = p.chunk * p.size
            self._scratch_write(m, p.pos, _as_bytes(value, n)[:n])
            p.remaining -= p.chunk
            p.pos += n
            return self._string_io_next(msr, trace, p)
        if p.kind == "mmio":  # complete_sev_es_emulated_mmio
            n = min(8, p.length)
            if not p.is_write:
                self._scratch_write(m, p.pos, _as_bytes(value, n)[:n])
            if p.length <= 8:
                return self._unmap_resume(msr, trace, "MMIO completed")
            p.pos += n
            p.gpa = (p.gpa + n) & MASK64
            p.length -= n
            return self._mmio_exit(msr, trace, p)
        if p.kind == "rdmsr":  # complete_fast_rdmsr -> svm_complete_emulated_msr
            if not error:
                v = int(value or 0) & MASK64
                m.regs["rax"] = v & 0xFFFFFFFF
                m.regs["rdx"] = v >> 32
            return self._msr_done(msr, trace, error)
        # "wrmsr": complete_fast_msr_access
        return self._msr_done(msr, trace, error)

    # -- memory -------------------------------------------------------------------------
    def _read(self, gpa: int, length: int) -> bytes | None:
        if gpa < 0 or gpa + length > MASK64 + 1:
            return None
        try:
            data = self._read_guest(gpa, length)
        except (HarnessError, ValueError, IndexError, KeyError, OverflowError):
            return None
        return bytes(data) if data is not None and len(data) == length else None

    def _write(self, gpa: int, data: bytes) -> bool:
        try:
            self._write_guest(gpa, bytes(data))
            return True
        except (HarnessError, ValueError, IndexError, KeyError, OverflowError):
            return False

    # -- MSR protocol (sev_handle_vmgexit_msr_protocol) --------------------------------
    def _msr_protocol(self, msr: int) -> VmgexitResult:
        req = G.GhcbMsr.decode(msr)
        trace = VmgexitTrace(ghcb_msr=msr, protocol="msr", msr_request=req.name)
        info = msr & G.GHCB_MSR_INFO_MASK

        def done(new: int, detail: str) -> VmgexitResult:
            trace.msr_response = new
            return self._resume(new, trace, detail)

        if info == 0x002:  # GHCB_MSR_SEV_INFO_REQ
            return done(G.GhcbMsr.sev_info_response(self.ghcb_version, G.GHCB_VERSION_MIN,
                                                    self.c_bit), "SEV information")
        if info == 0x004:  # GHCB_MSR_CPUID_REQ: RAX = fn, RCX = 0, then the CPUID intercept
            fn = msr >> 32
            regs = self._cpuid(fn, 0)
            self.kvm_regs.update(rax=regs[0], rbx=regs[1], rcx=regs[2], rdx=regs[3])
            reg = (msr >> 30) & 3
            value = regs[reg]
            new = (msr & ~(0xFFFFFFFF << 32)) | (value << 32)
            new = (new & ~G.GHCB_MSR_INFO_MASK) | 0x005
            return done(new & MASK64, f"CPUID {fn:#x} {G.CPUID_REGS[reg]} = {value:#x}")
        if info == 0x006:  # GHCB_MSR_AP_RESET_HOLD_REQ -> kvm_emulate_ap_reset_hold
            new = G.GhcbMsr.ap_reset_hold_response(0)  # result preset to "no SIPI"
            trace.msr_response = new
            trace.outcome = EXIT
            trace.detail = "AP reset hold: KVM_EXIT_AP_RESET_HOLD (no in-kernel LAPIC)"
            return VmgexitResult(EXIT, new, trace, exit=X.Unsupported(KVM_EXIT_AP_RESET_HOLD))
        if info == 0x080:  # GHCB_MSR_HV_FT_REQ
            return done(G.GhcbMsr.hv_features_response(G.GHCB_HV_FT_SUPPORTED),
                        "hypervisor features")
        if info == 0x010:  # GHCB_MSR_PREF_GPA_REQ
            if not self.snp:
                return self._terminate(msr, trace, "preferred-GPA request from a non-SNP guest")
            return done(G.GhcbMsr.pref_gpa_response(), "preferred GHCB GPA: none")
        if info == 0x012:  # GHCB_MSR_REG_GPA_REQ
            if not self.snp:
                return self._terminate(msr, trace, "GHCB GPA registration from a non-SNP guest")
            gfn = (msr >> 12) & ((1 << 52) - 1)
            self.registered_ghcb_gpa = (gfn << 12) & MASK64
            return done(G.GhcbMsr.reg_gpa_response(gfn), f"GHCB GPA {gfn << 12:#x} registered")
        if info == 0x014:  # GHCB_MSR_PSC_REQ
            if not self.snp:
                return self._terminate(msr, trace, "page state change from a non-SNP guest")
            # snp_begin_psc_msr: KVM_HC_MAP_GPA_RANGE user exits are off in the harness
            return done(G.GHCB_MSR_PSC_RESP_ERROR, "page state change: generic error")
        if info == 0x100:  # GHCB_MSR_TERM_REQ
            rs, rc = (msr >> 12) & 0xF, (msr >> 16) & 0xFF
            return self._terminate(msr, trace, f"guest requested termination: set {rs}, code {rc}")
        return done(msr, f"unknown MSR protocol request {info:#x}: MSR unchanged")

    def _terminate(self, msr: int, trace: VmgexitTrace, detail: str) -> VmgexitResult:
        trace.outcome = EXIT
        trace.detail = detail
        return VmgexitResult(EXIT, msr, trace, exit=X.SevTermination(msr))

    def _resume(self, msr: int, trace: VmgexitTrace, detail: str, inject=None) -> VmgexitResult:
        trace.outcome = RESUME
        trace.detail = detail
        return VmgexitResult(RESUME, msr, trace, inject=inject)

    # -- CPUID (kvm_cpuid) ---------------------------------------------------------------
    def _cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        e = self.cpuid.lookup(function & 0xFFFFFFFF, index & 0xFFFFFFFF)
        if e is None:
            return (0, 0, 0, 0)
        return (e.eax & 0xFFFFFFFF, e.ebx & 0xFFFFFFFF, e.ecx & 0xFFFFFFFF, e.edx & 0xFFFFFFFF)

    # -- the GHCB page protocol ----------------------------------------------------------
    def _ghcb_protocol(self, gpa: int, raw: bytearray, trace: VmgexitTrace) -> VmgexitResult:
        page = G.Ghcb(raw)
        bitmap = int.from_bytes(page.valid_bitmap, "little")

        def valid(name: str) -> bool:
            return bool(bitmap >> G.valid_bit(name) & 1)

        # sev_es_sync_from_ghcb
        regs = self.kvm_regs = dict.fromkeys(GPRS, 0)  # memset(vcpu->arch.regs, 0)
        for r in ("rax", "rbx", "rcx", "rdx", "rsi"):
            if valid(r):
                regs[r] = page.get(r)
        cpl = page.get("cpl") if valid("cpl") else 0
        if valid("xcr0"):
            self.xcr0 = page.get("xcr0")
        exit_code = page.get("sw_exit_code")
        info1 = page.get("sw_exit_info_1")
        info2 = page.get("sw_exit_info_2")
        scratch = page.get("sw_scratch") if valid("sw_scratch") else 0
        page.clear_valid()
        m = _Mapped(gpa=gpa, page=page, regs=regs, scratch_gpa=scratch)
        self._mapped = m
        trace.protocol = "ghcb"
        trace.sw_exit_code = exit_code
        trace.sw_exit_name = G.sw_exit_code_name(exit_code)
        trace.exit_info_1, trace.exit_info_2, trace.sw_scratch = info1, info2, scratch
        trace.valid = G.bitmap_fields(bitmap)
        trace.ghcb_usage = page.get("ghcb_usage")
        trace.protocol_version = page.get("protocol_version")

        if self.snp and self.registered_ghcb_gpa != gpa:
            return self._error(gpa, trace, _errno.EINVAL, f"GHCB GPA {gpa:#x} is not registered")

        # sev_es_validate_vmgexit
        reason = self._validate(page, exit_code, info1, regs, valid)
        if reason:
            self._set_response(G.GHCB_HV_RESP_MALFORMED_INPUT, reason)
            return self._unmap_resume(gpa, trace, f"malformed input: {G.GHCB_ERR_NAMES[reason]}")
        self._set_response(G.GHCB_HV_RESP_NO_ACTION, 0)  # svm_vmgexit_success(svm, 0)
        return self._dispatch(gpa, trace, exit_code, info1, info2, cpl)

    def _validate(self, page: G.Ghcb, exit_code: int, info1: int, regs: dict, valid) -> int:
        """``sev_es_validate_vmgexit``: 0 or the GHCB_ERR_* reason."""
        if page.get("ghcb_usage"):
            return G.GHCB_ERR_INVALID_USAGE
        missing = G.GHCB_ERR_MISSING_INPUT
        if not (valid("sw_exit_code") and valid("sw_exit_info_1") and valid("sw_exit_info_2")):
            return missing
        c = exit_code
        if c in (G.SVM_EXIT_READ_DR7, G.SVM_EXIT_RDTSC, G.SVM_EXIT_INVD, G.SVM_EXIT_RDTSCP,
                 G.SVM_EXIT_WBINVD, G.SVM_VMGEXIT_NMI_COMPLETE, G.SVM_VMGEXIT_AP_HLT_LOOP,
                 G.SVM_VMGEXIT_AP_JUMP_TABLE, G.SVM_VMGEXIT_UNSUPPORTED_EVENT,
                 G.SVM_VMGEXIT_HV_FEATURES, G.SVM_VMGEXIT_TERM_REQUEST):
            return 0
        if c == G.SVM_EXIT_WRITE_DR7:
            return 0 if valid("rax") else missing
        if c == G.SVM_EXIT_RDPMC:
            return 0 if valid("rcx") else missing
        if c == G.SVM_EXIT_CPUID:
            if not (valid("rax") and valid("rcx")):
                return missing
            if regs["rax"] == 0xD and not valid("xcr0"):
                return missing
            return 0
        if c == G.SVM_EXIT_IOIO:
            if info1 & G.SVM_IOIO_STR_MASK:
                return 0 if valid("sw_scratch") else missing
            if not info1 & G.SVM_IOIO_TYPE_MASK and not valid("rax"):
                return missing
            return 0
        if c == G.SVM_EXIT_MSR:
            if not valid("rcx"):
                return missing
            if info1 and not (valid("rax") and valid("rdx")):
                return missing
            return 0
        if c == G.SVM_EXIT_VMMCALL:
            return 0 if valid("rax") and valid("cpl") else missing
        if c == G.SVM_EXIT_MONITOR:
            return 0 if valid("rax") and valid("rcx") and valid("rdx") else missing
        if c == G.SVM_EXIT_MWAIT:
            return 0 if valid("rax") and valid("rcx") else missing
        if c in (G.SVM_VMGEXIT_MMIO_READ, G.SVM_VMGEXIT_MMIO_WRITE):
            return 0 if valid("sw_scratch") else missing
        if c == G.SVM_VMGEXIT_AP_CREATION:
            if not self.snp:
                return missing
            if (info1 & 0xFFFFFFFF) != G.SVM_VMGEXIT_AP_DESTROY and not valid("rax"):
                return missing
            return 0
        if c == G.SVM_VMGEXIT_PSC:
            return 0 if self.snp and valid("sw_scratch") else missing
        if c in (G.SVM_VMGEXIT_GUEST_REQUEST, G.SVM_VMGEXIT_EXT_GUEST_REQUEST):
            info2 = page.get("sw_exit_info_2")
            if (not self.snp or info1 & 0xFFF or info2 & 0xFFF or info1 == info2):
                return missing
            return 0
        return G.GHCB_ERR_INVALID_EVENT

    def _set_response(self, info1: int, info2: int) -> None:
        """``svm_vmgexit_set_return_code``: SW_EXIT_INFO_1/2, marked valid."""
        page = self._mapped.page
        page.set("sw_exit_info_1", info1)
        page.set("sw_exit_info_2", info2)

    def _dispatch(self, gpa, trace, code, info1, info2, cpl) -> VmgexitResult:
        m = self._mapped
        if code == G.SVM_VMGEXIT_MMIO_READ or code == G.SVM_VMGEXIT_MMIO_WRITE:
            is_write = code == G.SVM_VMGEXIT_MMIO_WRITE
            r = self._setup_scratch(gpa, trace, sync=not is_write, length=info2)
            if r is not None:
                return r
            length = info2 & 0xFFFFFFFF  # kvm_sev_es_mmio_*() takes unsigned int bytes
            if length == 0:
                return self._unmap_resume(gpa, trace, "MMIO of 0 bytes: nothing to do")
            p = _Pending("mmio", gpa=info1, length=length, is_write=is_write, pos=0)
            return self._mmio_exit(gpa, trace, p)
        if code == G.SVM_VMGEXIT_NMI_COMPLETE:
            return self._unmap_resume(gpa, trace, "NMI complete")
        if code == G.SVM_VMGEXIT_AP_HLT_LOOP:
            self._flush(m)
            trace.outcome, trace.detail = EXIT, "AP HLT loop: KVM_EXIT_AP_RESET_HOLD"
            trace.response = self._response()
            self._mapped = None
            return VmgexitResult(EXIT, gpa, trace, exit=X.Unsupported(KVM_EXIT_AP_RESET_HOLD))
        if code == G.SVM_VMGEXIT_AP_JUMP_TABLE:
            if info1 == 0:
                self.ap_jump_table = info2
                return self._unmap_resume(gpa, trace, f"AP jump table set to {info2:#x}")
            if info1 == 1:
                self._set_response(G.GHCB_HV_RESP_NO_ACTION, self.ap_jump_table)
                return self._unmap_resume(gpa, trace, "AP jump table read")
            self._set_response(G.GHCB_HV_RESP_MALFORMED_INPUT, G.GHCB_ERR_INVALID_INPUT)
            return self._unmap_resume(gpa, trace, "unsupported AP jump table request")
        if code == G.SVM_VMGEXIT_HV_FEATURES:
            self._set_response(G.GHCB_HV_RESP_NO_ACTION, G.GHCB_HV_FT_SUPPORTED)
            return self._unmap_resume(gpa, trace, "hypervisor features")
        if code == G.SVM_VMGEXIT_TERM_REQUEST:
            self._flush(m)
            trace.response = self._response()
            self._mapped = None
            # data[0] is control->ghcb_gpa: the GHCB's GPA, not a reason code
            return self._terminate(gpa, trace, f"termination request: reason {info1:#x}, "
                                               f"info {info2:#x}")
        if code == G.SVM_VMGEXIT_PSC:
            r = self._setup_scratch(gpa, trace, sync=True, length=info2)
            if r is not None:
                return r
            self._set_response(G.GHCB_HV_RESP_NO_ACTION, VMGEXIT_PSC_ERROR_GENERIC)
            return self._unmap_resume(gpa, trace, "page state change: generic error "
                                                  "(KVM_HC_MAP_GPA_RANGE exits are off)")
        if code == G.SVM_VMGEXIT_AP_CREATION:
            if not self._ap_creation(info1, info2, m.regs["rax"]):
                self._set_response(G.GHCB_HV_RESP_MALFORMED_INPUT, G.GHCB_ERR_INVALID_INPUT)
                return self._unmap_resume(gpa, trace, "AP creation refused")
            return self._unmap_resume(gpa, trace, "AP creation accepted")
        if code in (G.SVM_VMGEXIT_GUEST_REQUEST, G.SVM_VMGEXIT_EXT_GUEST_REQUEST):
            return self._error(gpa, trace, _errno.EIO, "SNP guest request: no SNP firmware in "
                                                       "this model")
        if code == G.SVM_VMGEXIT_UNSUPPORTED_EVENT:
            return self._error(gpa, trace, _errno.EINVAL,
                               f"unsupported event: info1 {info1:#x}, info2 {info2:#x}")
        return self._svm_exit(gpa, trace, code, info1, info2, cpl)

    def _ap_creation(self, info1: int, info2: int, rax: int) -> bool:
        """``sev_snp_ap_creation``: True when KVM accepts the request."""
        request, apic_id = info1 & 0xFFFFFFFF, info1 >> 32
        if apic_id not in self.vcpu_ids:
            return False
        if request in (G.SVM_VMGEXIT_AP_CREATE_ON_INIT, G.SVM_VMGEXIT_AP_CREATE):
            if rax != self.vmsa_features or info2 & 0xFFF or self._read(info2, 1) is None:
                return False
            if info2 % (2 << 20) == 0:  # the 2 MiB-aligned VMSA erratum
                return False
            self.snp_ap_vmsa_gpa[apic_id] = info2
            return True
        if request == G.SVM_VMGEXIT_AP_DESTROY:
            self.snp_ap_vmsa_gpa.pop(apic_id, None)
            return True
        return False

    # -- svm_invoke_exit_handler for the NAE exit codes ------------------------------
    def _svm_exit(self, gpa, trace, code, info1, info2, cpl) -> VmgexitResult:
        m = self._mapped
        regs = m.regs
        if code in (G.SVM_EXIT_READ_DR7, G.SVM_EXIT_WRITE_DR7):
            return self._unmap_resume(gpa, trace, "DR7 access: no-op for SEV-ES (dr_interception)")
        if code == G.SVM_EXIT_RDTSC:
            self._flush(m)
            trace.response = self._response()
            self._mapped = None
            trace.outcome = EXIT
            trace.detail = "RDTSC has no SVM exit handler: internal error (unexpected exit reason)"
            return VmgexitResult(EXIT, gpa, trace, exit=X.InternalError(
                KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, (code, 0)))
        if code == G.SVM_EXIT_RDPMC:
            return self._unmap_resume(gpa, trace, "RDPMC: no counters, #GP", inject=(GP_VECTOR, 0))
        if code == G.SVM_EXIT_CPUID:
            eax, ebx, ecx, edx = self._cpuid(regs["rax"], regs["rcx"])
            regs.update(rax=eax, rbx=ebx, rcx=ecx, rdx=edx)
            return self._unmap_resume(gpa, trace, "CPUID answered from the CPUID table")
        if code in (G.SVM_EXIT_INVD, G.SVM_EXIT_WBINVD, G.SVM_EXIT_MONITOR, G.SVM_EXIT_MWAIT):
            return self._unmap_resume(gpa, trace, f"{G.sw_exit_code_name(code)}: no-op")
        if code == G.SVM_EXIT_RDTSCP:
            return self._unmap_resume(gpa, trace, "RDTSCP: kvm_handle_invalid_op, #UD",
                                      inject=(UD_VECTOR, None))
        if code == G.SVM_EXIT_VMMCALL:
            nr = regs["rax"]
            regs["rax"] = _kvm_policy.hypercall_result(nr, cpl)  # the one model, sim/kvmpolicy.py
            return self._unmap_resume(gpa, trace, f"hypercall {nr:#x} -> {regs['rax']:#x}")
        if code == G.SVM_EXIT_IOIO:
            return self._ioio(gpa, trace, info1, info2)
        if code == G.SVM_EXIT_MSR:
            return self._msr(gpa, trace, info1)
        # unreachable: validation only lets the codes above through
        return self._error(gpa, trace, _errno.EINVAL, f"no handler for {code:#x}")

    # -- IOIO (io_interception, kvm_fast_pio, sev_es_string_io) ---------------------------
    def _ioio(self, gpa, trace, info1, info2) -> VmgexitResult:
        io = G.decode_ioio(info1)
        m = self._mapped
        if io.string:
            if info2 > INT_MAX:
                return self._error(gpa, trace, _errno.EINVAL, "string IO count exceeds INT_MAX")
            count, size = info2, io.size
            if count * size > INT_MAX:
                return self._error(gpa, trace, _errno.EINVAL, "string IO byte count overflows")
            r = self._setup_scratch(gpa, trace, sync=io.is_in, length=count * size)
            if r is not None:
                return r
            if size == 0:  # kvm_sev_es_outs/ins divide PAGE_SIZE by it before looking at count
                return self._error(gpa, trace, _errno.EINVAL,
                                   "string IO with operand size 0 (the kernel would divide by 0)")
            p = _Pending("str_in" if io.is_in else "str_out", size=size, port=io.port,
                         remaining=count)
            return self._string_io_next(gpa, trace, p)
        # kvm_fast_pio: a single element, data in RAX
        if io.is_in:
            p = _Pending("pio_in", size=io.size, port=io.port)
            return self._user_exit(gpa, trace, p, X.IoIn(io.port, io.size, 1),
                                   f"IN from port {io.port:#x}")
        data = m.regs["rax"].to_bytes(8, "little")[:io.size]
        p = _Pending("pio_out", size=io.size, port=io.port)
        return self._user_exit(gpa, trace, p, X.IoOut(io.port, io.size, 1, data),
                               f"OUT to port {io.port:#x}")

    def _string_io_next(self, gpa, trace, p: _Pending) -> VmgexitResult:
        """One more round of ``kvm_sev_es_outs/ins``: the next chunk, or resume when done."""
        if p.remaining == 0:
            return self._unmap_resume(gpa, trace, "string IO completed")
        p.chunk = min(PAGE_SIZE // p.size, p.remaining)
        n = p.chunk * p.size
        if p.kind == "str_out":
            data = self._scratch_read(self._mapped, p.pos, n)
            return self._user_exit(gpa, trace, p, X.IoOut(p.port, p.size, p.chunk, data),
                                   f"string OUT to port {p.port:#x}")
        return self._user_exit(gpa, trace, p, X.IoIn(p.port, p.size, p.chunk),
                               f"string IN from port {p.port:#x}")

    # -- MMIO (kvm_sev_es_mmio_read/write, complete_sev_es_emulated_mmio) ------------
    def _mmio_exit(self, gpa, trace, p: _Pending) -> VmgexitResult:
        n = min(8, p.length)
        if p.is_write:
            data = self._scratch_read(self._mapped, p.pos, n)
            e = X.MmioWrite(p.gpa, n, data)
        else:
            e = X.MmioRead(p.gpa, n)
        return self._user_exit(gpa, trace, p, e, f"MMIO {'write' if p.is_write else 'read'} "
                                                 f"at {p.gpa:#x}")

    # -- MSR (kvm_emulate_rdmsr / kvm_emulate_wrmsr) --------------------------------------
    def _msr(self, gpa, trace, info1) -> VmgexitResult:
        regs = self._mapped.regs
        index = regs["rcx"] & 0xFFFFFFFF
        write = bool(info1)
        value = (regs["rax"] & 0xFFFFFFFF) | ((regs["rdx"] & 0xFFFFFFFF) << 32)
        if index in self.user_msrs:
            reason = X.KVM_MSR_EXIT_REASON_FILTER
        elif index in self.kernel_msrs:
            if write:
                self.kernel_msrs[index] = value
            else:
                v = self.kernel_msrs[index] & MASK64
                regs["rax"], regs["rdx"] = v & 0xFFFFFFFF, v >> 32
            return self._msr_done(gpa, trace, False)
        else:
            reason = X.KVM_MSR_EXIT_REASON_UNKNOWN
        if not self.user_msr_reasons & reason:
            return self._msr_done(gpa, trace, True)
        if write:
            p = _Pending("wrmsr")
            return self._user_exit(gpa, trace, p, X.MsrWrite(index, value, reason),
                                   f"WRMSR {index:#x} to userspace")
        p = _Pending("rdmsr")
        return self._user_exit(gpa, trace, p, X.MsrRead(index, reason),
                               f"RDMSR {index:#x} to userspace")

    def _msr_done(self, gpa, trace, error: bool) -> VmgexitResult:
        """``svm_complete_emulated_msr``: an error becomes the GHCB's #GP response."""
        if error:
            self._set_response(G.GHCB_HV_RESP_ISSUE_EXCEPTION,
                               G.SVM_EVTINJ_VALID | G.SVM_EVTINJ_TYPE_EXEPT | GP_VECTOR)
            return self._unmap_resume(gpa, trace, "MSR access refused: #GP through the GHCB")
        return self._unmap_resume(gpa, trace, "MSR access completed")

    # -- scratch area (setup_vmgexit_scratch) ---------------------------------------------
    def _setup_scratch(self, gpa, trace, *, sync: bool, length: int) -> VmgexitResult | None:
        """None on success; otherwise the result KVM returns (bad input or -EFAULT)."""
        m = self._mapped
        beg = m.scratch_gpa
        if not beg:
            return self._bad_scratch(gpa, trace, "scratch GPA not provided")
        end = beg + length
        if end > MASK64:
            return self._bad_scratch(gpa, trace, "scratch length wraps around")
        if beg & PAGE_MASK == gpa:
            if beg < gpa + G.SHARED_BUFFER_OFFSET or end > gpa + G.SHARED_BUFFER_END:
                return self._bad_scratch(gpa, trace, "scratch area is outside the GHCB shared "
                                                     "buffer")
            m.sa_in_ghcb, m.sa_off, m.sa_len = True, beg - gpa, length
            return None
        if length > GHCB_SCRATCH_AREA_LIMIT:
            return self._bad_scratch(gpa, trace, "scratch area exceeds KVM's 16-page limit")
        data = self._read(beg, length) if length else b""
        if data is None:
            return self._error(gpa, trace, _errno.EFAULT, "scratch area is not readable")
        m.sa_in_ghcb, m.sa_buf, m.sa_len, m.sa_sync = False, bytearray(data), length, sync
        return None

    def _bad_scratch(self, gpa, trace, why: str) -> VmgexitResult:
        self._set_response(G.GHCB_HV_RESP_MALFORMED_INPUT, G.GHCB_ERR_INVALID_SCRATCH_AREA)
        return self._unmap_resume(gpa, trace, f"invalid scratch area: {why}")

    def _scratch_read(self, m: _Mapped, pos: int, n: int) -> bytes:
        if m.sa_in_ghcb:
            return bytes(m.page.buf[m.sa_off + pos:m.sa_off + pos + n])
        return bytes(m.sa_buf[pos:pos + n])

    def _scratch_write(self, m: _Mapped, pos: int, data: bytes) -> None:
        if m.sa_in_ghcb:
            m.page.buf[m.sa_off + pos:m.sa_off + pos + len(data)] = data
        else:
            m.sa_buf[pos:pos + len(data)] = data

    # -- leaving the handler -------------------------------------------------------------
    def _user_exit(self, gpa, trace, p: _Pending, e: X.Exit, detail: str) -> VmgexitResult:
        self._flush(self._mapped)
        self._pending, self._pending_trace, self._pending_msr = p, trace, gpa
        trace.outcome, trace.detail = EXIT, detail
        return VmgexitResult(EXIT, gpa, trace, exit=e, needs_completion=True)

    def _response(self) -> tuple:
        page = self._mapped.page
        return (page.get("sw_exit_info_1"), page.get("sw_exit_info_2"))

    def _flush(self, m: _Mapped) -> None:
        """Make the guest-visible GHCB page match KVM's mapping (it writes it in place)."""
        self._write(m.gpa, bytes(m.page.buf))

    def _unmap(self) -> None:
        """``sev_es_unmap_ghcb``: sync an outside scratch buffer back, write RAX-RDX back."""
        m = self._mapped
        if m is None:
            return
        if not m.sa_in_ghcb and m.sa_sync and m.sa_buf is not None:
            self._write(m.scratch_gpa, bytes(m.sa_buf))
        for r in ("rax", "rbx", "rcx", "rdx"):  # sev_es_sync_to_ghcb: set + valid bit
            m.page.set(r, m.regs[r])
        self._flush(m)
        self._mapped = None

    def _unmap_resume(self, gpa, trace, detail: str, inject=None) -> VmgexitResult:
        trace.response = self._response()
        self._unmap()
        return self._resume(gpa, trace, detail, inject=inject)

    def _error(self, gpa, trace, err: int, detail: str) -> VmgexitResult:
        """KVM_RUN fails with -err.  The GHCB is synced as KVM would at a later VMRUN."""
        if self._mapped is not None:
            trace.response = self._response()
            self._unmap()
        trace.outcome = ERROR
        trace.detail = f"KVM_RUN fails with {_errno.errorcode.get(err, err)}: {detail}"
        return VmgexitResult(ERROR, gpa, trace, errno=err)


def _as_bytes(value, n: int) -> bytes:
    if value is None:
        return bytes(n)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).ljust(n, b"\0")
    return (int(value) & ((1 << (8 * max(n, 1))) - 1)).to_bytes(max(n, 1), "little")[:n].ljust(n, b"\0")


__all__ = [
    "ERROR",
    "EXIT",
    "KVM_EXIT_AP_RESET_HOLD",
    "NAE_EXIT_CODES",
    "RESUME",
    "X86_TRAP_VC",
    "SevEsVmgexitHandler",
    "VmgexitResult",
    "VmgexitTrace",
    "vc_error_code",
]

