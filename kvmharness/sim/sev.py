"""SEV in the simulator: VM types 2/3, KVM's SEV commands, and memory encryption.

What this adds to the ``sim`` backend (the SEV-ES part is in ``seves.py``):

* **VM types and commands.**  ``SimSystem`` offers KVM_X86_SEV_VM (2) and
  KVM_X86_SEV_ES_VM (3) besides the default VM (legacy ``KVM_SEV_INIT`` on a
  default VM works too).  ``SimVm.sev_interface()`` returns one cached
  :class:`~kvmharness.sev.kvm_model.KvmSevModel` per VM, over one simulated
  firmware per ``SimSystem`` whose ASIDs come from the system's CPUID
  0x8000001F (:func:`firmware_for`).
* **Memory encryption.**  The key is the firmware's per-guest key
  (``memcrypt.GuestKey``: AES-128-XTS, tweaked by the physical address).  The
  host-visible RAM (the slot's mmap, what ``vm.read`` and the firmware see)
  holds what the memory controller would store: ciphertext for every page the
  guest writes through a C-bit mapping, plaintext for shared (C=0) writes.
  The guest sees plaintext through a *plaintext alias* of its RAM, a second
  buffer mapped in the engine at :data:`SHADOW_BASE` + gpa.
* **The C-bit.**  The engine has 40 physical address bits, so C-bit 51 in a
  PTE would be a reserved-bit #PF inside unicorn.  Every SEV vCPU's engine
  therefore runs with ``UC_TLB_VIRTUAL`` and a TLB-fill hook
  (:class:`SevMmu`) that walks the guest's 4-level tables itself: page-table
  entries are always read from the plaintext alias (table walks are private
  under SEV), the C-bit is stripped, and a private access (C=1, and every
  instruction fetch) is mapped to the plaintext alias while a shared one (C=0)
  goes to the host-visible RAM.  Only the present and (for writes) the R/W
  bits are checked; U/S, NX and reserved bits are not (the harness's guests
  run at CPL0 and do not rely on them).  ``core.translate`` defers to the same
  walk, so exception delivery, instruction decoding and the IO/MMIO helpers
  read and write what the guest would.

Why the two views are synchronised at run boundaries and not by write hooks:
a ``UC_HOOK_MEM_WRITE`` over RAM costs one Python call (~1 us) per guest store,
including every PUSH and REP STOS; the host, however, can look at guest memory
only between ``KVM_RUN`` calls (the model is single-threaded; the in-kernel
VMGEXIT handler reads and writes only shared pages -- the GHCB and its scratch
area are shared on hardware too).  So at the start of each ``run()`` every page
the host wrote since the last sync is decrypted into the alias, and when
``run()`` returns every page the guest wrote privately is encrypted back into
host RAM.  Which pages: the guest's through the TLB (a private page is filled
read/execute-only until the first store to it, which makes unicorn fill it
again for the write; the TLB is flushed after each sync to re-arm that), the
host's through ``vm.flush_code``, which every host write path calls
(``SimVm.write`` and KvmSevModel's in-place commands) -- a write straight into
a region's ``view`` is not seen until ``vm.flush_code`` names it.  A
4 KiB memcmp against snapshots then skips pages that did not really change, so
AES runs only over changed pages and an exit where nobody wrote costs nothing.
Known limit of this choice: a page written both privately and shared in the
same run keeps the private write (hardware would keep both, 16-byte granules
apart).  Memory added to the VM after the first SEV run is not encrypted.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import unicorn

from ..backend import KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM
from ..x86 import CPUID_SEV, sev_cpuid_leaf
from . import core as corem
from .vcpu import SimVcpu

SEV_VM_TYPES = frozenset({KVM_X86_DEFAULT_VM, KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM})
#: where the plaintext alias of guest RAM sits in the engine's physical space (below the
#: model CPU's 40-bit limit and the host pages at core.HOST_BASE, above any guest RAM)
SHADOW_BASE = 0x80_0000_0000
MSR_SEV_STATUS = 0xC0010131
MSR_SEV_ES_GHCB = 0xC0010130
PAGE = 4096
_ADDR = 0x000F_FFFF_FFFF_F000
_Q = struct.Struct("<Q")
_PROT_RX = unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC
_HOST_LO, _HOST_HI = corem.HOST_BASE, corem.HOST_BASE + corem.HOST_SIZE
_UNTIL_LO, _UNTIL_HI = (corem.UNTIL & ~0xFFF) - 0x1000, (corem.UNTIL & ~0xFFF) + 0x1000
_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_CR3 = unicorn.x86_const.UC_X86_REG_CR3


# -- system / VM level ---------------------------------------------------------------------

def sev_leaf_of(system):
    """The CPUID 0x8000001F the system reports, or the model's default (C-bit 51)."""
    leaf = system.capabilities.supported_cpuid.lookup(CPUID_SEV)
    return leaf if leaf is not None and leaf.eax >> 1 & 1 else sev_cpuid_leaf()


def firmware_for(system):
    """The simulated SEV firmware of one SimSystem (one chip per host), made on first use."""
    fw = system.sev_firmware
    if fw is None:
        from ..sev.kvm_model import firmware_from_cpuid

        fw = firmware_from_cpuid(sev_leaf_of(system))
        system.sev_firmware = fw
    return fw


def sev_interface(vm):
    """``SimVm.open_sev_interface()``: the VM's KvmSevModel (cached: it holds the launch state)."""
    model = vm._sev_model
    if model is None:
        from ..sev.kvm_model import KvmSevModel

        model = KvmSevModel(vm, firmware_for(vm.system))
        vm._sev_model = model
    return model


def c_bit_of(system) -> int:
    return sev_leaf_of(system).ebx & 0x3F


class SevMemory:
    """One VM's encrypted RAM: the plaintext alias of every region and the sync state.

    Dirty tracking (see the module docstring): the guest side through the TLB -- a
    private page is filled read/execute-only until the guest first stores to it, which
    makes unicorn fill it again for the write and marks it dirty (the TLBs are flushed
    after each sync to re-arm that); the host side through ``vm.flush_code``, which
    every host write path calls (``SimVm.write``, KvmSevModel's in-place commands).
    So an exit where neither side wrote costs no memcmp and no AES at all.
    """

    def __init__(self, vm, key):
        self.vm = vm
        self.key = key
        self.regions = []  # (gpa, size, host address, alias mmap, alias address, plain snap, cipher snap)
        self.bytes_decrypted = 0
        for gpa, size, addr, _ro in vm._map_list:
            alias = mmap.mmap(-1, size)
            alias_addr = ctypes.addressof(ctypes.c_char.from_buffer(alias))
            host = (ctypes.c_char * size).from_address(addr)
            plain = key.decrypt(gpa, bytes(host))
            alias[:] = plain
            plain_snap = (ctypes.c_char * size).from_buffer_copy(plain)
            cipher_snap = (ctypes.c_char * size).from_buffer_copy(host)
            self.regions.append((gpa, size, addr, alias, alias_addr, plain_snap, cipher_snap))
            self.bytes_decrypted += size
        self.bytes_encrypted = 0
        self.guest_dirty = set()  # page gpas the guest may have written privately
        self.host_dirty = set()  # page gpas the host wrote
        self.cores = []  # the engines whose TLBs hold write permission to dirty pages
        host_flush = vm.flush_code

        def flush_code(gpa, size, _host_flush=host_flush):
            _host_flush(gpa, size)
            for page in range(gpa & ~0xFFF, gpa + size, PAGE):
                self.host_dirty.add(page)

        vm.flush_code = flush_code  # this VM's host writes now also mark pages for decryption

    def close(self) -> None:
        """SimVm.close(): drop the alias mappings and snapshots (3x the VM's RAM)."""
        regions, self.regions = self.regions, []
        for r in regions:
            try:
                r[3].close()  # the alias mmap
            except BufferError:
                pass
        self.cores.clear()
        self.vm = None

    def region(self, gpa: int):
        for r in self.regions:
            if r[0] <= gpa < r[0] + r[1]:
                return r
        return None

    def read_private(self, gpa: int, n: int) -> bytes | None:
        """Plaintext as the guest reads it privately (None: not RAM)."""
        r = self.region(gpa)
        if r is None or gpa + n > r[0] + r[1]:
            return None
        off = gpa - r[0]
        return r[3][off:off + n]

    def _copy_changed(self, pages, to_host: bool) -> int:
        """Re-encrypt (guest -> host RAM) or re-decrypt (host RAM -> guest alias) every page of
        ``pages`` whose source side changed since the last sync; returns the bytes moved.

        Each region keeps a snapshot of both sides, so a page marked dirty but unchanged
        costs one memcmp and no AES."""
        moved = 0
        key = self.key
        for page in sorted(pages):
            r = self.region(page)
            if r is None:
                continue
            gpa, _size, addr, _alias, alias_addr, plain_snap, cipher_snap = r
            off = page - gpa
            host, alias = addr + off, alias_addr + off
            psnap = ctypes.addressof(plain_snap) + off
            csnap = ctypes.addressof(cipher_snap) + off
            src, src_snap = (alias, psnap) if to_host else (host, csnap)
            if not _memcmp(src, src_snap, PAGE):
                continue
            if to_host:
                plain = ctypes.string_at(alias, PAGE)
                cipher = key.encrypt(page, plain)
                ctypes.memmove(host, cipher, PAGE)
            else:
                cipher = ctypes.string_at(host, PAGE)
                plain = key.decrypt(page, cipher)
                ctypes.memmove(alias, plain, PAGE)
            ctypes.memmove(psnap, plain, PAGE)
            ctypes.memmove(csnap, cipher, PAGE)
            moved += PAGE
            if not to_host:
                for v in self.vm.vcpus:
                    v.core.flush_code(SHADOW_BASE + page, PAGE)
                    v.code_changed()
        return moved

    def enter_sync(self) -> None:
        """Before the guest runs: decrypt every page the host changed into the alias."""
        if self.host_dirty:
            pages, self.host_dirty = self.host_dirty, set()
            self.bytes_decrypted += self._copy_changed(pages, to_host=False)

    def exit_sync(self) -> None:
        """After the guest ran: encrypt every page it changed privately into host RAM."""
        if not self.guest_dirty:
            return
        pages, self.guest_dirty = self.guest_dirty, set()
        self.bytes_encrypted += self._copy_changed(pages, to_host=True)
        for core in self.cores:  # re-arm the first-write fills: a CR3 reload flushes the TLB
            if core.uc is not None and core.in_guest:
                core.set_reg(_CR3, core.reg(_CR3))


class SevMmu:
    """The guest page-table walk of an SEV vCPU (see the module docstring)."""

    def __init__(self, core, mem: SevMemory, c_bit: int):
        self.core = core
        self.mem = mem
        self.c_mask = 1 << c_bit
        self.addr_mask = _ADDR & ~self.c_mask
        self.fills = 0

    def install(self, core) -> None:
        """A core build hook: plaintext alias mapped, virtual TLB, our fill hook."""
        uc = core.uc
        for gpa, size, _addr, _alias, alias_addr, _p, _c in self.mem.regions:
            uc.mem_map_ptr(SHADOW_BASE + gpa, size, unicorn.UC_PROT_ALL, alias_addr)
        uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
        uc.hook_add(unicorn.UC_HOOK_TLB_FILL, self._fill)

    def walk(self, linear: int, write: bool = False):
        """(gpa, private, #PF error code): gpa None if not mapped."""
        core = self.core
        if not core.cr(0) & (1 << 31):
            return linear, True, 0
        read = self.mem.read_private
        table = core.cr(3) & self.addr_mask
        private = True
        for shift in (39, 30, 21, 12):
            raw = read(table + 8 * ((linear >> shift) & 0x1FF), 8)
            if raw is None:
                return None, False, (2 if write else 0)
            (entry,) = _Q.unpack(raw)
            if not entry & 1:
                return None, False, (2 if write else 0)
            if write and not entry & 2:
                return None, False, 3
            private = bool(entry & self.c_mask)
            if shift in (30, 21) and entry & 0x80:
                mask = (1 << shift) - 1
                return (entry & self.addr_mask & ~mask) | (linear & mask), private, 0
            table = entry & self.addr_mask
        return table | (linear & 0xFFF), private, 0

    def engine_address(self, gpa: int, private: bool) -> int:
        if private and self.mem.region(gpa) is not None:
            return SHADOW_BASE + gpa
        return gpa

    def translate(self, linear: int, *, write: bool = False):
        """core.translate's contract: (engine-physical address or None, #PF error code)."""
        gpa, private, err = self.walk(linear, write)
        if gpa is None:
            return None, err
        paddr = self.engine_address(gpa, private)
        if paddr >= SHADOW_BASE:  # the model may write through it (exception frames, INS)
            self.mem.guest_dirty.add(gpa & ~0xFFF)
        return paddr, 0

    def _fill(self, _uc, vaddr, access, entry, _ud):
        self.fills += 1
        write = access == unicorn.UC_MEM_WRITE
        gpa, private, _err = self.walk(vaddr, write)
        if gpa is None:
            if _HOST_LO <= vaddr < _HOST_HI or _UNTIL_LO <= vaddr < _UNTIL_HI:
                # the host stub and unicorn's stop address: looked up by the engine itself
                # (e.g. around an intercept), never by the guest -- identity
                entry.paddr = vaddr
                entry.perms = unicorn.UC_PROT_ALL
                return True
            return False
        # Instruction fetches are always private under SEV; but unicorn 2.1.4 also reports
        # some data loads as UC_MEM_FETCH (seen: a load from the shared GHCB page right
        # after a TLB flush), so the C-bit decides for fetches too (deviation: code on a
        # shared page would run from host memory, unencrypted)
        paddr = self.engine_address(gpa, private)
        entry.paddr = paddr
        if paddr >= SHADOW_BASE:  # private RAM: writable only once marked dirty
            page = gpa & ~0xFFF
            dirty = self.mem.guest_dirty
            if write:
                dirty.add(page)
            entry.perms = unicorn.UC_PROT_ALL if page in dirty else _PROT_RX
        else:
            entry.perms = unicorn.UC_PROT_ALL
        return True


# -- the SEV vCPU ----------------------------------------------------------------------------

class SevVcpu(SimVcpu):
    """A vCPU of an SEV guest: encrypted memory once launched, the SEV_STATUS MSR."""

    sev_status = 1  # SEV_STATUS (0xC0010131) bit 0: SEV enabled
    mmu_class = SevMmu  # the guest walk; SEV-SNP's adds the RMP check (sim/snp.py)

    def __init__(self, vm, vcpu_id: int, asid: int):
        model = vm._sev_model
        super().__init__(vm, vcpu_id, model.asid or asid)
        self.sev_model = model
        self.sev_memory = None
        self.mmu = None

    # the VM's memory state is shared by its vCPUs
    def _sev_setup(self) -> None:
        vm = self.vm
        mem = vm._sev_memory
        if mem is None:
            mem = vm._sev_memory = SevMemory(vm, self.sev_model.key)
        self.sev_memory = mem
        if self.in_guest:
            self.load_vmcb_state()
        core = self.core
        self.mmu = self.mmu_class(core, mem, c_bit_of(vm.system))
        core.build_hooks.append(self.mmu.install)
        core.mmu = self.mmu
        mem.cores.append(core)
        core.io_sites.clear()
        core.build()
        self.code_changed()

    def run(self):
        if self.sev_memory is None:
            if not (self.sev_model.active and self.sev_model.handle):
                return super().run()  # not launched yet: a plain guest
            self._sev_setup()
        mem = self.sev_memory
        mem.enter_sync()
        try:
            return super().run()
        finally:
            mem.exit_sync()

    def _msr(self, rip):
        core = self.core
        index = core.reg(unicorn.x86_const.UC_X86_REG_RCX) & 0xFFFFFFFF
        if index == MSR_SEV_STATUS and self.vm.msr_policy.allowed(index, False):
            # not a KVM exit on hardware (the CPU answers): nothing is traced
            write = self._code_bytes(rip, 2) == b"\x0f\x30"
            if write:  # read-only MSR
                self._inject_now(13, 0)
                return
            X = unicorn.x86_const
            core.set_reg(X.UC_X86_REG_RAX, self.sev_status)
            core.set_reg(X.UC_X86_REG_RDX, 0)
            core.set_reg(X.UC_X86_REG_RIP, rip + 2)
            return
        super()._msr(rip)

    def private_read(self, gpa: int, n: int) -> bytes:
        """What the guest reads privately at ``gpa`` (the plaintext; a debugging aid)."""
        if self.sev_memory is None:
            return self.vm.read(gpa, n)
        return self.sev_memory.read_private(gpa, n)


__all__ = [
    "SEV_VM_TYPES",
    "SHADOW_BASE",
    "SevMemory",
    "SevMmu",
    "SevVcpu",
    "firmware_for",
    "sev_interface",
]
