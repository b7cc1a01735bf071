"""The SNP-era KVM ioctls through the cffi declarations, on this host's real /dev/kvm.

What the host offers is probed, never assumed: an SNP VM type the kernel does not
list must be refused by KVM_CREATE_VM with its errno; guest_memfd and memory
attributes are exercised where KVM_CHECK_EXTENSION reports them, and fail with
the kernel's errno where it does not.  The kernel's own argument checks
(``kvm_gmem_create``: size page-aligned and non-zero, no unknown flags;
``kvm_vm_ioctl_set_mem_attributes``: page-aligned range) double as a check that
the structs reach it with the fields where the kernel reads them.
"""

from __future__ import annotations

import errno
import os

import pytest

from kvmharness.errors import FeatureUnavailable, HarnessError

kvm_ffi = pytest.importorskip("kvmharness.kvm._ffi")
ffi = kvm_ffi.ffi


@pytest.fixture(scope="module")
def system():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    from kvmharness import open_backend

    try:
        return open_backend("kvm")
    except HarnessError as e:
        pytest.skip(f"/dev/kvm unusable here: {e}")


@pytest.fixture
def vm(system):
    v = system.create_vm(0)
    yield v
    v.close()


def _check(fd: int, cap: str) -> int:
    ret, _ = kvm_ffi.ioctl_raw(fd, kvm_ffi.KVM_CHECK_EXTENSION,
                               ffi.cast("void *", kvm_ffi.CONSTANTS[cap]))
    return max(ret, 0)


def test_snp_vm_type_follows_what_the_kernel_lists(system):
    snp = kvm_ffi.CONSTANTS["KVM_X86_SNP_VM"]
    if snp in system.capabilities.vm_types:
        system.create_vm(snp).close()
    else:
        with pytest.raises(FeatureUnavailable) as ei:
            system.create_vm(snp)
        assert "EINVAL" in str(ei.value) and "sev-snp" in str(ei.value)


def _create_gmem(vm, size: int, flags: int = 0) -> tuple[int, int]:
    arg = ffi.new("struct kvm_create_guest_memfd *", {"size": size, "flags": flags})
    return kvm_ffi.ioctl_raw(vm.fd, kvm_ffi.KVM_CREATE_GUEST_MEMFD, arg)


def test_guest_memfd_where_the_kernel_has_it(vm):
    if not _check(vm.fd, "KVM_CAP_GUEST_MEMFD"):
        ret, err = _create_gmem(vm, 1 << 21)
        assert ret < 0 and err in (errno.ENOTTY, errno.EINVAL)
        return
    ret, err = _create_gmem(vm, 1 << 21)
    assert ret >= 0, errno.errorcode.get(err)
    os.close(ret)
    for size, flags in ((0, 0), (4097, 0), (1 << 21, 1 << 63)):
        ret, err = _create_gmem(vm, size, flags)
        if ret >= 0:
            os.close(ret)
        assert (ret, err) == (-1, errno.EINVAL), (size, flags)


def test_memory_attributes_where_the_kernel_has_them(vm):
    arg = ffi.new("struct kvm_memory_attributes *",
                  {"address": 0, "size": 4096,
                   "attributes": kvm_ffi.CONSTANTS["KVM_MEMORY_ATTRIBUTE_PRIVATE"]})
    supported = _check(vm.fd, "KVM_CAP_MEMORY_ATTRIBUTES")
    ret, err = kvm_ffi.ioctl_raw(vm.fd, kvm_ffi.KVM_SET_MEMORY_ATTRIBUTES, arg)
    if not supported:
        assert (ret, err) == (-1, errno.ENOTTY)
        return
    if not supported & kvm_ffi.CONSTANTS["KVM_MEMORY_ATTRIBUTE_PRIVATE"]:
        assert (ret, err) == (-1, errno.EINVAL)
        return
    assert ret == 0
    arg.address = 0x800  # not page aligned
    ret, err = kvm_ffi.ioctl_raw(vm.fd, kvm_ffi.KVM_SET_MEMORY_ATTRIBUTES, arg)
    assert (ret, err) == (-1, errno.EINVAL)
