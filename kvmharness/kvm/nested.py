"""KVM_GET_NESTED_STATE / KVM_SET_NESTED_STATE: snapshot a vCPU that runs its own guest.

When a guest is itself a hypervisor (it ran VMRUN, so the vCPU is in "guest
mode" running L2), the registers KVM_GET_REGS/SREGS return are L2's; what
makes the picture whole is the nested state: whether the vCPU is in guest
mode, L1's VMCB address (vmcb12), L1's intercepts and other control fields
KVM cached from that VMCB, and L1's own register state (KVM's vmcb01 save
area).  Saving it, and the other state, and restoring it in the same or a
fresh vCPU is how KVM migrates nested guests.

    from kvmharness.kvm.nested import get_nested_state, set_nested_state
    state = get_nested_state(vcpu)          # a NestedState value
    if state.guest_mode: print(hex(state.vmcb_pa))
    set_nested_state(other_vcpu, state)

Order for a fresh vCPU (what KVM's svm_set_nested_state expects, and QEMU
does): KVM_SET_CPUID2 with SVM, then KVM_SET_SREGS (EFER must have SVME, or
KVM refuses guest mode with EINVAL) and KVM_SET_REGS with the *L2* values
the snapshot read, and only then KVM_SET_NESTED_STATE: KVM moves the
current registers into vmcb02 and takes L1's from the snapshot.

Snapshot at a quiescent point: after an IO or MMIO exit KVM still has to
finish the instruction on the next KVM_RUN (the kernel's API document says
to run once with ``immediate_exit`` set before saving), which
:func:`complete_pending_exit` does.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import TYPE_CHECKING

from ..abi import (
    KVM_STATE_NESTED_FORMAT_SVM,
    KVM_STATE_NESTED_FORMAT_VMX,
    KVM_STATE_NESTED_GIF_SET,
    KVM_STATE_NESTED_GUEST_MODE,
    KVM_STATE_NESTED_RUN_PENDING,
    KVM_STATE_NESTED_SVM_VMCB_SIZE,
    NESTED_STATE_HEADER_SIZE,
    NestedState,
)
from ..errors import FeatureUnavailable, KvmError
from . import _ffi as K
from ._ffi import ffi, ioctl_raw

if TYPE_CHECKING:
    from .vcpu import KvmVcpu

# The value type and the numbers live in kvmharness.abi (the simulator builds the
# same NestedState); the names below stay for callers of this module.
HEADER_SIZE = NESTED_STATE_HEADER_SIZE
_HEAD = struct.Struct("<HHI")
FORMAT_VMX = KVM_STATE_NESTED_FORMAT_VMX
FORMAT_SVM = KVM_STATE_NESTED_FORMAT_SVM
FLAG_GUEST_MODE = KVM_STATE_NESTED_GUEST_MODE
FLAG_RUN_PENDING = KVM_STATE_NESTED_RUN_PENDING
FLAG_GIF_SET = KVM_STATE_NESTED_GIF_SET
VMCB_SIZE = KVM_STATE_NESTED_SVM_VMCB_SIZE

__all__ = ["FLAG_GIF_SET", "FLAG_GUEST_MODE", "FLAG_RUN_PENDING", "FORMAT_SVM", "FORMAT_VMX",
           "HEADER_SIZE", "VMCB_SIZE", "NestedState", "complete_pending_exit", "get_nested_state",
           "max_nested_state_size", "set_nested_state"]


def max_nested_state_size(vcpu: KvmVcpu) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) on the vCPU's VM: the largest state, 0 if none."""
    return vcpu.vm.check_extension(K.KVM_CAP_NESTED_STATE)


def _require(vcpu: KvmVcpu) -> int:
    size = max_nested_state_size(vcpu)
    if size <= 0:
        raise FeatureUnavailable(
            "this KVM has no KVM_CAP_NESTED_STATE (KVM_GET/SET_NESTED_STATE): nested "
            "virtualization needs kvm_amd (or kvm_intel) loaded with nested=1")
    return size


def get_nested_state(vcpu: KvmVcpu) -> NestedState:
    """KVM_GET_NESTED_STATE: the vCPU's nested state (raises FeatureUnavailable without the cap)."""
    size = _require(vcpu)
    while True:
        buf = ffi.new("char[]", size)
        _HEAD.pack_into(ffi.buffer(buf), 0, 0, 0, size)
        ret, err = ioctl_raw(vcpu.fd, K.KVM_GET_NESTED_STATE, buf)
        if ret < 0 and err == _errno.E2BIG:
            needed = _HEAD.unpack_from(ffi.buffer(buf))[2]
            if needed <= size:
                raise KvmError("KVM_GET_NESTED_STATE", err, f"E2BIG with a {size}-byte buffer")
            size = needed  # KVM wrote the size it needs
            continue
        if ret < 0:
            raise KvmError("KVM_GET_NESTED_STATE", err)
        return NestedState.from_bytes(bytes(ffi.buffer(buf)))


def set_nested_state(vcpu: KvmVcpu, state: NestedState) -> None:
    """KVM_SET_NESTED_STATE from a :class:`NestedState` (see the module docstring for the order)."""
    _require(vcpu)
    raw = state.to_bytes()
    buf = ffi.new("char[]", raw)
    ret, err = ioctl_raw(vcpu.fd, K.KVM_SET_NESTED_STATE, buf)
    if ret < 0:
        hint = ""
        if err == _errno.EINVAL:
            hint = ("KVM refused the state: for guest mode the vCPU's EFER needs SVME and its CPUID "
                    "SVM (set CPUID, SREGS and REGS first), the size must include the 4 KiB VMCB, "
                    "and L1's save area must pass KVM's VMRUN checks")
        raise KvmError("KVM_SET_NESTED_STATE", err, hint)


def complete_pending_exit(vcpu: KvmVcpu) -> None:
    """KVM_RUN with ``immediate_exit`` set: KVM finishes the last exit's instruction
    (an IO/MMIO completion) and returns EINTR without entering the guest, so the
    registers and nested state read afterwards are at an instruction boundary."""
    vcpu.kvm_run.immediate_exit = 1
    try:
        vcpu.run()
    except InterruptedError:
        return
    finally:
        vcpu.kvm_run.immediate_exit = 0
    raise KvmError("KVM_RUN", 0, "immediate_exit was set but KVM entered the guest")
