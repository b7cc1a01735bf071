"""An SEV-SNP launch, as KVM drives the firmware, and the plan of pages for a harness guest.

Two parts:

* :func:`guest_launch_plan`: what an SNP launch of a manifest guest (or a raw
  image) puts into guest memory and the order KVM measures it in -- the boot
  tables and image as NORMAL pages, the SECRETS and CPUID pages at fixed GPAs
  (:data:`SNP_SECRETS_GPA`, :data:`SNP_CPUID_GPA`), then one VMSA per vCPU at
  LAUNCH_FINISH (``snp_launch_update_vmsa``: vCPU 0 first, every VMSA at RMP
  GPA ``INITIAL_VMSA_GPA``).  :func:`expected_digest` computes the digest
  offline; ``kvmharness measure GUEST --mode sev-snp`` prints it with its log.
* :class:`KvmSnpVm`: KVM's ``sev.c`` for a ``KVM_X86_SNP_VM`` over the
  simulated firmware: ``KVM_SEV_INIT2`` (``__sev_guest_init``),
  ``KVM_SET_MEMORY_ATTRIBUTES``, ``KVM_SEV_SNP_LAUNCH_START`` (policy checks,
  SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE), ``KVM_SEV_SNP_LAUNCH_UPDATE``
  (``snp_launch_update`` + ``sev_gmem_post_populate``: RMP Pre-Guest,
  SNP_LAUNCH_UPDATE, reclaim and CPUID copy-back on failure),
  ``KVM_SEV_SNP_LAUNCH_FINISH`` (every vCPU's VMSA, then SNP_LAUNCH_FINISH).
  Each refusal is a :class:`~kvmharness.errors.SevError` carrying KVM's errno
  and, when the firmware answered, its status.
"""

from __future__ import annotations

import dataclasses
import errno

from ..errors import SevError, UsageError
from .firmware import CpuidEntry, SimulatedSnpFirmware, cpuid_page
from .measure import INITIAL_VMSA_GPA, PAGE_SIZE, LaunchDigest, PageType
from .policy import KVM_POLICY_MASK_VALID, SnpPolicy
from .rmp import PAGES_PER_2M

# Where the harness puts the two firmware-filled pages of an SNP guest: between
# the largest image that fits below them (0x8000 + 24 KiB) and the 0x10000 data
# pages the guests use.
SNP_SECRETS_GPA = 0xE000
SNP_CPUID_GPA = 0xF000

# KVM (sev.c)
KVM_SEV_SNP_PAGE_TYPES = (PageType.NORMAL, PageType.ZERO, PageType.UNMEASURED,
                          PageType.SECRETS, PageType.CPUID)  # VMSA only via LAUNCH_FINISH
GHCB_VERSION_MAX = 2
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
KVM_SEV_SNP_PAGE_TYPE_NAMES = {t.label: t for t in PageType}


@dataclasses.dataclass(frozen=True)
class LaunchPage:
    gpa: int  # for VMSA pages: INITIAL_VMSA_GPA, as KVM records them in the RMP
    page_type: PageType
    data: bytes | None  # None for ZERO pages
    vcpu: int | None = None  # VMSA pages: which vCPU


@dataclasses.dataclass
class SnpLaunchPlan:
    pages: list  # LaunchPage, in launch order
    vcpus: int
    source: str = ""

    def memory_pages(self):
        return [p for p in self.pages if p.page_type != PageType.VMSA]

    def vmsa_pages(self):
        return [p for p in self.pages if p.page_type == PageType.VMSA]


def default_cpuid_entries(sig: int) -> list[CpuidEntry]:
    """The CPUID table a harness SNP guest gets: the leaves the guests read, EPYC-like values
    within what the simulated part has (leaf 1 EAX = the vCPU signature)."""
    return [
        CpuidEntry(0x0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x1, 0, sig, 0x00000800, 0x76D8320B, 0x178BFBFF),
        CpuidEntry(0x7, 0, 0x0, 0x219C97A9, 0x0040068C, 0x00000010),
        CpuidEntry(0x80000000, 0, 0x80000021, 0x68747541, 0x444D4163, 0x69746E65),
        CpuidEntry(0x80000001, 0, sig, 0x0, 0x75C237FF, 0x2FD3FBFF),
        CpuidEntry(0x8000001F, 0, 0x0001001F, 0x00004173, 0x000001FD, 0x00000001),
    ]


def _pages_of(start: int, blob: bytes):
    first = start & ~0xFFF
    data = bytes(start - first) + bytes(blob)
    data += bytes(-len(data) % PAGE_SIZE)
    for off in range(0, len(data), PAGE_SIZE):
        yield first + off, data[off:off + PAGE_SIZE]


def guest_launch_plan(image: bytes, entry_mode: str, memory: int, *, vcpus: int = 1,
                      c_bit: int | None = 51, vcpu_sig: int = 0x00A00F11,
                      source: str = "", cpuid_entries: list | None = None) -> SnpLaunchPlan:
    """The pages an SNP launch of this image measures, in KVM's order.  ``cpuid_entries``:
    the CPUID page the VMM offers (default: :func:`default_cpuid_entries`)."""
    from ..boot import long_mode_state, real_mode_state, sev_launch_blob
    from ..sev.vmsa import build_vmsa, reset_state

    if not 1 <= vcpus <= 255:
        raise UsageError(f"--vcpus {vcpus}: an SNP guest has 1 to 255 vCPUs here")
    start, blob = sev_launch_blob(image, entry_mode, c_bit)
    pages = [LaunchPage(gpa, PageType.NORMAL, data) for gpa, data in _pages_of(start, blob)]
    end = pages[-1].gpa + PAGE_SIZE
    if end > SNP_SECRETS_GPA:
        raise UsageError(f"{source or 'the image'}: the image ends at {end:#x}, past the SNP "
                         f"secrets page at {SNP_SECRETS_GPA:#x}")
    if memory < 0x10000:
        raise UsageError(f"{source or 'the guest'}: {memory} bytes of memory do not hold the "
                         "SNP secrets and CPUID pages")
    pages.append(LaunchPage(SNP_SECRETS_GPA, PageType.SECRETS, bytes(PAGE_SIZE)))
    pages.append(LaunchPage(SNP_CPUID_GPA, PageType.CPUID,
                            cpuid_page(default_cpuid_entries(vcpu_sig) if cpuid_entries is None
                                       else cpuid_entries)))
    for cpu in range(vcpus):
        if cpu == 0:
            regs, sregs = (long_mode_state(memory) if entry_mode == "long64"
                           else real_mode_state())
        else:  # an AP waits in the x86 RESET state until the guest starts it (AP creation)
            regs, sregs = reset_state(vcpu_sig)
        vmsa = build_vmsa(regs, sregs, sev_features=SVM_SEV_FEAT_SNP_ACTIVE, init2=True)
        pages.append(LaunchPage(INITIAL_VMSA_GPA, PageType.VMSA, vmsa, vcpu=cpu))
    return SnpLaunchPlan(pages, vcpus, source)


def expected_digest(plan: SnpLaunchPlan) -> LaunchDigest:
    """The launch digest of a plan, computed offline (no firmware)."""
    d = LaunchDigest()
    for p in plan.pages:
        d.update(p.gpa, p.page_type, p.data)
    return d


# -- KVM's side ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchUpdateResult:
    """What KVM_SEV_SNP_LAUNCH_UPDATE writes back into its argument, and the source buffer."""

    gfn_start: int  # advanced past the pages done
    len: int  # what is left (0: all done)
    uaddr_advance: int  # how far uaddr moved (0 for ZERO pages in KVM; the pages done here)
    data: bytes | None  # the source buffer as KVM left it


SVM_VMGEXIT_AP_CREATION = 0x80000013
SVM_VMGEXIT_AP_CREATE_ON_INIT = 0
SVM_VMGEXIT_AP_CREATE = 1
SVM_VMGEXIT_AP_DESTROY = 2


KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


@dataclasses.dataclass(frozen=True)
class MemoryFaultExit:
    """``KVM_EXIT_MEMORY_FAULT`` (KVM_RUN fails with EFAULT): the VMM converts the range
    with KVM_SET_MEMORY_ATTRIBUTES (to private when ``private``) and runs again."""

    gpa: int
    size: int
    private: bool

    @property
    def flags(self) -> int:
        return KVM_MEMORY_EXIT_FLAG_PRIVATE if self.private else 0


@dataclasses.dataclass
class SnpVcpu:
    """KVM's per-vCPU SNP state (``svm->sev_es``: VMSA, the AP-creation request)."""

    vmsa_pfn: int | None
    snp_vmsa_gpa: int | None = None
    waiting_for_reset: bool = False
    runnable: bool = True


def _kvm_fail(command: str, err: int, detail: str, fw_error: int | None = None) -> SevError:
    return SevError(command, err, fw_error, detail)


class KvmSnpVm:
    """A ``KVM_X86_SNP_VM`` over :class:`SimulatedSnpFirmware` (KVM's sev.c, modelled).

    Host memory layout: the guest's private memory (guest_memfd) at
    ``gmem_base_pfn + gfn``, its shared memory (the userspace mapping) at
    ``shared_base_pfn + gfn``, KVM's own pages (context, VMSAs) above both.
    """

    def __init__(self, firmware: SimulatedSnpFirmware, memory_size: int, *, asid: int = 1,
                 supported_policy_bits: int = KVM_POLICY_MASK_VALID, maxphyaddr: int = 48):
        if memory_size % PAGE_SIZE:
            raise UsageError("guest memory is a whole number of pages")
        self.fw = firmware
        self.npages = memory_size // PAGE_SIZE
        self.gmem_base_pfn = PAGES_PER_2M  # 2 MiB aligned, above page 0
        self.shared_base_pfn = self.gmem_base_pfn + _round_2m(self.npages)
        self._next_kvm_pfn = self.shared_base_pfn + _round_2m(self.npages)
        if self._next_kvm_pfn + 64 > firmware.memory.pages:
            raise UsageError("the simulated host is too small for this guest")
        self.asid = asid
        self.supported_policy_bits = supported_policy_bits
        self.initialized = False
        self.ghcb_version = 0
        self.vmsa_features = 0
        self.gctx_spa: int | None = None
        self.private: set[int] = set()  # gfns with KVM_MEMORY_ATTRIBUTE_PRIVATE
        self.vcpu_vmsas: list[int] = []  # PFN of each vCPU's launch VMSA page
        self.vcpus: list[SnpVcpu] = []
        self.maxphyaddr = maxphyaddr
        self.finished = False
        self.pre_fault_allowed = False
        self.npt_override: dict[int, int] = {}  # gfn -> pfn, a hypervisor's rewiring

    def _kvm_page(self) -> int:
        pfn = self._next_kvm_pfn
        self._next_kvm_pfn += 1
        return pfn

    # -- addresses -------------------------------------------------------------------
    def gmem_pfn(self, gfn: int) -> int:
        return self.gmem_base_pfn + gfn

    def shared_pfn(self, gfn: int) -> int:
        return self.shared_base_pfn + gfn

    def spa_of(self, gpa: int) -> int:
        """Where the NPT maps a GPA now: guest_memfd when private, else the shared page
        (unless a hypervisor rewired it, :meth:`remap`)."""
        gfn = gpa >> 12
        pfn = self.npt_override.get(gfn)
        if pfn is None:
            pfn = self.gmem_pfn(gfn) if gfn in self.private else self.shared_pfn(gfn)
        return pfn << 12 | (gpa & 0xFFF)

    def remap(self, gpa: int, to_gpa: int) -> None:
        """A malicious hypervisor points GPA ``gpa``'s NPT entry at the private page backing
        ``to_gpa`` (the page-remapping attack)."""
        self.npt_override[gpa >> 12] = self.gmem_pfn(to_gpa >> 12)

    def handle_npf(self, gpa: int, error_code: int) -> MemoryFaultExit | None:
        """KVM's #NPF path for an SNP guest (``svm_npf_intercept``, the MMU, then
        ``sev_handle_rmp_fault``): returns the ``KVM_EXIT_MEMORY_FAULT`` userspace must
        resolve (a private access to a shared GPA or the reverse), or None when KVM fixed
        what it could and re-enters the guest.

        A private fault on private memory gets its guest_memfd page assigned
        (``sev_gmem_prepare``); an RMP fault on a 2 MiB RMP entry is PSMASHed.
        A fault KVM cannot fix (a remapped page) just re-enters the guest,
        which faults again: it never sees the other page's data.
        """
        from .rmp import PFERR_GUEST_ENC, PFERR_RMP

        gfn = gpa >> 12
        is_private = bool(error_code & PFERR_GUEST_ENC)
        if gfn >= self.npages:
            return None  # MMIO / beyond memory: not modelled here
        if is_private != (gfn in self.private):
            return MemoryFaultExit(gpa & ~0xFFF, PAGE_SIZE, is_private)
        rmp = self.fw.rmp
        if is_private:
            pfn = self.gmem_pfn(gfn)
            assigned, level = rmp.lookup(pfn)
            if not assigned:
                rmp.make_private(pfn, gfn << 12, False, self.asid, False)
            elif error_code & PFERR_RMP and level:
                rmp.psmash(pfn << 12 & ~(PAGES_PER_2M * PAGE_SIZE - 1))
        return None

    # -- ioctls ------------------------------------------------------------------------
    def sev_init2(self, *, vmsa_features: int = 0, flags: int = 0, ghcb_version: int = 0,
                  supported_vmsa_features: int = 0) -> None:
        """KVM_SEV_INIT2 on an SNP VM (``__sev_guest_init``)."""
        cmd = "KVM_SEV_INIT2"
        if self.vcpu_vmsas or flags or vmsa_features & ~supported_vmsa_features:
            raise _kvm_fail(cmd, errno.EINVAL, "vCPUs exist, flags set or unsupported "
                            "vmsa_features")
        if ghcb_version > GHCB_VERSION_MAX:
            raise _kvm_fail(cmd, errno.EINVAL, f"GHCB version {ghcb_version} > {GHCB_VERSION_MAX}")
        ghcb_version = ghcb_version or 2
        if ghcb_version < 2:
            raise _kvm_fail(cmd, errno.EINVAL, "an SNP guest needs GHCB protocol version 2")
        if self.initialized:
            raise _kvm_fail(cmd, errno.EINVAL, "SEV is already initialized on this VM")
        if self.fw.state.name != "INIT":
            self.fw.snp_init()  # sev_platform_init
        self.initialized = True
        self.ghcb_version = ghcb_version
        self.vmsa_features = vmsa_features | SVM_SEV_FEAT_SNP_ACTIVE

    def set_memory_attributes(self, gpa: int, size: int, private: bool) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES with or without KVM_MEMORY_ATTRIBUTE_PRIVATE."""
        if gpa % PAGE_SIZE or size % PAGE_SIZE or not size or (gpa + size) // PAGE_SIZE > self.npages:
            raise _kvm_fail("KVM_SET_MEMORY_ATTRIBUTES", errno.EINVAL,
                            f"range {gpa:#x}+{size:#x} is not whole pages of guest memory")
        gfns = range(gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE)
        if private:
            self.private.update(gfns)
        else:
            self.private.difference_update(gfns)

    def create_vcpu(self) -> int:
        if self.finished:
            raise _kvm_fail("KVM_CREATE_VCPU", errno.EINVAL, "the SNP launch is finished")
        pfn = self._kvm_page()
        self.vcpu_vmsas.append(pfn)
        self.vcpus.append(SnpVcpu(vmsa_pfn=pfn))
        return len(self.vcpu_vmsas) - 1

    def launch_start(self, policy: int, *, gosvw: bytes = bytes(16), flags: int = 0) -> None:
        """KVM_SEV_SNP_LAUNCH_START (``snp_launch_start``)."""
        cmd = "KVM_SEV_SNP_LAUNCH_START"
        if not self.initialized:
            raise _kvm_fail(cmd, errno.ENOTTY, "not an SNP guest (KVM_SEV_INIT2 first)")
        if self.gctx_spa is not None:
            raise _kvm_fail(cmd, errno.EINVAL, "the VM already has an SNP context")
        if flags:
            raise _kvm_fail(cmd, errno.EINVAL, f"flags {flags:#x} must be 0")
        why = SnpPolicy(policy).kvm_check(self.supported_policy_bits)
        if why:
            raise _kvm_fail(cmd, errno.EINVAL, why)
        ctx = self._kvm_page()
        self.fw.alloc_firmware_page(ctx)
        try:
            self.fw.gctx_create(ctx << 12)
        except SevError as e:  # snp_context_create fails -> ENOTTY
            raise _kvm_fail(cmd, errno.ENOTTY, e.detail, e.fw_error) from None
        try:
            self.fw.launch_start(ctx << 12, policy, gosvw=gosvw)
            self.fw.activate(ctx << 12, self.asid)
        except SevError as e:
            self.fw.decommission(ctx << 12)
            raise _kvm_fail(cmd, errno.EIO, e.detail, e.fw_error) from None
        self.gctx_spa = ctx << 12

    def launch_update(self, gfn_start: int, data: bytes | None, length: int,
                      page_type: int, *, flags: int = 0) -> LaunchUpdateResult:
        """KVM_SEV_SNP_LAUNCH_UPDATE (``snp_launch_update``, ``kvm_gmem_populate``,
        ``sev_gmem_post_populate``).

        Argument errors are EINVAL before any page.  Then page by page: the GFN
        must be private (KVM_SET_MEMORY_ATTRIBUTES), its guest_memfd page not
        yet assigned in the RMP, and the firmware must accept it.  A failure on
        the first page fails the ioctl with EIO (the firmware's status in
        ``error`` when the firmware refused, else 0); a failure on a later page
        ends the ioctl successfully with ``gfn_start``/``len``/``uaddr``
        advanced past the pages done, as ``kvm_gmem_populate`` returns the
        count.  A CPUID page the firmware rejected is copied back into the
        source buffer (the corrected table; ``cpuid_copyback``).
        """
        cmd = "KVM_SEV_SNP_LAUNCH_UPDATE"
        if not self.initialized or self.gctx_spa is None:
            raise _kvm_fail(cmd, errno.EINVAL, "no SNP launch in progress (LAUNCH_START first)")
        if (not length or length % PAGE_SIZE or flags
                or page_type not in [int(t) for t in KVM_SEV_SNP_PAGE_TYPES]):
            raise _kvm_fail(cmd, errno.EINVAL, f"len {length:#x}, flags {flags:#x}, type "
                            f"{page_type}: len a non-zero multiple of 4096, flags 0, type one "
                            "of NORMAL/ZERO/UNMEASURED/SECRETS/CPUID")
        if gfn_start >= self.npages:
            raise _kvm_fail(cmd, errno.EINVAL, f"GFN {gfn_start:#x} is in no guest_memfd memslot")
        if page_type != PageType.ZERO and (data is None or len(data) < length):
            raise _kvm_fail(cmd, errno.EFAULT, "the source buffer is shorter than len")
        npages = length // PAGE_SIZE
        out = bytearray(data) if data is not None and page_type != PageType.ZERO else None
        for i in range(npages):
            gfn = gfn_start + i
            fail = self._populate_one(gfn, out, i, page_type)
            if fail is None:
                continue
            if i == 0:
                err, fw_error, detail = fail
                raise _kvm_fail(cmd, errno.EIO, f"{errno.errorcode.get(err, err)} on GFN "
                                f"{gfn:#x}: {detail}", fw_error)
            return LaunchUpdateResult(gfn, (npages - i) * PAGE_SIZE, i * PAGE_SIZE,
                                      bytes(out) if out is not None else None)
        return LaunchUpdateResult(gfn_start + npages, 0, length,
                                  bytes(out) if out is not None else None)

    def _populate_one(self, gfn: int, out, i: int, page_type: int):
        """One page of ``kvm_gmem_populate``; None on success, else (errno, fw error, why)."""
        if gfn >= self.npages or gfn not in self.private:
            return errno.EINVAL, None, "not private (KVM_SET_MEMORY_ATTRIBUTES first)"
        pfn = self.gmem_pfn(gfn)
        assigned, _ = self.fw.rmp.lookup(pfn)
        if assigned:
            return errno.EEXIST, None, "the guest_memfd page is already private in the RMP"
        if out is not None:
            self.fw.memory.write_page(pfn, bytes(out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]))
        self.fw.rmp.make_private(pfn, gfn << 12, False, self.asid, True)
        try:
            self.fw.launch_update(self.gctx_spa, pfn << 12, page_type)
        except SevError as e:
            self.fw.page_reclaim(pfn << 12)
            self.fw.rmp.make_shared(pfn)
            if page_type == PageType.CPUID and e.fw_error == 0x16 and out is not None:
                out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = self.fw.memory.read_page(pfn)
                self.cpuid_copyback = bytes(out)
            return errno.EIO, e.fw_error, e.detail
        return None

    def launch_finish(self, vmsas: list[bytes], *, id_block: bytes | None = None,
                      id_auth: bytes | None = None, auth_key_en: bool = False,
                      host_data: bytes = bytes(32), flags: int = 0) -> None:
        """KVM_SEV_SNP_LAUNCH_FINISH: every vCPU's VMSA (``snp_launch_update_vmsa``), then
        SNP_LAUNCH_FINISH.  ``vmsas`` are the pages KVM syncs from each vCPU's state."""
        cmd = "KVM_SEV_SNP_LAUNCH_FINISH"
        if not self.initialized:
            raise _kvm_fail(cmd, errno.ENOTTY, "not an SNP guest")
        if self.gctx_spa is None:
            raise _kvm_fail(cmd, errno.EINVAL, "no SNP context (LAUNCH_START first)")
        if flags:
            raise _kvm_fail(cmd, errno.EINVAL, f"flags {flags:#x} must be 0")
        if len(vmsas) != len(self.vcpu_vmsas):
            raise UsageError(f"{len(self.vcpu_vmsas)} vCPUs, {len(vmsas)} VMSA pages")
        for pfn, page in zip(self.vcpu_vmsas, vmsas):
            self.fw.memory.write_page(pfn, page)
            self.fw.rmp.make_private(pfn, INITIAL_VMSA_GPA, False, self.asid, True)
            try:
                self.fw.launch_update(self.gctx_spa, pfn << 12, PageType.VMSA)
            except SevError as e:
                self.fw.page_reclaim(pfn << 12)
                raise _kvm_fail(cmd, errno.EIO, e.detail, e.fw_error) from None
        try:
            self.fw.launch_finish(self.gctx_spa, id_block=id_block, id_auth=id_auth,
                                  auth_key_en=auth_key_en, host_data=host_data)
        except SevError as e:
            raise _kvm_fail(cmd, errno.EIO, e.detail, e.fw_error) from None
        self.finished = True
        self.pre_fault_allowed = True

    @property
    def launch_digest(self) -> bytes:
        return self.fw.launch_digest(self.gctx_spa)

    # -- AP creation (NAE 0x80000013, sev_snp_ap_creation) ------------------------------
    def ap_creation(self, exit_info_1: int, exit_info_2: int, rax: int | None) -> tuple[int, int]:
        """The guest's AP-creation request; returns (SW_EXITINFO1, SW_EXITINFO2).

        EXITINFO1[31:0]: 0 create on INIT, 1 create, 2 destroy; [63:32] the
        target's APIC ID; EXITINFO2 the new VMSA's GPA; RAX its SEV_FEATURES,
        which must equal the VM's.  A VMSA GPA that is not a valid page address
        or is 2 MiB aligned (the SNP erratum KVM guards against) is refused.
        Refusals are "bad input" (1 << 0 | 1, GHCB_ERR_INVALID_INPUT = 5) as
        KVM answers them; a missing RAX is GHCB_ERR_MISSING_INPUT (4).
        """
        request, apic_id = exit_info_1 & 0xFFFFFFFF, exit_info_1 >> 32
        if request != SVM_VMGEXIT_AP_DESTROY and rax is None:
            return 2, 4
        bad = (2, 5)
        if apic_id >= len(self.vcpus):
            return bad
        target = self.vcpus[apic_id]
        if request in (SVM_VMGEXIT_AP_CREATE_ON_INIT, SVM_VMGEXIT_AP_CREATE):
            if rax != self.vmsa_features:
                return bad
            if exit_info_2 & 0xFFF or exit_info_2 >> self.maxphyaddr:
                return bad
            if exit_info_2 % (PAGES_PER_2M * PAGE_SIZE) == 0:
                return bad
            target.snp_vmsa_gpa = exit_info_2
        elif request == SVM_VMGEXIT_AP_DESTROY:
            target.snp_vmsa_gpa = None
        else:
            return bad
        target.waiting_for_reset = True
        if request != SVM_VMGEXIT_AP_CREATE_ON_INIT:
            self.update_protected_state(apic_id)
        return 0, 0

    def update_protected_state(self, apic_id: int) -> None:
        """``sev_snp_init_protected_guest_state`` (on the request, or at INIT)."""
        v = self.vcpus[apic_id]
        if not v.waiting_for_reset:
            return
        v.waiting_for_reset = False
        v.runnable = False
        v.vmsa_pfn = None
        if v.snp_vmsa_gpa is None:
            return
        gfn, v.snp_vmsa_gpa = v.snp_vmsa_gpa >> 12, None
        if gfn >= self.npages:
            return
        v.vmsa_pfn = self.gmem_pfn(gfn)  # the guest's private page, from guest_memfd
        v.runnable = True

    def vmrun_check(self, apic_id: int) -> str | None:
        """KVM_RUN's ``pre_sev_run`` (EINVAL without a VMSA), then VMRUN's VMSA checks
        (APM Table 15-41: RMP-Covered, Guest-Owned, Mutable, VMSA bit); returns None when
        VMRUN would enter the guest, else why it exits with VMEXIT_INVALID."""
        v = self.vcpus[apic_id]
        if v.vmsa_pfn is None:
            raise _kvm_fail("KVM_RUN", errno.EINVAL, f"vCPU {apic_id} has no VMSA")
        rmp = self.fw.rmp
        if not rmp.covered(v.vmsa_pfn):
            return "the VMSA page is not covered by the RMP"
        e, _ = rmp.effective(v.vmsa_pfn)
        if not e.assigned or e.asid != self.asid:
            return f"the VMSA page is {e.owner}-owned, not the guest's"
        if e.immutable:
            return "the VMSA page is immutable"
        if not e.vmsa:
            return "the page's RMP entry lacks the VMSA bit (RMPADJUST from VMPL0 sets it)"
        return None


def _round_2m(npages: int) -> int:
    return -(-npages // PAGES_PER_2M) * PAGES_PER_2M


@dataclasses.dataclass
class SnpLaunchResult:
    digest: bytes
    vm: KvmSnpVm
    plan: SnpLaunchPlan


def launch_plan(plan: SnpLaunchPlan, memory: int, policy: int, *,
                firmware: SimulatedSnpFirmware | None = None, **finish) -> SnpLaunchResult:
    """Launch a plan on the simulated firmware the way a VMM does through KVM."""
    fw = firmware or SimulatedSnpFirmware(host_pages=max(1 << 12, 4 * _round_2m(memory // PAGE_SIZE)
                                                          + 2 * PAGES_PER_2M))
    vm = KvmSnpVm(fw, memory)
    vm.sev_init2()
    for _ in range(plan.vcpus):
        vm.create_vcpu()
    vm.launch_start(policy)
    mem = plan.memory_pages()
    for p in mem:
        vm.set_memory_attributes(p.gpa, PAGE_SIZE, True)
    for p in mem:
        vm.launch_update(p.gpa >> 12, p.data, PAGE_SIZE, p.page_type)
    vm.launch_finish([p.data for p in plan.vmsa_pages()], **finish)
    return SnpLaunchResult(vm.launch_digest, vm, plan)


__all__ = [
    "KvmSnpVm", "LaunchPage", "LaunchUpdateResult", "MemoryFaultExit", "SnpVcpu",
    "SNP_CPUID_GPA", "SNP_SECRETS_GPA", "SnpLaunchPlan", "SnpLaunchResult",
    "default_cpuid_entries", "expected_digest", "guest_launch_plan", "launch_plan",
]
