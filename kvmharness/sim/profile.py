"""Which KVM the simulator models: upstream ``kvm_amd`` (the default) or this project's host KVM.

The project's hosts run ``kvm_pvm``, which differs from upstream kvm_amd in these
userspace-visible ways (kvm_amd measured on the SVM rig); a :class:`KvmProfile`
selects each of them, in this one place:

=====================  ======================================  =========================
behaviour              kvm_amd (upstream, default)             kvm_pvm (these hosts)
=====================  ======================================  =========================
RIP at an OUT exit     AT the OUT: x86.c kvm_fast_pio's        already past the OUT
                       complete_fast_pio_out skips it on
                       the next KVM_RUN (dropped if userspace
                       moved RIP meanwhile)
RIP at an IN exit      AT the IN (complete_fast_pio_in)        AT the IN as well (measured
                                                               by kvmharness fuzz on a
                                                               kvm_pvm host, 2026-12-01:
                                                               `in %dx,%ax` at 0x80ae gave
                                                               RIP 0x80ae at the IoIn exit,
                                                               0x80b0 at the next exit)
VMMCALL, FIX_HYPER-    KVM's hypercall (kvm_emulate_hyper-     #UD
CALL_INSN disabled     call): RIP past it, RAX = the result
``int n`` / ``int3``   delivered through the guest's IDT       emulation failure
/ ``int1`` at CPL0     (not intercepted)                       (KVM_EXIT_INTERNAL_ERROR)
                                                               in protected/long mode; in
                                                               real mode delivered through
                                                               the IVT (emulate_int)
real-mode IVT limit    checked by the CPU (#GP, #DF,           not checked (__emulate_int_
                       shutdown)                               real reads the entry anyway)
=====================  ======================================  =========================

``SimSystem(profile=...)`` takes a name or a :class:`KvmProfile`; without one the
environment variable ``KVMHARNESS_SIM_PROFILE`` decides, else ``kvm_amd``.

A third profile, ``kvm_amd@qemu-tcg``, is kvm_amd on the CPU of the SVM rig in a box
(QEMU TCG's emulated EPYC): what L1 sees of nested SVM there differs from AMD silicon in
two declared ways (``ioio_addr_size_bits``, ``host_nrips``), each with its source line and
measurement below.  Only the rig pair of ``kvmharness fuzz`` uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import UsageError

PROFILE_ENV = "KVMHARNESS_SIM_PROFILE"
DEFAULT_PROFILE = "kvm_amd"


@dataclass(frozen=True)
class KvmProfile:
    name: str
    io_rip_past: bool      # KVM_GET_REGS during an OUT exit shows RIP past the OUT
    vmmcall_ud: bool       # VMMCALL (quirk disabled) raises #UD instead of being a hypercall
    soft_int_fails: bool   # int n / int3 / int1 are emulation failures instead of IDT deliveries

    in_rip_past: bool = False  # ... and during an IN exit past the IN (no KVM measured does)
    # Guest CPL0 code is emulated instruction by instruction (docs/facts.md#kvm-pvm-cpl0), so every WRMSR goes
    # through kvm_set_msr, the pass-through MSRs (FS/GS/KERNEL_GS base, LSTAR, CSTAR) too:
    # a non-canonical value is refused with the INVAL reason (measured by kvmharness fuzz:
    # WRMSR LSTAR/GS_BASE 0x7f9a88002a94a441-like values gave KVM_EXIT_X86_WRMSR reason 1),
    # where kvm_amd lets the CPU execute them (svm.c direct_access_msrs: #GP from the CPU).
    emulates_passthrough_msrs: bool = False
    # kvm_set_msr_common checks PAT (x86.h kvm_pat_valid) on kvm_amd; kvm_pvm accepted
    # PAT values with a reserved memory type 2 (measured by kvmharness fuzz: WRMSR 0x277
    # 0x0606040006010206 and 0x0000070001050206 completed with no exit and no #GP).
    pat_checked: bool = True
    # CPUID registers the module sets itself whatever KVM_SET_CPUID2 says, as
    # (function, index, register): not modelled (their values are the host CPU's), declared.
    cpuid_unhonoured: frozenset = frozenset()
    # KVM_EXIT_INTERNAL_ERROR (emulation failure): the (exit reason, info1, info2, intr info,
    # error code) KVM appends (None: the last #VMEXIT's, as kvm_amd's svm_get_exit_info does)
    fetch_failure_exit_info: tuple | None = None
    # Real mode: an interrupt or exception whose IVT entry lies beyond the IDTR limit is a
    # #GP (then #DF, then shutdown) on the CPU, which delivers events to a kvm_amd guest
    # (EVENTINJ).  kvm_pvm emulates real mode and delivers every event with KVM's emulator,
    # emulate.c __emulate_int_real ("TODO: Add limit checks"): the IVT entry is read
    # whatever the limit (measured by kvmharness fuzz, real mode, 2026-12-01: after
    # `lidt` of a zero limit, ud2 ran the IVT's vector-6 handler on kvm_pvm).
    real_ivt_limit_checked: bool = True
    # OUTS (string OUT) exits come from KVM's emulator (svm.c io_interception hands string IO
    # to kvm_emulate_instruction): x86_emulate_instruction writes RIP back before returning
    # to userspace: a lone OUTS complete (RIP past it, RF clear); a REP OUTS on the
    # instruction with RF set at every element, the last one's too.  Measured on the rig's
    # kvm_amd by kvmharness fuzz --pair rig,sim (2026-12-01: `outsl` at 0x805e showed RIP
    # 0x8060 at its IoOut; `rep outsw` RIP on it, RF 1, at all 6).  kvm_pvm: RIP past every
    # OUT (io_rip_past), RF at REP OUTS exits (sim/kvmlayer.py _string_rf).
    outs_rip_from_emulator: bool = False
    # IA32_MISC_ENABLE after vCPU reset: kvm_vcpu_reset sets PEBS_UNAVAIL | BTS_UNAVAIL
    # (0x1800; read back on the rig's kvm_amd by kvmharness fuzz); kvm_pvm gives fast strings
    # (0x1, read back on a kvm_pvm host by the same long-mode fuzz seeds).
    misc_enable_reset: int = 0x1800
    # CPUID 0xD.0 EBX is the XSAVE area size for the guest's current XCR0 (cpuid.c
    # kvm_update_cpuid_runtime: xstate_required_size(vcpu->arch.xcr0, false)), not the table's:
    # measured on the rig's kvm_amd (table 0x340, guest with XCR0 = 1 read 0x240).
    xsave_size_follows_xcr0: bool = True
    # KVM_EXIT_SHUTDOWN after a triple fault: svm.c shutdown_interception re-INITs the vCPU
    # (kvm_vcpu_reset(vcpu, true)) before returning, so KVM_GET_REGS then shows the INIT
    # state: GPRs 0 but RDX = CPUID.1.EAX, RIP 0xfff0, RFLAGS 2 (measured on the rig's
    # kvm_amd by kvmharness fuzz); kvm_pvm leaves the registers of the fault.
    shutdown_inits_vcpu: bool = True

    # The CPU under KVM, for what L1 sees of nested SVM (sim/nested.py): "amd" (AMD silicon as
    # the APM describes it) or "qemu-tcg" (QEMU's emulated SVM: the SVM rig in a box,
    # ci/rig/, runs kvm_amd on `-accel tcg -cpu EPYC,+svm`).  Two fields follow from it:
    cpu: str = "amd"
    # IOIO #VMEXIT EXITINFO1 carries the address size (A16/A32/A64, bits 7-9; APM vol 2
    # 15.10.2).  kvm_amd does not build it for a hardware exit: nested.c nested_svm_vmexit
    # copies vmcb02's exit_info_1 into vmcb12 as the CPU wrote it (svm.c svm_check_intercept
    # builds it with the address size, `ad_bytes << (SVM_IOIO_ASIZE_SHIFT - 1)`, only for an
    # instruction KVM's emulator runs).  QEMU TCG never sets those bits: target/i386/tcg/
    # translate.c gen_check_io passes TYPE/STR/REP/SIZE only, and sysemu/svm_helper.c
    # helper_svm_check_io exits with `param | (port << 16)` (QEMU 7.2, as the rig runs).
    # Measured by kvmharness fuzz --mode nested --pair rig,sim: `out %al, $0x7a` in 64-bit
    # L2 gave 0x7a0010 on the rig, 16 of 100 seeds.
    ioio_addr_size_bits: bool = True
    # The host CPU offers NRIPS (kvm_amd's `nrips` parameter follows it).  Without it kvm_amd
    # loses an EVENTINJ of vmcb12 that it counts as soft -- a software interrupt (type 4) or
    # #BP/#OF as an exception (type 3, vector 3 or 4; nested.c is_evtinj_soft): when the
    # CPU's delivery of the event exits to KVM (on the rig always: L2's first VMRUN walks its
    # page tables through a fresh NPT root, an #NPF with EXITINTINFO = the event), svm.c
    # svm_complete_interrupts requeues it and svm_inject_exception re-injects it through
    # svm_update_soft_interrupt_rip, which without NRIPS must skip the instruction at L2's RIP
    # by emulation and drops the event when that does not work ("Drop the exception/interrupt
    # if emulation fails and effectively retry the instruction").  Traced on the rig's 6.1
    # kvm_amd (nrips=0; tracefs events kvm, EVENTINJ 0x80000303, L2 = nop; hlt):
    #   kvm_nested_vmenter event_inj 0x80000303 -> kvm_exit npf rip 0x807d info2 0x1000
    #   intr_info 0x80000303 -> kvm_inj_exception #BP [reinjected] -> kvm_emulate_insn 807d:90
    #   -> kvm_entry rip 0x807d, and no later exit carries the event; L2's HLT exits at 0x807e.
    # Measured by kvmharness fuzz on the rig: types 3/vector 3, 3/4, 4/3, 4/4 and 4/0x21 never
    # reach L2, 3/1 and 3/6 are delivered.  With NRIPS KVM re-injects with next_rip and skips
    # nothing, so on AMD silicon the events reach L2 (APM 15.20).  The model drops every soft
    # EVENTINJ when this is False (the rig's case: every first delivery exits).
    host_nrips: bool = True

    def __str__(self) -> str:
        return self.name


KVM_AMD = KvmProfile("kvm_amd", io_rip_past=False, vmmcall_ud=False, soft_int_fails=False,
                     outs_rip_from_emulator=True)
KVM_PVM = KvmProfile(
    "kvm_pvm", io_rip_past=True, vmmcall_ud=True, soft_int_fails=True,
    emulates_passthrough_msrs=True, pat_checked=False,
    # measured on kvm_pvm hosts: leaf 1 ECX/EDX and 7.0 EBX/ECX/EDX (docs/facts.md#kvm-pvm-cpuid); by kvmharness
    # fuzz (2026-12-01, the host's supported table set, the guest read back something else):
    # 7.1 EAX, 0xD.0 EBX (it follows XCR0, docs/facts.md#kvm-pvm-cpuid), 0xD.1 EAX and EBX; the report
    # from another kvm_pvm host adds 7.0 EAX and 0xD.0 EAX/ECX.
    cpuid_unhonoured=frozenset({(0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "eax"), (0x7, 0, "ebx"),
                                (0x7, 0, "ecx"), (0x7, 0, "edx"), (0x7, 1, "eax"), (0xD, 0, "eax"),
                                (0xD, 0, "ebx"), (0xD, 0, "ecx"), (0xD, 1, "eax"), (0xD, 1, "ebx")}),
    # measured by kvmharness fuzz: a jump to the last 2 bytes of RAM gave suberror 1 with
    # data (0, 0x1000, 0, 0, 0, 0) (no instruction bytes), int3 data (1, <bytes>, 0x1000,
    # 0, 0, 0, 0): kvm_pvm's own exit reason 0x1000, no exit info
    fetch_failure_exit_info=(0x1000, 0, 0, 0, 0),
    real_ivt_limit_checked=False, misc_enable_reset=0x1, xsave_size_follows_xcr0=False,
    shutdown_inits_vcpu=False)
# kvm_amd on the SVM rig in a box: the same kernel code, on QEMU TCG's emulated EPYC
# (no address size in IOIO EXITINFO1, no NRIPS).  Used for the rig pair of kvmharness fuzz
# (fuzz/rigpair.py picks it for a rig labelled "tcg"), never for AMD hardware.
KVM_AMD_QEMU_TCG = replace(KVM_AMD, name="kvm_amd@qemu-tcg", cpu="qemu-tcg", ioio_addr_size_bits=False,
                           host_nrips=False)
PROFILES = {p.name: p for p in (KVM_AMD, KVM_PVM, KVM_AMD_QEMU_TCG)}


def resolve(profile: str | KvmProfile | None = None) -> KvmProfile:
    """The profile named (or given); ``None``: ``$KVMHARNESS_SIM_PROFILE``, else kvm_amd."""
    if isinstance(profile, KvmProfile):
        return profile
    name = profile if profile is not None else (os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    try:
        return PROFILES[name]
    except KeyError:
        where = f" (from {PROFILE_ENV})" if profile is None else ""
        raise UsageError(f"unknown simulator profile {name!r}{where}: choose one of "
                         f"{', '.join(PROFILES)}") from None


def for_kvm_module(module: str | None) -> str:
    """The profile matching a host's KVM module (hostinfo.kvm_device_info()["module"])."""
    return "kvm_pvm" if module == "kvm_pvm" else "kvm_amd"
