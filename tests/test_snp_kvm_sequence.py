"""The ioctls the kvm backend issues for an SEV-SNP launch, beside the kernel's own SNP users.

As tests/test_sev_ioctl_sequence.py does for SEV: this host has no SNP, so the syscall is
replaced at ``kvm._ffi.IoctlRecorder`` and the *real* kvm backend code (``kvm/system.py``,
``kvm/vm.py``, ``kvm/vcpu.py``, ``kvm/snp.py``, ``Machine``) runs against
:class:`FakeSnpKernel`, which answers as Linux would from the kvmharness models:
``KVM_SEV_INIT2`` / ``KVM_SEV_SNP_LAUNCH_*`` and ``KVM_SET_MEMORY_ATTRIBUTES`` through
``snp.launch.KvmSnpVm`` (KVM's sev.c) over ``snp.firmware.SimulatedSnpFirmware`` (the
PSP), guest_memfd as a memfd of the asked size, the VMSA built from the vCPU's
registers as ``sev_es_sync_vmsa`` does.  The firmware's launch digest is checked
against virtee/sev-snp-measure's ``gctx.py`` fed the same pages.

The recorded order is compared with the kernel's own SNP users:

* Linux KVM selftests, torvalds/linux (tools/testing/selftests/kvm/lib/x86/sev.c and
  lib/kvm_util.c): ``vm_create`` with ``VM_SHAPE_SNP`` (the memslot with its guest_memfd:
  KVM_CREATE_GUEST_MEMFD, KVM_SET_USER_MEMORY_REGION2), ``kvm_arch_vm_post_create`` ->
  ``snp_vm_init`` (KVM_SEV_INIT2 with ``{0}``), the vCPU, then ``vm_sev_launch``:
  ``vm_enable_cap(KVM_CAP_EXIT_HYPERCALL, BIT(KVM_HC_MAP_GPA_RANGE))``,
  ``snp_vm_launch_start``, ``snp_vm_launch_update`` (``encrypt_region``: per range
  ``vm_mem_set_private`` then ``snp_launch_update_data``), ``snp_vm_launch_finish``.
* QEMU, qemu/qemu @ d4b976c0a81dc625ccd05e2b3075f353170669d4, target/i386/sev.c:
  ``sev_common_kvm_init`` (KVM_SEV_INIT2, then ``sev_snp_launch_start``), accel/kvm
  ``kvm_set_phys_mem`` (guest_memfd slot made private), ``sev_snp_launch_finish``:
  every queued range through ``sev_snp_launch_update`` (``kvm_set_memory_attributes_private``
  then KVM_SEV_SNP_LAUNCH_UPDATE ``while (update.len || ret == -EAGAIN)``; a CPUID page
  failure reported with ``sev_snp_cpuid_report_mismatches``), then KVM_SEV_SNP_LAUNCH_FINISH.

QEMU starts the launch before its memslots and vCPUs exist; the selftests (and
kvmharness's Machine, which owns its RAM slot from construction) after.  The order both
share -- INIT2, LAUNCH_START, (attributes, UPDATE...)*, FINISH, guest_memfd right before
its slot -- is what the test pins.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from kvmharness.backend import KVM_X86_DEFAULT_VM, KVM_X86_SNP_VM
from kvmharness.errors import FeatureUnavailable, SevError
from kvmharness.snp.firmware import SimulatedSnpFirmware, cpuid_page, parse_cpuid_page
from kvmharness.snp.launch import KvmSnpVm, expected_digest
from kvmharness.snp.measure import PAGE_SIZE, PageType

K = pytest.importorskip("kvmharness.kvm._ffi", reason="the kvm backend needs cffi and libc")
gctx = pytest.importorskip("sevsnpmeasure.gctx", reason="sev-snp-measure (the [test] extra) "
                           "is the outside truth for the SNP launch digest")
ffi = K.ffi

from kvmharness.kvm.system import KvmSystem  # noqa: E402
from kvmharness.machine import Machine  # noqa: E402

SELFTESTS = ("torvalds/linux", "tools/testing/selftests/kvm/lib/x86/sev.c",
             "vm_create(VM_SHAPE_SNP) + snp_vm_init + vm_sev_launch (snp_vm_launch_start, "
             "snp_vm_launch_update: encrypt_region, snp_vm_launch_finish)")
QEMU = ("qemu/qemu d4b976c0a81d", "target/i386/sev.c + accel/kvm/kvm-all.c",
        "sev_common_kvm_init + kvm_set_phys_mem + sev_snp_launch_finish "
        "(sev_snp_launch_update per range)")


def selftests_order(ranges: int) -> list[str]:
    return (["KVM_CREATE_GUEST_MEMFD", "KVM_SET_USER_MEMORY_REGION2", "KVM_SEV_INIT2",
             "KVM_CREATE_VCPU", "KVM_ENABLE_CAP", "KVM_SEV_SNP_LAUNCH_START"]
            + ["KVM_SET_MEMORY_ATTRIBUTES", "KVM_SEV_SNP_LAUNCH_UPDATE"] * ranges
            + ["KVM_SEV_SNP_LAUNCH_FINISH"])


def qemu_order(ranges: int) -> list[str]:
    return (["KVM_SEV_INIT2", "KVM_SEV_SNP_LAUNCH_START",
             "KVM_CREATE_GUEST_MEMFD", "KVM_SET_USER_MEMORY_REGION2", "KVM_SET_MEMORY_ATTRIBUTES",
             "KVM_CREATE_VCPU"]
            + ["KVM_SET_MEMORY_ATTRIBUTES", "KVM_SEV_SNP_LAUNCH_UPDATE"] * ranges
            + ["KVM_SEV_SNP_LAUNCH_FINISH"])


LAUNCH = ("KVM_SEV_INIT2", "KVM_SEV_SNP_LAUNCH_START", "KVM_SET_MEMORY_ATTRIBUTES",
          "KVM_SEV_SNP_LAUNCH_UPDATE", "KVM_SEV_SNP_LAUNCH_FINISH")


def shared_core(steps: list[str]) -> list[str]:
    """The steps both references order alike: from INIT2 on, the launch commands and the
    attribute calls between LAUNCH_START and FINISH; repeats collapsed."""
    out: list[str] = []
    started = False
    for s in steps:
        started = started or s == "KVM_SEV_SNP_LAUNCH_START"
        if s not in LAUNCH or (s == "KVM_SET_MEMORY_ATTRIBUTES" and not started):
            continue
        if not out or out[-1] != s:
            out.append(s)
    return out


def _gctx_digest(pages) -> bytes:
    g = gctx.GCTX()
    for p in pages:
        if p.page_type == PageType.NORMAL:
            g.update_normal_pages(p.gpa, p.data)
        elif p.page_type == PageType.VMSA:
            g.update_vmsa_page(p.data)
        elif p.page_type == PageType.SECRETS:
            g.update_secrets_page(p.gpa)
        elif p.page_type == PageType.CPUID:
            g.update_cpuid_page(p.gpa)
        else:
            raise AssertionError(p.page_type)
    return g.ld()


# -- the fake kernel --------------------------------------------------------------------------

class FakeSnpKernel:
    """Linux with SEV-SNP, answered from KvmSnpVm (KVM's sev.c) over the SNP firmware model."""

    MMAP_SIZE = 3 * 4096

    def __init__(self, *, vm_types: int = 1 << KVM_X86_DEFAULT_VM | 1 << KVM_X86_SNP_VM,
                 max_pages_per_update: int | None = None):
        self.vm_types = vm_types
        self.max_pages = max_pages_per_update
        self.firmware = SimulatedSnpFirmware(host_pages=1 << 12)
        self.model: KvmSnpVm | None = None
        self.kvm_vm = None  # the backend's KvmVm (for the vCPUs' state at FINISH)
        self.gmem: dict[int, int] = {}  # fd -> size
        self.slot_uaddr = 0
        self.exit_hypercall = 0
        self.store: dict[tuple[int, str], bytes] = {}
        self.run_script: list = []  # KVM_RUN answers: callables(fake, run_fd) -> (ret, errno)
        self.vm_fd = -1

    def __call__(self, fd, request, arg, call):
        name = K.IOCTL_NAMES.get(request, "")
        handler = getattr(self, "_" + name.lower(), None)
        if handler is None:
            if name.startswith("KVM_SET_"):
                self.store[fd, name[8:]] = bytes(ffi.buffer(arg)) if arg != ffi.NULL else b""
                return 0, 0
            if name.startswith("KVM_GET_") and arg != ffi.NULL:
                buf = ffi.buffer(arg)
                buf[:] = self.store.get((fd, name[8:]), bytes(len(buf)))[:len(buf)].ljust(len(buf), b"\0")
                return 0, 0
            return -1, errno.ENOTTY
        return handler(fd, arg)

    # /dev/kvm
    def _kvm_get_api_version(self, fd, arg):
        return 12, 0

    def _kvm_get_vcpu_mmap_size(self, fd, arg):
        return self.MMAP_SIZE, 0

    def _kvm_check_extension(self, fd, arg):
        cap = int(ffi.cast("uintptr_t", arg))
        return {K.KVM_CAP_VM_TYPES: self.vm_types,
                K.KVM_CAP_EXIT_HYPERCALL: 1 << K.KVM_HC_MAP_GPA_RANGE,
                K.KVM_CAP_MEMORY_ATTRIBUTES: K.KVM_MEMORY_ATTRIBUTE_PRIVATE,
                K.KVM_CAP_GUEST_MEMFD: 1}.get(cap, 0), 0

    def _kvm_create_vm(self, fd, arg):
        vm_type = int(ffi.cast("uintptr_t", arg))
        if not self.vm_types >> vm_type & 1:
            return -1, errno.EINVAL
        vm = os.memfd_create("fake-kvm-vm", os.MFD_CLOEXEC)
        if vm_type == KVM_X86_SNP_VM:
            self.vm_fd = vm
        return vm, 0

    # the VM
    def _kvm_create_guest_memfd(self, fd, arg):
        g = ffi.cast("struct kvm_create_guest_memfd *", arg)
        if fd != self.vm_fd or not g.size or g.size % PAGE_SIZE or g.flags:  # kvm_gmem_create
            return -1, errno.EINVAL
        gfd = os.memfd_create("fake-kvm-gmem", os.MFD_CLOEXEC)
        os.ftruncate(gfd, g.size)
        self.gmem[gfd] = g.size
        return gfd, 0

    def _kvm_set_user_memory_region2(self, fd, arg):
        r = ffi.cast("struct kvm_userspace_memory_region2 *", arg)
        if (not r.flags & K.KVM_MEM_GUEST_MEMFD or r.guest_memfd not in self.gmem
                or r.guest_memfd_offset + r.memory_size > self.gmem[r.guest_memfd]
                or r.guest_phys_addr != 0):
            return -1, errno.EINVAL
        self.model = KvmSnpVm(self.firmware, r.memory_size)
        self.slot_uaddr = r.userspace_addr
        return 0, 0

    def _kvm_set_user_memory_region(self, fd, arg):
        # an SNP VM (kvm_arch_has_private_mem) needs KVM_SET_USER_MEMORY_REGION2 for gmem
        return (-1, errno.EINVAL) if fd == self.vm_fd else (0, 0)

    def _kvm_set_memory_attributes(self, fd, arg):
        a = ffi.cast("struct kvm_memory_attributes *", arg)
        if a.flags or a.attributes & ~K.KVM_MEMORY_ATTRIBUTE_PRIVATE:
            return -1, errno.EINVAL
        try:
            self.model.set_memory_attributes(a.address, a.size, bool(a.attributes))
        except SevError as e:
            return -1, e.errno
        return 0, 0

    def _kvm_enable_cap(self, fd, arg):
        c = ffi.cast("struct kvm_enable_cap *", arg)
        if c.cap == K.KVM_CAP_EXIT_HYPERCALL:
            if c.args[0] & ~(1 << K.KVM_HC_MAP_GPA_RANGE):
                return -1, errno.EINVAL
            self.exit_hypercall = c.args[0]
        return 0, 0

    def _kvm_create_vcpu(self, fd, arg):
        if fd == self.vm_fd:
            try:
                self.model.create_vcpu()
            except SevError as e:
                return -1, e.errno
        vcpu = os.memfd_create("fake-kvm-vcpu", os.MFD_CLOEXEC)
        os.ftruncate(vcpu, self.MMAP_SIZE)
        return vcpu, 0

    def _kvm_run(self, fd, arg):
        if not self.run_script:
            raise AssertionError("KVM_RUN beyond the script")
        return self.run_script.pop(0)(self, fd)

    # KVM_MEMORY_ENCRYPT_OP
    def _kvm_memory_encrypt_op(self, fd, arg):
        cmd = ffi.cast("struct kvm_sev_cmd *", arg)
        name = K.SEV_KVM_COMMANDS.get(cmd.id, ("?", None))[0]
        handler = getattr(self, "_" + name.lower(), None)
        if fd != self.vm_fd or handler is None:
            return -1, errno.ENOTTY
        try:
            handler(cmd)
        except SevError as e:
            cmd.error = (e.fw_error or 0) & 0xFFFFFFFF
            return -1, e.errno
        return 0, 0

    def _kvm_sev_init2(self, cmd):
        p = ffi.cast("struct kvm_sev_init *", cmd.data)
        self.model.sev_init2(vmsa_features=p.vmsa_features, flags=p.flags,
                             ghcb_version=p.ghcb_version)

    def _kvm_sev_snp_launch_start(self, cmd):
        p = ffi.cast("struct kvm_sev_snp_launch_start *", cmd.data)
        try:
            os.fstat(cmd.sev_fd)  # __sev_issue_cmd: fdget(argp->sev_fd)
        except OSError:
            raise SevError("KVM_SEV_SNP_LAUNCH_START", errno.EBADF, None, "sev_fd") from None
        self.model.launch_start(p.policy, gosvw=bytes(p.gosvw), flags=p.flags)

    def _kvm_sev_snp_launch_update(self, cmd):
        p = ffi.cast("struct kvm_sev_snp_launch_update *", cmd.data)
        length = p.len
        if self.max_pages and length > self.max_pages * PAGE_SIZE:
            length = self.max_pages * PAGE_SIZE  # kvm_gmem_populate may stop early
        src = (None if p.type == PageType.ZERO
               else bytes(ffi.buffer(ffi.cast("char *", p.uaddr), length)))
        try:
            r = self.model.launch_update(p.gfn_start, src, length, p.type, flags=p.flags)
        except SevError:
            back = getattr(self.model, "cpuid_copyback", None)
            if back is not None:  # sev_gmem_post_populate: the corrected table to the source
                ffi.memmove(ffi.cast("char *", p.uaddr), back[:PAGE_SIZE], PAGE_SIZE)
                self.model.cpuid_copyback = None
            raise
        done = length - r.len
        p.gfn_start += done // PAGE_SIZE
        p.len -= done
        if p.type != PageType.ZERO:
            p.uaddr += done

    def _kvm_sev_snp_launch_finish(self, cmd):
        from kvmharness.sev.launch import vmsa_page_for_vcpu

        p = ffi.cast("struct kvm_sev_snp_launch_finish *", cmd.data)
        vmsas = [vmsa_page_for_vcpu(v, vmsa_features=self.model.vmsa_features, fpu=True)
                 for v in self.kvm_vm.vcpus]  # sev_es_sync_vmsa from each vCPU's state
        self.model.launch_finish(vmsas, host_data=bytes(p.host_data), flags=p.flags)


def snp_machine(tmp_path, kernel: FakeSnpKernel, guest: str = "snp-hello", vcpus: int = 1):
    """Machine.for_guest(guest, sev='sev-snp') on the kvm backend with the fake kernel; with
    ``vcpus`` > 1 the same Machine steps by hand (Machine.for_guest has no vcpus yet)."""
    kvm_path, sev_path = tmp_path / "kvm", tmp_path / "sev"
    kvm_path.write_bytes(b"")
    sev_path.write_bytes(b"")
    import kvmharness.kvm.vm as kvm_vm_module

    orig = kvm_vm_module.KvmVm.__init__

    def remember(self, *a, **kw):  # the fake kernel reads the vCPUs' state at FINISH
        orig(self, *a, **kw)
        if self.vm_type == KVM_X86_SNP_VM:
            kernel.kvm_vm = self

    import kvmharness.backend

    sev_default = kvmharness.backend.SEV_DEVICE
    rec = K.IoctlRecorder(answer=kernel)
    rec.__enter__()
    try:
        kvm_vm_module.KvmVm.__init__ = remember
        kvmharness.backend.SEV_DEVICE = str(sev_path)
        system = KvmSystem(str(kvm_path))
        if vcpus == 1:
            m = Machine.for_guest(guest, system, sev="sev-snp")
        else:
            from kvmharness.images import get_guest
            from kvmharness.kvm.snp import launch_machine

            image = get_guest(guest)
            m = Machine(system, memory=image.memory, vm_type=KVM_X86_SNP_VM, name=guest,
                        create_vcpu=False)
            m.launch_result = launch_machine(m, image, image.load(), None, c_bit=51,
                                             vcpus=vcpus)
    except BaseException:
        rec.__exit__()
        raise
    finally:
        kvm_vm_module.KvmVm.__init__ = orig
        kvmharness.backend.SEV_DEVICE = sev_default
    return rec, m, system


@pytest.fixture
def launched(tmp_path):
    kernel = FakeSnpKernel()
    rec, m, system = snp_machine(tmp_path, kernel)
    yield kernel, rec, m
    m.close()
    rec.__exit__()
    system.close()


def test_launch_order_matches_the_selftests_and_qemu(launched):
    kernel, rec, m = launched
    ours = [s for s in rec.steps("vm", "vcpu") if s in set(selftests_order(1)) | {"KVM_RUN"}]
    ranges = len(rec.find("KVM_SEV_SNP_LAUNCH_UPDATE"))
    assert ranges == 3  # NORMAL (boot tables and image), SECRETS, CPUID: one call each
    assert shared_core(ours) == shared_core(selftests_order(ranges)) == shared_core(
        qemu_order(ranges)), f"ours: {ours}\nselftests {SELFTESTS}\nqemu {QEMU}"
    # the selftests' order step for step (vCPU-state ioctls left out), with QEMU's one
    # addition: the guest_memfd slot made private when it is created (kvm_set_phys_mem)
    expected = selftests_order(ranges)
    expected.insert(expected.index("KVM_SET_USER_MEMORY_REGION2") + 1, "KVM_SET_MEMORY_ATTRIBUTES")
    assert ours == expected, f"ours: {ours}\nselftests {SELFTESTS}\nqemu {QEMU}"
    q = qemu_order(ranges)
    assert q[q.index("KVM_SET_USER_MEMORY_REGION2") + 1] == "KVM_SET_MEMORY_ATTRIBUTES"
    # guest_memfd right before its slot, in both references
    i = ours.index("KVM_CREATE_GUEST_MEMFD")
    assert ours[i + 1] == "KVM_SET_USER_MEMORY_REGION2"
    # each range made private right before its LAUNCH_UPDATE (encrypt_region, sev_snp_launch_update)
    for j, s in enumerate(ours):
        if s == "KVM_SEV_SNP_LAUNCH_UPDATE" and ours[j - 1] != s:
            assert ours[j - 1] == "KVM_SET_MEMORY_ATTRIBUTES"
    # no plain KVM_SET_USER_MEMORY_REGION on an SNP VM; the page-state exit is enabled
    assert not [c for c in rec.calls if c.name == "KVM_SET_USER_MEMORY_REGION" and c.fd_kind == "vm"]
    assert kernel.exit_hypercall == 1 << 12
    assert kernel.model.finished and m.state_protected


def test_struct_bytes_are_what_the_kernel_expects(launched):
    kernel, rec, m = launched
    for ctype, n in {"struct kvm_sev_snp_launch_start": 64, "struct kvm_sev_snp_launch_update": 64,
                     "struct kvm_sev_snp_launch_finish": 88, "struct kvm_create_guest_memfd": 64,
                     "struct kvm_userspace_memory_region2": 160,
                     "struct kvm_memory_attributes": 32}.items():
        assert ffi.sizeof(ctype) == n, ctype
    gm = rec.find("KVM_CREATE_GUEST_MEMFD")[0]
    size, flags = struct.unpack_from("<QQ", gm.arg_in)
    assert (size, flags) == (m.memory, 0) and gm.arg_in[16:] == bytes(48)
    r2 = rec.find("KVM_SET_USER_MEMORY_REGION2")[0]
    slot, fl, gpa, msize, uaddr, off, gfd, pad1 = struct.unpack_from("<IIQQQQII", r2.arg_in)
    assert (slot, fl, gpa, msize, off, pad1) == (0, K.KVM_MEM_GUEST_MEMFD, 0, m.memory, 0, 0)
    assert gfd == gm.ret and uaddr == m.vm.host_address(m.ram) and r2.arg_in[56:] == bytes(104)
    init = rec.find("KVM_SEV_INIT2")[0]
    assert init.data_in == bytes(48)  # { 0 }, as snp_vm_init and QEMU
    start = rec.find("KVM_SEV_SNP_LAUNCH_START")[0]
    policy, gosvw, sflags = struct.unpack_from("<Q16sH", start.data_in)
    assert (policy, gosvw, sflags) == (m.launch_result.policy, bytes(16), 0)
    assert start.data_in[26:] == bytes(38)
    sev_fds = {struct.unpack("<IIQII", c.arg_in)[4] for c in rec.calls
               if c.name == "KVM_MEMORY_ENCRYPT_OP"}
    assert len(sev_fds) == 1 and os.path.exists(f"/proc/self/fd/{sev_fds.pop()}") is not None
    types = []
    for u in rec.find("KVM_SEV_SNP_LAUNCH_UPDATE"):
        gfn, ua, ln, typ, pad0, fl16, pad1 = struct.unpack_from("<QQQBBHI", u.data_in)
        assert (pad0, fl16, pad1) == (0, 0, 0) and u.data_in[32:] == bytes(32)
        assert ua == uaddr + gfn * PAGE_SIZE  # the slot's own mapping is the source
        gfn2, ua2, ln2 = struct.unpack_from("<QQQ", u.data_out)
        assert (gfn2, ua2, ln2) == (gfn + ln // PAGE_SIZE, ua + ln, 0)  # all done, as KVM writes back
        types.append(PageType(typ))
    assert types == [PageType.NORMAL, PageType.SECRETS, PageType.CPUID]
    fin = rec.find("KVM_SEV_SNP_LAUNCH_FINISH")[0]
    assert fin.data_in == bytes(88)  # no ID block, no host data (snp_vm_launch_finish: { 0 })
    attrs = rec.find("KVM_SET_MEMORY_ATTRIBUTES")
    assert struct.unpack("<QQQQ", attrs[0].arg_in) == (0, m.memory, K.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)


def test_launch_digest_equals_sev_snp_measure(launched):
    kernel, rec, m = launched
    launch = m.launch_result
    firmware_digest = kernel.model.launch_digest
    assert launch.launch_digest == firmware_digest
    assert _gctx_digest(launch.pages_measured) == firmware_digest
    # and the offline plan (``measure --mode sev-snp``): the VMSA KVM built from the vCPU's
    # registers is the one the plan predicts
    assert expected_digest(launch.plan).digest == firmware_digest
    assert _gctx_digest(launch.plan.pages) == firmware_digest


@pytest.mark.parametrize("vcpus", [2, 4])
def test_digest_with_aps_equals_sev_snp_measure(tmp_path, vcpus):
    """APs in the RESET state (RDX = the CPUID signature): KVM measures one VMSA per vCPU at
    LAUNCH_FINISH; the firmware's digest equals sev-snp-measure's over the same pages and
    the offline plan's (``measure --mode sev-snp --vcpus N``)."""
    kernel = FakeSnpKernel()
    rec, m, system = snp_machine(tmp_path, kernel, vcpus=vcpus)
    try:
        launch = m.launch_result
        assert len(rec.find("KVM_CREATE_VCPU")) == vcpus == len(kernel.model.vcpu_vmsas)
        vmsas = [p for p in launch.pages_measured if p.page_type == PageType.VMSA]
        assert [p.vcpu for p in vmsas] == list(range(vcpus))
        assert len({p.data for p in vmsas}) == 2  # the BSP's long-mode state, one AP state
        assert _gctx_digest(launch.pages_measured) == kernel.model.launch_digest
        assert expected_digest(launch.plan).digest == kernel.model.launch_digest
        one = FakeSnpKernel()
        rec.__exit__()
        rec1, m1, system1 = snp_machine(tmp_path, one)
        assert one.model.launch_digest != kernel.model.launch_digest
        m1.close()
        rec1.__exit__()
        system1.close()
        rec.__enter__()
    finally:
        m.close()
        rec.__exit__()
        system.close()


def test_partial_progress_is_followed_to_the_end(tmp_path):
    """KVM may populate fewer pages than asked and say so in gfn_start/uaddr/len; the VMM
    issues LAUNCH_UPDATE again from there until len is 0 (QEMU: ``while (update.len ...)``)."""
    kernel = FakeSnpKernel(max_pages_per_update=1)
    rec, m, system = snp_machine(tmp_path, kernel)
    try:
        ups = rec.find("KVM_SEV_SNP_LAUNCH_UPDATE")
        normal = [u for u in ups if struct.unpack_from("<QQQB", u.data_in)[3] == PageType.NORMAL]
        n = len([p for p in m.launch_result.plan.memory_pages() if p.page_type == PageType.NORMAL])
        assert n > 1 and len(normal) == n
        for a, b in zip(normal, normal[1:], strict=False):  # each call starts where KVM's write-back ended
            assert struct.unpack_from("<QQQ", b.data_in) == struct.unpack_from("<QQQ", a.data_out)
        assert struct.unpack_from("<QQQ", normal[-1].data_out)[2] == 0
        assert m.launch_result.update_calls == len(ups)
        assert _gctx_digest(m.launch_result.pages_measured) == kernel.model.launch_digest
    finally:
        m.close()
        rec.__exit__()
        system.close()


def test_cpuid_page_rejected_then_retried_with_the_firmwares_table(tmp_path, monkeypatch):
    """A CPUID entry the firmware does not accept: -EIO with INVALID_PARAM and the corrected
    page in the source buffer; the VMM names the entry and retries with the firmware's page."""
    import kvmharness.snp.launch as L

    good = L.default_cpuid_entries
    bad_leaf = 0x80000001

    def bad_entries(sig):
        out = []
        for e in good(sig):
            if e.eax_in == bad_leaf:
                e = type(e)(e.eax_in, e.ecx_in, e.eax, e.ebx, e.ecx | 1 << 31, e.edx | 1 << 31)
            out.append(e)
        return out

    probe = SimulatedSnpFirmware(host_pages=1 << 10)
    monkeypatch.setattr(L, "default_cpuid_entries", bad_entries)
    kernel = FakeSnpKernel()
    rec, m, system = snp_machine(tmp_path, kernel)
    try:
        cpuid_calls = [u for u in rec.find("KVM_SEV_SNP_LAUNCH_UPDATE")
                       if struct.unpack_from("<QQQB", u.data_in)[3] == PageType.CPUID]
        assert [(c.ret, c.errno) for c in cpuid_calls] == [(-1, errno.EIO), (0, 0)]
        assert struct.unpack("<IIQII", cpuid_calls[0].arg_out)[3] == 0x16  # INVALID_PARAM
        corr = m.launch_result.cpuid_corrections
        assert corr and {c.provided.eax_in for c in corr} == {bad_leaf}
        assert all(c.provided != c.corrected for c in corr)
        measured = [p for p in m.launch_result.pages_measured if p.page_type == PageType.CPUID][0]
        assert measured.data != cpuid_page(bad_entries(0x00A00F11))
        assert parse_cpuid_page(measured.data)[1][0] == good(0x00A00F11)[0]
        assert _gctx_digest(m.launch_result.pages_measured) == kernel.model.launch_digest
    finally:
        m.close()
        rec.__exit__()
        system.close()
    del probe


def test_memory_fault_and_map_gpa_range_are_answered_by_the_machine(launched):
    """KVM_RUN fails with EFAULT and KVM_EXIT_MEMORY_FAULT: the Machine converts the range
    (KVM_SET_MEMORY_ATTRIBUTES) and runs again; KVM_EXIT_HYPERCALL nr 12 (the guest's
    page-state change): attributes flipped, hypercall.ret = 0; a range outside RAM: -EINVAL."""
    kernel, rec, m = launched
    run = m.vcpu.kvm_run
    seen = {}

    def memory_fault(k, fd):
        run.exit_reason = K.KVM_EXIT_MEMORY_FAULT
        run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size = 0, 0x20000, 0x2000
        return -1, errno.EFAULT

    def map_gpa(gpa, npages, attrs):
        def step(k, fd):
            seen.setdefault("private", []).append(sorted(g for g in (0x20, 0x21, 0x30)
                                                         if g in k.model.private))
            run.exit_reason = K.KVM_EXIT_HYPERCALL
            run.hypercall.nr = K.KVM_HC_MAP_GPA_RANGE
            run.hypercall.args[0], run.hypercall.args[1], run.hypercall.args[2] = gpa, npages, attrs
            run.hypercall.ret = 0xDEAD
            return 0, 0
        return step

    def check_and_halt(k, fd):
        seen.setdefault("private", []).append(sorted(g for g in (0x20, 0x21, 0x30)
                                                     if g in k.model.private))
        seen["ret"] = run.hypercall.ret
        run.exit_reason = K.KVM_EXIT_HLT
        return 0, 0

    def record_ret(k, fd):
        seen["first_ret"] = run.hypercall.ret
        return map_gpa(1 << 40, 1, 0)(k, fd)

    kernel.run_script = [memory_fault, map_gpa(0x30000, 1, 0), record_ret, check_and_halt]
    m.expected = "hlt"
    result = m.run(timeout=10)
    assert result.outcome == "hlt"
    # after the shared memory fault: 0x20, 0x21 shared; after MAP_GPA_RANGE(0x30000, shared): 0x30 too
    assert seen["private"] == [[0x30], [], []]
    assert seen["first_ret"] == 0
    assert seen["ret"] == (-22) & (1 << 64) - 1  # the range beyond RAM: -KVM_EINVAL
    kinds = [type(r.exit).__name__ for r in result.exits]
    assert kinds == ["MemoryFault", "Hypercall", "Hypercall", "Hlt"]
    assert [c[0] for c in m.launch_result.conversions] == ["memory-fault", "map-gpa-range"]


# -- on this host, for real ------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_system():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    from kvmharness import open_backend
    from kvmharness.errors import HarnessError

    try:
        return open_backend("kvm")
    except HarnessError as e:
        pytest.skip(f"/dev/kvm unusable here: {e}")


def test_every_step_fails_here_with_the_kernels_errno(real_system):
    """This host's /dev/kvm (no SNP): KVM_CREATE_VM(KVM_X86_SNP_VM) is refused with EINVAL and
    the Machine says so; each SNP command on a VM KVM does create fails with ENOTTY, the
    error carrying the sev-snp verdict ``info`` gives."""
    from kvmharness.hostinfo import verdict_reason
    from kvmharness.kvm.sev import NO_SEV_DETAIL
    from kvmharness.kvm.snp import KvmSnp

    if KVM_X86_SNP_VM in real_system.capabilities.vm_types:
        pytest.skip("this host's KVM offers KVM_X86_SNP_VM: the refusals are not what it does")
    with pytest.raises(FeatureUnavailable) as ei:
        Machine.for_guest("snp-hello", real_system, sev="sev-snp")
    assert "EINVAL" in str(ei.value) and "VM type 4" in str(ei.value)
    vm = real_system.create_vm(KVM_X86_DEFAULT_VM)
    try:
        vm.add_memory(0, 1 << 20)
        snp = KvmSnp(vm)
        calls = [snp.init2, lambda: snp.snp_launch_start(0x30000),
                 lambda: snp.snp_launch_update(0, vm.host_address(vm.regions[0]), PAGE_SIZE,
                                               PageType.NORMAL),
                 snp.snp_launch_finish]
        for call in calls:
            with pytest.raises(SevError) as e:
                call()
            assert e.value.errno == errno.ENOTTY and NO_SEV_DETAIL in str(e.value)
            assert e.value.host_verdict == "sev-snp"
        snp.close()
    finally:
        vm.close()
    assert verdict_reason("sev-snp")  # info's verdict: not usable here, and why


# -- the simulator's launch with APs, beside the kvm backend's ------------------------------------

@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_sim_launch_with_aps_digest_equals_sev_snp_measure_and_kvm(tmp_path, vcpus):
    """Machine.for_guest(vcpus=N, sev='sev-snp') on the simulator: N vCPUs, one VMSA each at
    LAUNCH_FINISH (the APs in the RESET state); its firmware digest equals sev-snp-measure's
    over the plan and the kvm backend's launch of the same guest through the fake kernel."""
    pytest.importorskip("unicorn", reason="the simulator runs on unicorn")
    m = Machine.for_guest("snp-hello", "sim", sev="sev-snp", vcpus=vcpus)
    try:
        assert len(m.aps) == vcpus - 1 and m.vcpu_count == vcpus
        launch = m.launch_result
        assert len(launch.model.kvm.vcpu_vmsas) == vcpus
        assert launch.launch_digest == _gctx_digest(launch.plan.pages)
        sim_digest = launch.launch_digest
        assert m.run().outcome == "done"  # the BSP runs; the APs wait for AP creation
    finally:
        m.close()
    kernel = FakeSnpKernel()
    rec, km, system = snp_machine(tmp_path, kernel, vcpus=vcpus) if vcpus > 1 else \
        snp_machine(tmp_path, kernel)
    try:
        assert kernel.model.launch_digest == sim_digest
    finally:
        km.close()
        rec.__exit__()
        system.close()


def test_vcpus_beyond_one_are_refused_for_sev_and_out_of_range():
    from kvmharness.errors import UsageError

    with pytest.raises(UsageError):
        Machine.for_guest("hello64", "sim", vcpus=0)
    with pytest.raises(UsageError, match="one vCPU"):
        Machine.for_guest("cpuid", "sim", sev="sev", vcpus=2)
