"""KVM's SEV command handling, modelled for the simulator (same interface as kvm/sev.py).

:class:`KvmSevModel` is arch/x86/kvm/svm/sev.c's ``sev_mem_enc_ioctl`` and the
region ioctls, re-told on top of :class:`~kvmharness.sev.firmware.SimulatedSevFirmware`:
first the checks KVM makes itself -- which fail with a plain errno and leave
``kvm_sev_cmd.error`` at 0, so ``SevError.fw_error`` is ``None`` -- then the
firmware command, whose refusal arrives as EIO plus the firmware status.
Function names in the comments are the kernel's (torvalds/linux, read
2026-11).  :class:`SimulatedSevDevice` does the same for /dev/sev
(drivers/crypto/ccp/sev-dev.c, ``sev_ioctl_do_*``).

Memory is named by guest-physical address and found in the VM's
``MemoryRegion`` views; an address no slot backs is what an unmapped user
address is to ``sev_pin_memory`` (``pin_user_pages_fast`` pins fewer pages
than asked: -ENOMEM).  The firmware's physical address (the encryption
tweak) is the guest-physical address; a vCPU's VMSA page lives outside guest
RAM, at :data:`VMSA_SPA_BASE` minus 4 KiB per vCPU index, as KVM keeps VMSAs
in pages of its own.

What a simulator VM must offer (duck-typed): ``vm_type``, ``regions``
(``backend.MemoryRegion`` with ``gpa``, ``size``, writable ``view``),
``vcpus`` (a list; its length is ``kvm->created_vcpus``) and, if it caches
translated code, ``flush_code(gpa, size)`` (called after every in-place
rewrite of guest memory).  For SEV-ES,
``vmsa_for(vcpu, vmsa_features=..., fpu=...) -> 4096 bytes`` builds each
vCPU's initial VMSA (default: ``launch.vmsa_page_for_vcpu``, i.e.
``sev.vmsa.build_vmsa`` over ``vcpu.get_regs()/get_sregs()``).
After the launch the simulator reads ``key`` (the guest's memory key),
``asid``, ``es_active``, ``vmsa_features``, ``ghcb_version`` and
``vmsa_pages`` (vcpu index -> (system-physical address, encrypted page)).
"""

from __future__ import annotations

import contextlib
import errno

from ..backend import (
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    KVM_X86_SNP_VM,
)
from ..errors import SevError, UsageError
from .launch import (
    SEV_FW_BLOB_MAX_SIZE,
    GuestStatusInfo,
    SevKvmInterface,
    SevPlatformInterface,
)
from .measurement import MEASUREMENT_LEN
from .status import PlatformState, SevStatus

PAGE = 4096
GHCB_VERSION_MAX = 2  # sev.c GHCB_VERSION_MAX
GHCB_VERSION_DEFAULT = 2  # what INIT2 picks for an ES guest that asks for 0
GHCB_VERSION_MIN = 1  # what legacy KVM_SEV_ES_INIT always uses
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
DR7_FIXED_1 = 0x400
VMSA_DR7 = 0x160
VMSA_SPA_BASE = 0xFFFFFFFFF000  # sev.c INITIAL_VMSA_GPA; vCPU i's page is 4 KiB * i below
MODE_VM_TYPE = {"sev": KVM_X86_SEV_VM, "sev-es": KVM_X86_SEV_ES_VM}


def firmware_from_cpuid(leaf, **kw):
    """A simulated chip whose ASIDs are what CPUID 0x8000001F says (docs/facts.md#facts-10a).

    ECX = number of encrypted guests (the highest ASID), EDX = the lowest
    plain-SEV ASID (SEV-ES guests get 1..EDX-1), EAX bit 3 = SEV-ES.  KVM's
    sev_hardware_setup reads the same leaf; ``leaf`` is an ``x86.CpuidEntry``.
    """
    from .firmware import SimulatedSevFirmware

    if not leaf.eax >> 1 & 1 or not leaf.ecx:
        raise UsageError(f"CPUID 0x8000001F {leaf} describes no SEV (EAX bit 1 / ECX)")
    return SimulatedSevFirmware(num_asids=leaf.ecx, min_sev_asid=leaf.edx,
                                es=bool(leaf.eax >> 3 & 1), **kw)


def _refuse(name: str, err: int, detail: str) -> SevError:
    """A check KVM makes itself: errno, firmware never reached."""
    return SevError(name, err, None, detail)


@contextlib.contextmanager
def _firmware(name: str):
    """Re-label a firmware refusal with the KVM command that caused it."""
    try:
        yield
    except SevError as e:
        relabelled = SevError(name, e.errno, e.fw_error, e.detail)
        relabelled.fw_check = getattr(e, "fw_check", None)  # the firmware check that fired
        raise relabelled from None


class KvmSevModel(SevKvmInterface):
    """KVM's per-VM SEV state (``struct kvm_sev_info``) and command handlers."""

    backend = "sim"
    snp = False  # sim/snp.py's SimSnpModel: True

    def __init__(self, vm, firmware, *, sev_enabled: bool = True, sev_es_enabled: bool | None = None,
                 supported_vmsa_features: int = SVM_SEV_FEAT_DEBUG_SWAP, vmsa_for=None):
        self.vm = vm
        self.firmware = firmware
        asids = firmware.asids
        # sev_hardware_setup: SEV-ES needs ASIDs below min_sev_asid.
        self.sev_enabled = sev_enabled
        self.sev_es_enabled = (sev_enabled and firmware.es_capable and asids.min_sev_asid > 1
                               if sev_es_enabled is None else sev_es_enabled)
        self.supported_vmsa_features = supported_vmsa_features if self.sev_es_enabled else 0
        self.vmsa_for = vmsa_for
        # struct kvm_sev_info
        vm_type = vm.vm_type
        self.need_init = vm_type in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM)  # svm_vm_init
        self.active = False
        self.es_active = False
        self.asid = 0
        self.handle = 0
        self.policy = 0
        self.vmsa_features = 0
        self.ghcb_version = 0
        self.regions: list[tuple[int, int]] = []
        self.vmsa_pages: dict[int, tuple[int, bytearray]] = {}
        self._platform = None

    # -- what a kernel offers -----------------------------------------------------------
    @property
    def vm_types(self) -> frozenset:
        """KVM_CAP_VM_TYPES bits this model's kernel would advertise (sev_set_cpu_caps)."""
        types = {KVM_X86_DEFAULT_VM}
        if self.sev_enabled:
            types.add(KVM_X86_SEV_VM)
        if self.sev_es_enabled:
            types.add(KVM_X86_SEV_ES_VM)
        return frozenset(types)

    @property
    def key(self):
        """The guest's memory key (firmware model), once LAUNCH_START made one."""
        return self.firmware.guest_key(self.handle) if self.handle else None

    def _guest(self, name: str) -> None:
        """sev_guest(kvm): every command but INIT needs an initialized SEV VM."""
        if not self.sev_enabled:
            raise _refuse(name, errno.ENOTTY, "KVM has no SEV (sev_mem_enc_ioctl: !sev_enabled)")
        if not self.active:
            raise _refuse(name, errno.ENOTTY, "the VM is not an SEV guest: KVM_SEV_INIT / "
                          "KVM_SEV_INIT2 first")

    def _pin(self, name: str, gpa: int, length: int) -> list:
        """sev_pin_memory: (gpa, writable view) pieces; EINVAL if empty, ENOMEM if unbacked."""
        if length <= 0 or gpa < 0:
            raise _refuse(name, errno.EINVAL, f"empty or negative range {gpa:#x}+{length:#x}")
        pieces, pos, end = [], gpa, gpa + length
        while pos < end:
            region = next((r for r in self.vm.regions if r.contains(pos)), None)
            if region is None:
                raise _refuse(name, errno.ENOMEM, f"guest-physical {pos:#x} is not backed by a "
                              "memory slot (pin_user_pages_fast fails)")
            n = min(end, region.gpa + region.size) - pos
            off = pos - region.gpa
            pieces.append((pos, region.view[off:off + n]))
            pos += n
        return pieces

    def _touched(self, gpa: int, length: int) -> None:
        """The firmware rewrote guest memory in place: drop any code the CPU model cached."""
        self.vm.flush_code(gpa, length)

    @staticmethod
    def _blob(name: str, what: str, data) -> bytes:
        """psp_copy_user_blob: a present blob must be 1..SEV_FW_BLOB_MAX_SIZE bytes."""
        if not data or len(data) > SEV_FW_BLOB_MAX_SIZE:
            raise _refuse(name, errno.EINVAL, f"{what} is {len(data or b'')} bytes; "
                          f"1..{SEV_FW_BLOB_MAX_SIZE} allowed")
        return bytes(data)

    # -- init -----------------------------------------------------------------------------
    def init(self, mode: str, *, vmsa_features: int = 0, ghcb_version: int = 0) -> str:
        if mode not in MODE_VM_TYPE:
            raise UsageError(f"unknown SEV mode {mode!r}: choose sev or sev-es")
        vm_type = self.vm.vm_type
        if vm_type == KVM_X86_DEFAULT_VM:
            name = "KVM_SEV_INIT" if mode == "sev" else "KVM_SEV_ES_INIT"
            if vmsa_features or ghcb_version:
                raise UsageError(f"{name} cannot set VMSA features or the GHCB version "
                                 "(KVM fixes 0 and v1); use an SEV VM type and KVM_SEV_INIT2")
            if not self.sev_enabled or (mode == "sev-es" and not self.sev_es_enabled):
                raise _refuse(name, errno.ENOTTY, f"KVM has no {mode.upper()} "
                              "(sev_mem_enc_ioctl)")
            # sev_guest_init: the legacy commands always use the minimal GHCB protocol
            return self._guest_init(name, es=mode == "sev-es", vmsa_features=0,
                                    ghcb_version=GHCB_VERSION_MIN if mode == "sev-es" else 0)
        name = "KVM_SEV_INIT2"
        if not self.sev_enabled:
            raise _refuse(name, errno.ENOTTY, "KVM has no SEV (sev_mem_enc_ioctl)")
        # sev_guest_init2
        if not self.need_init:
            raise _refuse(name, errno.EINVAL, "KVM_SEV_INIT2 only once, and only on a VM created "
                          "with an SEV VM type")
        if vm_type not in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM):
            raise _refuse(name, errno.EINVAL, f"VM type {vm_type} is not SEV or SEV-ES")
        if vm_type != MODE_VM_TYPE[mode]:
            raise UsageError(f"a VM of type {vm_type} cannot be initialized for {mode}")
        return self._guest_init(name, es=vm_type == KVM_X86_SEV_ES_VM,
                                vmsa_features=vmsa_features, ghcb_version=ghcb_version)

    def _guest_init(self, name: str, *, es: bool, vmsa_features: int, ghcb_version: int,
                    flags: int = 0) -> str:
        """__sev_guest_init."""
        valid = self.supported_vmsa_features if es else 0
        if self.vm.vcpus:
            raise _refuse(name, errno.EINVAL, "vCPUs already exist; SEV init must come first")
        if flags:
            raise _refuse(name, errno.EINVAL, "kvm_sev_init.flags must be 0")
        if vmsa_features & ~valid:
            raise _refuse(name, errno.EINVAL, f"VMSA features {vmsa_features:#x} not in the "
                          f"supported set {valid:#x}")
        if ghcb_version > GHCB_VERSION_MAX or (not es and ghcb_version):
            raise _refuse(name, errno.EINVAL, f"GHCB version {ghcb_version} not allowed "
                          f"(max {GHCB_VERSION_MAX}; 0 for plain SEV)")
        if self.active:
            raise _refuse(name, errno.EINVAL, "the VM is already an SEV guest")
        # sev_asid_new: ES guests take 1..min_sev_asid-1, SEV guests min_sev_asid..max
        asids = self.firmware.asids
        span = asids.range_for(es)
        if not len(span):
            raise _refuse(name, errno.ENOTTY, f"no {'SEV-ES' if es else 'SEV'} ASIDs exist "
                          "(CPUID 0x8000001F ECX/EDX)")
        asid = asids.allocate(es, name)  # EBUSY when exhausted even after recycling
        try:
            with _firmware(name):
                self.firmware.ensure_init()  # sev_platform_init
        except SevError:
            asids.free(asid)
            raise
        self.active, self.es_active, self.asid = True, es, asid
        self.vmsa_features = vmsa_features
        self.ghcb_version = ghcb_version or (GHCB_VERSION_DEFAULT if es else 0)
        self.need_init = False
        return name

    # -- regions -----------------------------------------------------------------------------
    def register_region(self, gpa: int, size: int) -> None:
        """sev_mem_enc_register_region: pins (and remembers) the range."""
        name = "KVM_MEMORY_ENCRYPT_REG_REGION"
        self._guest(name)
        self._pin(name, gpa, size)
        self.regions.append((gpa, size))

    def unregister_region(self, gpa: int, size: int) -> None:
        """sev_mem_enc_unregister_region: exactly a registered (addr, size), else EINVAL."""
        name = "KVM_MEMORY_ENCRYPT_UNREG_REGION"
        self._guest(name)
        if (gpa, size) not in self.regions:
            raise _refuse(name, errno.EINVAL, f"{gpa:#x}+{size:#x} is not a registered region")
        self.regions.remove((gpa, size))

    # -- launch ---------------------------------------------------------------------------------
    def launch_start(self, policy: int, *, handle: int = 0, dh_cert: bytes | None = None,
                     session: bytes | None = None) -> int:
        """sev_launch_start: LAUNCH_START on the firmware, then ACTIVATE with the VM's ASID."""
        name = "KVM_SEV_LAUNCH_START"
        self._guest(name)
        if dh_cert is not None:
            dh_cert = self._blob(name, "the DH certificate", dh_cert)
        if session is not None:
            session = self._blob(name, "the session blob", session)
        with _firmware(name):
            new = self.firmware.launch_start(int(policy), dh_cert, session, handle)
            try:
                self.firmware.activate(new, self.asid)  # sev_bind_asid
            except SevError:
                self.firmware.decommission(new)  # sev_decommission
                raise
        self.handle, self.policy = new, int(policy)
        return new

    def launch_update_data(self, gpa: int, length: int) -> None:
        """sev_launch_update_data: one firmware call per contiguous piece, in place."""
        name = "KVM_SEV_LAUNCH_UPDATE_DATA"
        self._guest(name)
        for piece_gpa, view in self._pin(name, gpa, length):
            with _firmware(name):
                self.firmware.launch_update_data(self.handle, piece_gpa, view)
            self._touched(piece_gpa, len(view))

    def launch_update_vmsa(self) -> None:
        """sev_launch_update_vmsa: for every vCPU, sync the VMSA and encrypt it."""
        name = "KVM_SEV_LAUNCH_UPDATE_VMSA"
        if not (self.sev_enabled and self.active and self.es_active):  # sev_es_guest
            raise _refuse(name, errno.ENOTTY, "not an SEV-ES guest")
        for index, vcpu in enumerate(self.vm.vcpus):
            if vcpu.guest_debug:  # __sev_launch_update_vmsa
                raise _refuse(name, errno.EINVAL, "KVM_SET_GUEST_DEBUG is on for this vCPU")
            page = bytearray(self._build_vmsa(name, vcpu))
            if len(page) != PAGE:
                raise UsageError(f"a VMSA page is {PAGE} bytes, the builder gave {len(page)}")
            dr7 = int.from_bytes(page[VMSA_DR7:VMSA_DR7 + 8], "little")
            if dr7 & ~DR7_FIXED_1:  # sev_es_sync_vmsa
                raise _refuse(name, errno.EINVAL, f"DR7 {dr7:#x} has breakpoints set")
            spa = VMSA_SPA_BASE - index * PAGE
            with _firmware(name):
                self.firmware.launch_update_vmsa(self.handle, spa, memoryview(page))
            self.vmsa_pages[index] = (spa, page)

    def _build_vmsa(self, name: str, vcpu) -> bytes:
        """sev_es_sync_vmsa: the page from the vCPU's state (``launch.vmsa_page_for_vcpu``)."""
        from .launch import vmsa_page_for_vcpu

        fpu = self.vm.vm_type != KVM_X86_DEFAULT_VM  # INIT2 VMs copy x87/SSE
        builder = self.vmsa_for or vmsa_page_for_vcpu
        try:
            return builder(vcpu, vmsa_features=self.vmsa_features, fpu=fpu)
        except ValueError as e:  # build_vmsa refuses what sev_es_sync_vmsa refuses
            raise _refuse(name, errno.EINVAL, str(e)) from None

    def launch_measure(self, length: int) -> tuple[int, bytes]:
        """sev_launch_measure: length 0 queries (firmware INVALID_LEN + the length)."""
        name = "KVM_SEV_LAUNCH_MEASURE"
        self._guest(name)
        if length > SEV_FW_BLOB_MAX_SIZE:
            raise _refuse(name, errno.EINVAL, f"buffer of {length} bytes exceeds "
                          f"SEV_FW_BLOB_MAX_SIZE ({SEV_FW_BLOB_MAX_SIZE})")
        with _firmware(name):
            if length == 0:
                try:
                    self.firmware.launch_measure(self.handle, 0)
                except SevError as e:
                    if e.fw_error != SevStatus.INVALID_LEN:
                        raise
                return MEASUREMENT_LEN, b""
            m = self.firmware.launch_measure(self.handle, length)
        raw = m.to_bytes()
        return len(raw), raw

    def launch_secret(self, header: bytes, data: bytes, gpa: int) -> None:
        """sev_launch_secret: the target must be one contiguous piece of memory."""
        name = "KVM_SEV_LAUNCH_SECRET"
        self._guest(name)
        pieces = self._pin(name, gpa, len(data) if data else 0)
        if len(pieces) != 1:
            raise _refuse(name, errno.EINVAL, "the secret's target is not contiguous")
        trans = self._blob(name, "the transport data", data)
        hdr = self._blob(name, "the packet header", header)
        with _firmware(name):
            self.firmware.launch_secret(self.handle, hdr, trans, gpa, pieces[0][1])
        self._touched(gpa, len(trans))

    def launch_finish(self) -> None:
        name = "KVM_SEV_LAUNCH_FINISH"
        self._guest(name)
        with _firmware(name):
            self.firmware.launch_finish(self.handle)

    def guest_status(self) -> GuestStatusInfo:
        name = "KVM_SEV_GUEST_STATUS"
        self._guest(name)
        with _firmware(name):
            st = self.firmware.guest_status(self.handle)
        return GuestStatusInfo(st.handle, st.policy, st.state)

    # -- debug --------------------------------------------------------------------------------
    def dbg_decrypt(self, gpa: int, length: int) -> bytes:
        """sev_dbg_crypt(dec): page by page; __sev_dbg_decrypt widens to 16-byte granules."""
        name = "KVM_SEV_DBG_DECRYPT"
        self._guest(name)
        if length <= 0:
            raise _refuse(name, errno.EINVAL, "empty range")
        out, pos, end = [], gpa, gpa + length
        while pos < end:
            n = min(PAGE - pos % PAGE, end - pos)
            start = pos & ~15
            span = ((pos + n + 15) & ~15) - start
            cipher = b"".join(bytes(v) for _, v in self._pin(name, start, span))
            with _firmware(name):
                plain = self.firmware.dbg_decrypt(self.handle, start, cipher)
            out.append(plain[pos - start:pos - start + n])
            pos += n
        return b"".join(out)

    def dbg_encrypt(self, gpa: int, data: bytes) -> None:
        """sev_dbg_crypt(enc): unaligned pieces are read-modify-written via DBG_DECRYPT."""
        name = "KVM_SEV_DBG_ENCRYPT"
        self._guest(name)
        data = bytes(data)
        if not data:
            raise _refuse(name, errno.EINVAL, "empty data")
        pos, end = gpa, gpa + len(data)
        while pos < end:
            n = min(PAGE - pos % PAGE, end - pos)
            start = pos & ~15
            span = ((pos + n + 15) & ~15) - start
            pieces = self._pin(name, start, span)
            chunk = data[pos - gpa:pos - gpa + n]
            with _firmware(name):
                if start != pos or span != n:  # __sev_dbg_encrypt_user's bounce page
                    cipher = b"".join(bytes(v) for _, v in pieces)
                    plain = bytearray(self.firmware.dbg_decrypt(self.handle, start, cipher))
                    plain[pos - start:pos - start + n] = chunk
                    chunk = bytes(plain)
                new = self.firmware.dbg_encrypt(self.handle, start, chunk)
            off = 0
            for _, view in pieces:
                view[:] = new[off:off + len(view)]
                off += len(view)
            self._touched(start, span)
            pos += n

    # -- platform and teardown ---------------------------------------------------------------
    def platform(self) -> SimulatedSevDevice:
        if self._platform is None:
            self._platform = SimulatedSevDevice(self.firmware)
        return self._platform

    def close(self) -> None:
        """sev_vm_destroy: unpin regions, DEACTIVATE + DECOMMISSION, free the ASID."""
        if not self.active:
            return
        self.regions.clear()
        if self.handle:
            for step in (self.firmware.deactivate, self.firmware.decommission):
                with contextlib.suppress(SevError):  # sev_unbind_asid ignores them too
                    step(self.handle)
        self.firmware.asids.free(self.asid)
        self.active = False
        self.handle = self.asid = 0

    def __repr__(self):
        return (f"KvmSevModel(active={self.active}, es={self.es_active}, asid={self.asid}, "
                f"handle={self.handle})")


class SimulatedSevDevice(SevPlatformInterface):
    """/dev/sev over the firmware model, with sev-dev.c's own checks (EPERM, EBUSY)."""

    backend = "sim"

    def __init__(self, firmware, *, writable: bool = True):
        self.firmware = firmware
        self.writable = writable

    def _need_writable(self, name: str) -> None:
        if not self.writable:
            raise _refuse(name, errno.EPERM, f"/dev/sev is open read-only; {name} needs it "
                          "writable")

    def status(self):
        """sev_ioctl_do_platform_status."""
        with _firmware("SEV_PLATFORM_STATUS"):
            return self.firmware.platform_status()

    def get_id(self) -> bytes:
        """sev_ioctl_do_get_id2 (the firmware reports the length; 64 bytes)."""
        with _firmware("SEV_GET_ID2"):
            return self.firmware.get_id()

    def pek_csr(self) -> bytes:
        """sev_ioctl_do_pek_csr: writable fd; INIT on first use."""
        self._need_writable("SEV_PEK_CSR")
        with _firmware("SEV_PEK_CSR"):
            return self.firmware.pek_csr()

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """sev_ioctl_do_pdh_export: a read-only fd only works once the platform is INIT."""
        if self.firmware.state != PlatformState.INIT:
            self._need_writable("SEV_PDH_CERT_EXPORT")
        with _firmware("SEV_PDH_CERT_EXPORT"):
            return self.firmware.pdh_cert_export()

    def _factory_reset(self) -> None:
        """sev_ioctl_do_reset: EPERM read-only, EBUSY while WORKING, SHUTDOWN if INIT."""
        self._need_writable("SEV_FACTORY_RESET")
        with _firmware("SEV_FACTORY_RESET"):
            self.firmware.factory_reset()

    def _pek_gen(self) -> None:
        self._need_writable("SEV_PEK_GEN")
        with _firmware("SEV_PEK_GEN"):
            self.firmware.pek_gen()

    def _pdh_gen(self) -> None:
        self._need_writable("SEV_PDH_GEN")
        with _firmware("SEV_PDH_GEN"):
            self.firmware.pdh_gen()

    def _pek_cert_import(self, pek_cert: bytes, oca_cert: bytes) -> None:
        name = "SEV_PEK_CERT_IMPORT"
        self._need_writable(name)
        pek = KvmSevModel._blob(name, "the PEK certificate", pek_cert)
        oca = KvmSevModel._blob(name, "the OCA certificate", oca_cert)
        with _firmware(name):
            self.firmware.pek_cert_import(pek, oca)

    def __repr__(self):
        return f"SimulatedSevDevice({self.firmware!r}, writable={self.writable})"


__all__ = ["VMSA_SPA_BASE", "KvmSevModel", "SimulatedSevDevice"]
