#!/usr/bin/env python3
"""Smallest end-to-end KVM check, run inside the SVM rig by the soak loop.

Standard library only (the rig may not have kvmharness installed yet): create a
VM with one vCPU in real mode, run `mov al,0x42; out 0x10,al; hlt` and expect a
KVM_EXIT_IO on port 0x10 with 0x42, then KVM_EXIT_HLT.  Also prints the
kvm_amd parameters that say this is SVM with nested paging.  Exit 0 = PASS.
"""
import ctypes
import fcntl
import mmap
import os
import struct
import sys

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(0xAE, 0x46, struct kvm_userspace_memory_region)
KVM_RUN = 0xAE80
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82  # struct kvm_regs: 18 x u64
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84  # struct kvm_sregs: 312 bytes
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
CODE = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt


def main() -> int:
    params = {}
    for p in ("nested", "npt"):
        try:
            with open(f"/sys/module/kvm_amd/parameters/{p}") as f:
                params[p] = f.read().strip()
        except OSError:
            params[p] = None
    print("kvm_amd", params)
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    api = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, 0x10000)
    mem[0x1000:0x1000 + len(CODE)] = CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("=IIQQQ", 0, 0, 0, 0x10000, addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run = mmap.mmap(vcpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(fcntl.ioctl(vcpu, KVM_GET_SREGS, bytes(312)))
    struct.pack_into("=Q", sregs, 0, 0)   # cs.base (first kvm_segment)
    struct.pack_into("=H", sregs, 12, 0)  # cs.selector
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(fcntl.ioctl(vcpu, KVM_GET_REGS, bytes(144)))
    struct.pack_into("=QQ", regs, 16 * 8, 0x1000, 2)  # rip, rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    seen = []
    for _ in range(4):
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("=I", run, 8)[0]
        if reason == KVM_EXIT_IO:
            direction, size, port, count, off = struct.unpack_from("=BBHIQ", run, 32)
            seen.append(("io", port, run[off]))
        else:
            seen.append(("exit", reason))
            break
    ok = seen == [("io", 0x10, 0x42), ("exit", KVM_EXIT_HLT)]
    print(f"api {api} exits {seen} ->", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
