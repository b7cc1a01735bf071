"""SEV-SNP through /dev/kvm: the ``KVM_X86_SNP_VM`` launch and the VMM's side of its exits.

The order is that of Linux's own SNP users (tools/testing/selftests/kvm/lib/x86/sev.c:
``vm_sev_launch`` with ``snp_vm_launch_start``/``_update``/``_finish``; QEMU
target/i386/sev.c: ``sev_snp_launch_start``, ``sev_snp_launch_update``,
``sev_snp_launch_finish``):

1. ``KVM_CREATE_VM(KVM_X86_SNP_VM)``; every RAM slot is a guest_memfd slot
   (``KVM_CREATE_GUEST_MEMFD``, ``KVM_SET_USER_MEMORY_REGION2`` with
   ``KVM_MEM_GUEST_MEMFD``) made private (``KVM_SET_MEMORY_ATTRIBUTES``):
   ``KvmVm.add_memory`` on this VM type.
2. ``KVM_SEV_INIT2`` (``struct kvm_sev_init`` all zero) before any vCPU, then the vCPU
   and its registers (what KVM turns into the VMSA at LAUNCH_FINISH).
3. ``KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)``: the guest's
   page-state changes reach userspace.
4. ``KVM_SEV_SNP_LAUNCH_START`` (policy; /dev/sev's fd in ``kvm_sev_cmd.sev_fd``).
5. For each range of pages of one type: ``KVM_SET_MEMORY_ATTRIBUTES`` (private), then
   ``KVM_SEV_SNP_LAUNCH_UPDATE`` until ``len`` is 0 -- KVM may stop early and say how far
   it got by advancing ``gfn_start``/``uaddr`` and shrinking ``len`` (QEMU's loop).  A
   CPUID page the firmware rejects comes back corrected in the source buffer
   (``-EIO``, error INVALID_PARAM); the VMM retries once with the corrected page and
   reports which entries the firmware changed.
6. ``KVM_SEV_SNP_LAUNCH_FINISH`` (KVM measures each vCPU's VMSA, then the firmware
   finishes the launch).

At run time the Machine answers two exits here: ``KVM_EXIT_MEMORY_FAULT`` (convert the
range with KVM_SET_MEMORY_ATTRIBUTES, as QEMU's ``kvm_convert_memory``) and
``KVM_EXIT_HYPERCALL`` with ``nr == KVM_HC_MAP_GPA_RANGE`` (the guest's page-state
change: flip the attributes, answer ``hypercall.ret``).

On a host without SNP every step fails with the kernel's errno; the error carries
``host_verdict = "sev-snp"`` so the CLI adds ``kvmharness info``'s reason.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from typing import TYPE_CHECKING

from .. import backend as _backend
from ..abi import KVM_HC_MAP_GPA_RANGE
from ..backend import SEV_DEVICE
from ..errors import FeatureUnavailable, SevError, UsageError
from ..snp.firmware import CpuidEntry, parse_cpuid_page
from ..snp.launch import guest_launch_plan
from ..snp.measure import PAGE_SIZE, LaunchDigest, PageType
from . import _ffi as K
from ._ffi import ffi
from .sev import KvmSev

if TYPE_CHECKING:
    from .vm import KvmVm

#: an AP's RESET-state RDX when the CPUID table has no leaf 1 (the launch plan's default: Milan)
DEFAULT_VCPU_SIGNATURE = 0x00A00F11
#: kvm_sev_cmd.error for a CPUID page the firmware rejected (SEV_RET_INVALID_PARAM)
SEV_RET_INVALID_PARAM = 0x16
#: KVM_HC_MAP_GPA_RANGE's attributes argument (include/uapi/linux/kvm_para.h)
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0x3
#: the hypercall's error for a range the VMM refuses (KVM_EINVAL, returned negated in RAX)
_HC_EINVAL = 22


@dataclasses.dataclass(frozen=True)
class UpdateStep:
    """One KVM_SEV_SNP_LAUNCH_UPDATE: what went in and what KVM wrote back."""

    gfn_start: int
    uaddr: int
    len: int
    page_type: int
    gfn_after: int
    uaddr_after: int
    len_after: int


class KvmSnp(KvmSev):
    """The SNP commands of KVM_MEMORY_ENCRYPT_OP on one ``KVM_X86_SNP_VM``."""

    def __init__(self, vm: KvmVm, *, sev_path: str = SEV_DEVICE):
        super().__init__(vm, sev_path=sev_path)
        self.mode = "sev-snp"  # a refusal's host_verdict
        self.steps: list[UpdateStep] = []

    def init2(self, *, vmsa_features: int = 0, ghcb_version: int = 0) -> None:
        """KVM_SEV_INIT2 (``__sev_guest_init``: before any vCPU, GHCB version 0 means 2)."""
        init = ffi.new("struct kvm_sev_init *")
        init.vmsa_features, init.ghcb_version = vmsa_features, ghcb_version
        self._op("KVM_SEV_INIT2", K.KVM_SEV_INIT2, init)

    def snp_launch_start(self, policy: int, *, gosvw: bytes = bytes(16)) -> None:
        """KVM_SEV_SNP_LAUNCH_START (SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE)."""
        p = ffi.new("struct kvm_sev_snp_launch_start *")
        p.policy = policy
        ffi.memmove(p.gosvw, bytes(gosvw).ljust(16, b"\0")[:16], 16)
        self._op("KVM_SEV_SNP_LAUNCH_START", K.KVM_SEV_SNP_LAUNCH_START, p)

    def snp_launch_update(self, gfn_start: int, uaddr: int, length: int,
                          page_type: int) -> UpdateStep:
        """One KVM_SEV_SNP_LAUNCH_UPDATE; KVM's write-back (gfn_start, uaddr, len advanced
        past the pages it did) is returned; a failure raises with errno and firmware status."""
        p = ffi.new("struct kvm_sev_snp_launch_update *")
        p.gfn_start, p.uaddr, p.len, p.type = gfn_start, uaddr, length, int(page_type)
        err, error = self._issue(K.KVM_SEV_SNP_LAUNCH_UPDATE, p)
        if err:
            raise self._error("KVM_SEV_SNP_LAUNCH_UPDATE", err, error)
        step = UpdateStep(gfn_start, uaddr, length, int(page_type), int(p.gfn_start),
                          int(p.uaddr), int(p.len))
        self.steps.append(step)
        return step

    def update_range(self, gpa: int, length: int, page_type: int) -> int:
        """LAUNCH_UPDATE ``gpa``..+``length`` from the slot's own mapping (the source buffer)
        until KVM says all is done; returns the number of ioctls it took."""
        if not length or length % PAGE_SIZE or gpa % PAGE_SIZE:
            raise UsageError(f"an SNP launch range is whole pages: {gpa:#x}+{length:#x}")
        gfn, uaddr, left = gpa >> 12, self._uaddr(gpa, length), length
        calls = 0
        while left:
            step = self.snp_launch_update(gfn, uaddr, left, page_type)
            calls += 1
            done = left - step.len_after
            if (step.len_after > left or done % PAGE_SIZE or
                    step.gfn_after != gfn + done // PAGE_SIZE or
                    (page_type != PageType.ZERO and step.uaddr_after != uaddr + done)):
                raise SevError("KVM_SEV_SNP_LAUNCH_UPDATE", errno.EIO, None,
                               f"KVM wrote back gfn_start {step.gfn_after:#x} len "
                               f"{step.len_after:#x} uaddr {step.uaddr_after:#x} for "
                               f"{gfn:#x}+{left:#x}: not a prefix of the range")
            if not done:
                raise SevError("KVM_SEV_SNP_LAUNCH_UPDATE", errno.EIO, None,
                               f"no progress at GFN {gfn:#x}")
            gfn, uaddr, left = step.gfn_after, step.uaddr_after, step.len_after
        return calls

    def snp_launch_finish(self, *, id_block: bytes | None = None, id_auth: bytes | None = None,
                          auth_key_en: bool = False, host_data: bytes = bytes(32)) -> None:
        """KVM_SEV_SNP_LAUNCH_FINISH (every vCPU's VMSA measured, then SNP_LAUNCH_FINISH)."""
        p = ffi.new("struct kvm_sev_snp_launch_finish *")
        blk, p.id_block_uaddr, _ = self._blob(id_block)
        auth, p.id_auth_uaddr, _ = self._blob(id_auth)
        p.id_block_en = 1 if id_block is not None else 0
        p.auth_key_en = 1 if auth_key_en else 0
        ffi.memmove(p.host_data, bytes(host_data).ljust(32, b"\0")[:32], 32)
        self._op("KVM_SEV_SNP_LAUNCH_FINISH", K.KVM_SEV_SNP_LAUNCH_FINISH, p)
        del blk, auth


@dataclasses.dataclass
class CpuidCorrection:
    """An entry of the CPUID page the firmware changed (QEMU's
    ``sev_snp_cpuid_report_mismatches``): provided, then the firmware's."""

    provided: CpuidEntry
    corrected: CpuidEntry


class KvmSnpLaunch:
    """What an SNP launch through /dev/kvm established (``Machine.launch_result``), and
    the VMM's answers to the SNP exits."""

    def __init__(self, snp: KvmSnp, plan, policy: int):
        self.snp = snp
        self.plan = plan
        self.policy = policy
        self.pages_measured: list = []  # LaunchPage, as measured (a corrected CPUID page)
        self.cpuid_corrections: list[CpuidCorrection] = []
        self.update_calls = 0
        self.conversions: list[tuple[str, int, int, bool]] = []  # (why, gpa, size, private)
        self.seconds = 0.0

    @property
    def launch_digest(self) -> bytes:
        """The digest the firmware computed, replayed from the pages KVM was given and the
        vCPUs' VMSAs (KVM_SEV_SNP_LAUNCH_FINISH returns no digest: an attestation report
        carries it)."""
        d = LaunchDigest()
        for p in self.pages_measured:
            d.update(p.gpa, p.page_type, p.data)
        return d.digest

    def to_dict(self) -> dict:
        return {"mode": "sev-snp", "backend": "kvm", "policy": f"0x{self.policy:x}",
                "launch_digest": self.launch_digest.hex(), "pages": len(self.pages_measured),
                "launch_update_ioctls": self.update_calls,
                "cpuid_corrections": [dataclasses.asdict(c) for c in self.cpuid_corrections],
                "launch_seconds": round(self.seconds, 6)}

    def rmp_entry(self, gpa: int) -> dict:
        """The RMP entry behind ``gpa``: not for userspace to read through KVM."""
        raise FeatureUnavailable("the RMP is firmware-owned memory: KVM shows userspace no RMP "
                                 "entry (the simulator's host can read its own)")

    def vmsa_rmp_entry(self, vcpu: int = 0) -> dict:
        """The RMP entry of a vCPU's VMSA page: not for userspace to read through KVM."""
        raise FeatureUnavailable("the RMP is firmware-owned memory: KVM shows userspace no RMP "
                                 "entry (the simulator's host can read its own)")

    # -- the exits ----------------------------------------------------------------------
    def memory_fault(self, gpa: int, size: int, private: bool) -> None:
        """KVM_EXIT_MEMORY_FAULT: make the range what the guest accessed it as."""
        self.snp.vm.set_memory_attributes(gpa, size, private=private)
        self.conversions.append(("memory-fault", gpa, size, private))

    def map_gpa_range(self, args: tuple[int, ...]) -> int:
        """KVM_HC_MAP_GPA_RANGE (args: GPA, pages, attributes): flip the range's memory
        attributes; the hypercall's return value (0, or -KVM_EINVAL for a range outside
        guest memory or a bad page size)."""
        gpa, npages, attrs = args[0], args[1], args[2]
        size_code = attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK
        if size_code == 3 or gpa % PAGE_SIZE or not npages:
            return -_HC_EINVAL & (1 << 64) - 1
        size = npages * PAGE_SIZE
        ram = self.snp.vm.regions[0] if self.snp.vm.regions else None
        if ram is None or gpa < ram.gpa or gpa + size > ram.gpa + ram.size:
            return -_HC_EINVAL & (1 << 64) - 1
        private = bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
        self.snp.vm.set_memory_attributes(gpa, size, private=private)
        self.conversions.append(("map-gpa-range", gpa, size, private))
        return 0


def _ranges(pages) -> list[tuple[int, int, list]]:
    """Consecutive pages of one type as (gpa, page_type, pages) ranges."""
    out: list[tuple[int, int, list]] = []
    for p in pages:
        if out and out[-1][1] == p.page_type and out[-1][0] + len(out[-1][2]) * PAGE_SIZE == p.gpa:
            out[-1][2].append(p)
        else:
            out.append((p.gpa, p.page_type, [p]))
    return out


def launch_machine(machine, image, data: bytes, policy: int | None, *, c_bit: int,
                   sev_path: str | None = None, vcpus: int = 1) -> KvmSnpLaunch:
    """The SEV-SNP launch of a Machine on the kvm backend (the module docstring's order).
    ``machine.vm`` is a KVM_X86_SNP_VM whose RAM slot is guest_memfd-backed and private.

    ``vcpus`` > 1: the APs are created after INIT2 with the BSP, given its CPUID table
    (their own APIC IDs) and the x86 RESET state with RDX = the CPUID signature (what QEMU
    gives every AP before the launch: ``sev.vmsa.reset_state``); KVM measures one VMSA per
    vCPU at LAUNCH_FINISH, BSP first.  The guest starts them later (AP creation)."""
    from ..sev.launch import vmsa_page_for_vcpu
    from ..sev.vmsa import reset_state
    from ..snp.launch import LaunchPage
    from ..snp.policy import DEFAULT_POLICY, SnpPolicy
    from ..x86 import with_vcpu_apic_id

    vm = machine.vm
    policy = DEFAULT_POLICY if policy is None else int(policy)
    why = SnpPolicy(policy).kvm_check()
    if why:
        raise UsageError(f"SNP policy {policy:#x}: KVM refuses it: {why}")
    t0 = time.perf_counter()
    snp = KvmSnp(vm, sev_path=sev_path or _backend.SEV_DEVICE)  # KVMHARNESS_SEV_DEVICE
    snp.init2()
    if not 1 <= vcpus <= 255:
        raise UsageError(f"--vcpus {vcpus}: an SNP guest has 1 to 255 vCPUs here")
    machine.vcpu = vm.create_vcpu(0)
    aps = machine.aps = [vm.create_vcpu(i) for i in range(1, vcpus)]
    machine.load(image, data, c_bit=c_bit)
    leaf1 = next((e for e in machine.cpuid.entries if e.function == 1), None)
    sig = leaf1.eax if leaf1 is not None and leaf1.eax else DEFAULT_VCPU_SIGNATURE
    for i, ap in enumerate(aps, 1):
        ap.set_cpuid(with_vcpu_apic_id(machine.cpuid, i).entries)
        regs, sregs = reset_state(sig)
        ap.set_sregs(sregs)
        ap.set_regs(regs)
    plan = guest_launch_plan(data, image.mode, machine.memory, vcpus=vcpus, vcpu_sig=sig,
                             c_bit=c_bit if image.mode == "long64" else None,
                             source=f"guest {image.name}")
    vm.enable_cap(K.KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    snp.snp_launch_start(policy)
    launch = KvmSnpLaunch(snp, plan, policy)
    for gpa, page_type, pages in _ranges(plan.memory_pages()):
        length = len(pages) * PAGE_SIZE
        for p in pages:  # the source buffer is the slot's mapping at the page's GPA
            if p.page_type == PageType.NORMAL:
                if vm.read(p.gpa, PAGE_SIZE) != p.data:
                    raise SevError("KVM_SEV_SNP_LAUNCH_UPDATE", errno.EINVAL, None,
                                   f"guest memory at {p.gpa:#x} differs from the launch plan")
            elif p.data is not None:
                vm.write(p.gpa, p.data)
        vm.set_memory_attributes(gpa, length, private=True)
        try:
            launch.update_calls += snp.update_range(gpa, length, page_type)
        except SevError as e:
            if not (page_type == PageType.CPUID and e.fw_error == SEV_RET_INVALID_PARAM):
                raise
            # the firmware wrote the table it accepts into the source page: report, retry once
            corrected = vm.read(gpa, PAGE_SIZE)
            launch.cpuid_corrections = [
                CpuidCorrection(a, b) for a, b in zip(parse_cpuid_page(pages[0].data)[1],
                                                      parse_cpuid_page(corrected)[1],
                                                      strict=False) if a != b]
            launch.update_calls += 1 + snp.update_range(gpa, length, page_type)
            pages = [LaunchPage(gpa, PageType.CPUID, corrected)]
        launch.pages_measured.extend(pages)
    vmsas = [vmsa_page_for_vcpu(v, vmsa_features=1, fpu=True) for v in vm.vcpus]
    snp.snp_launch_finish()
    launch.pages_measured.extend(LaunchPage(p.gpa, PageType.VMSA, page, vcpu=i)
                                 for i, (p, page) in enumerate(zip(plan.vmsa_pages(), vmsas, strict=True)))
    launch.seconds = time.perf_counter() - t0
    return launch


__all__ = ["CpuidCorrection", "KvmSnp", "KvmSnpLaunch", "UpdateStep", "launch_machine"]
