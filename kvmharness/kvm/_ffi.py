"""The cffi binding to /dev/kvm and /dev/sev: the only module that touches cffi.

One ``cffi.FFI`` in ABI mode is built from the C declaration files in
``cdefs/`` (shipped as package ``kvmharness.cdefs``), read in a fixed order:
integer types, ``asm/kvm.h``, ``linux/kvm.h``, the KVM SEV commands, and
``linux/psp-sev.h`` (whose structs are packed in the kernel, so that file is
declared with ``packed=True``).  Nothing is compiled: importing this module
needs neither a C compiler nor kernel headers.  ``tests/test_cdefs_layout.py``
pins every size, offset, constant and ioctl number to the kernel's headers.

Exports, under the kernel's own names:

* ``ffi`` and ``libc`` (``ffi.dlopen(None)``; ``ioctl`` declared with a fixed
  three-argument prototype, which calls faster than the variadic one);
* every ``#define`` and enum constant of the cdefs (``KVM_EXIT_IO``,
  ``KVM_CAP_VM_TYPES``, ``SEV_RET_INVALID_POLICY``...) as a module attribute,
  also collected in ``CONSTANTS``;
* every ioctl number the project issues (``KVM_RUN``, ``KVM_MEMORY_ENCRYPT_OP``,
  ``SEV_ISSUE_CMD``...), listed in ``IOCTLS`` and named by ``IOCTL_NAMES``;
* ``ioctl()``, which raises :class:`~kvmharness.errors.KvmError` naming the
  ioctl, and ``ioctl_raw()``, which returns ``(ret, errno)`` and never raises
  (the selftests' ``__vm_ioctl`` pattern).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import cffi

from ..errors import KvmError

# Declaration files in the order they are read; True = declare them packed.
CDEF_FILES: tuple[tuple[str, bool], ...] = (
    ("types.h", False),
    ("kvm_x86.h", False),
    ("kvm.h", False),
    ("kvm_sev.h", False),
    ("psp_sev.h", True),
)


def _read_cdef(name: str) -> str:
    """The text of one declaration file, installed or from a source tree."""
    try:
        return resources.files("kvmharness.cdefs").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        # Running from a source checkout that was not pip-installed: cdefs/
        # sits next to the kvmharness package directory.
        return (Path(__file__).resolve().parents[2] / "cdefs" / name).read_text()


_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Za-z_]\w*)", re.M)
_ENUM = re.compile(r"\benum\s*\w*\s*\{([^}]*)\}", re.S)


def _constant_names(source: str) -> list[str]:
    """Names of the ``#define`` and enum constants declared in ``source``."""
    text = _COMMENT.sub(" ", source)
    names = _DEFINE.findall(text)
    for body in _ENUM.findall(text):
        names += [m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)\s*(?:=[^,]*)?(?:,|$)", body.strip())]
    return names


ffi = cffi.FFI()
CDEF_SOURCES: dict[str, str] = {}
_names: list[str] = []
for _file, _packed in CDEF_FILES:
    _src = _read_cdef(_file)
    CDEF_SOURCES[_file] = _src
    ffi.cdef(_src, packed=_packed)
    _names += _constant_names(_src)

# libc: fixed 3-argument ioctl prototype (integer arguments are passed as
# ffi.cast("void *", n)); errno is read back through ffi.errno.
ffi.cdef("int ioctl(int fd, unsigned long request, void *arg);")
libc = ffi.dlopen(None)

#: Every #define / enum constant of the cdefs, by kernel name.
CONSTANTS: dict[str, int] = {name: getattr(libc, name) for name in _names}
globals().update(CONSTANTS)
del _file, _packed, _src, _names


def const(name: str) -> int:
    """The value of the cdefs constant ``name`` (``KeyError`` if undeclared)."""
    return CONSTANTS[name]


# ---------------------------------------------------------------------------
# ioctl numbers (asm-generic/ioctl.h encoding: dir<<30 | size<<16 | type<<8 | nr)

_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _IOC(0, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype: str) -> int:
    return _IOC(_IOC_READ, type_, nr, ffi.sizeof(ctype))


def _IOW(type_: int, nr: int, ctype: str) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ffi.sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype: str) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ffi.sizeof(ctype))


_KVMIO = CONSTANTS["KVMIO"]

# ioctls for /dev/kvm fds
KVM_GET_API_VERSION = _IO(_KVMIO, 0x00)
KVM_CREATE_VM = _IO(_KVMIO, 0x01)  # arg: VM type (KVM_X86_*_VM)
KVM_GET_MSR_INDEX_LIST = _IOWR(_KVMIO, 0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _IO(_KVMIO, 0x03)  # arg: KVM_CAP_*; also on VM fds
KVM_GET_VCPU_MMAP_SIZE = _IO(_KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(_KVMIO, 0x05, "struct kvm_cpuid2")
KVM_GET_EMULATED_CPUID = _IOWR(_KVMIO, 0x09, "struct kvm_cpuid2")
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(_KVMIO, 0x0A, "struct kvm_msr_list")

# ioctls for VM fds
KVM_CREATE_VCPU = _IO(_KVMIO, 0x41)  # arg: vcpu id
KVM_SET_USER_MEMORY_REGION = _IOW(_KVMIO, 0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _IO(_KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(_KVMIO, 0x48, "__u64")
KVM_SET_USER_MEMORY_REGION2 = _IOW(_KVMIO, 0x49, "struct kvm_userspace_memory_region2")
KVM_X86_SET_MSR_FILTER = _IOW(_KVMIO, 0xC6, "struct kvm_msr_filter")
# Memory encryption: the number encodes an `unsigned long`, but the argument
# is a pointer to a 24-byte struct kvm_sev_cmd (a historical quirk the kernel
# selftests comment on too).  With a NULL argument it returns 0 iff KVM has
# SEV enabled.
KVM_MEMORY_ENCRYPT_OP = _IOWR(_KVMIO, 0xBA, "unsigned long")
KVM_MEMORY_ENCRYPT_REG_REGION = _IOR(_KVMIO, 0xBB, "struct kvm_enc_region")
KVM_MEMORY_ENCRYPT_UNREG_REGION = _IOR(_KVMIO, 0xBC, "struct kvm_enc_region")

# device attributes (system, VM, vCPU and device fds)
KVM_SET_DEVICE_ATTR = _IOW(_KVMIO, 0xE1, "struct kvm_device_attr")
KVM_GET_DEVICE_ATTR = _IOW(_KVMIO, 0xE2, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR = _IOW(_KVMIO, 0xE3, "struct kvm_device_attr")

# ioctls for vCPU fds
KVM_RUN = _IO(_KVMIO, 0x80)
KVM_GET_REGS = _IOR(_KVMIO, 0x81, "struct kvm_regs")
KVM_SET_REGS = _IOW(_KVMIO, 0x82, "struct kvm_regs")
KVM_GET_SREGS = _IOR(_KVMIO, 0x83, "struct kvm_sregs")
KVM_SET_SREGS = _IOW(_KVMIO, 0x84, "struct kvm_sregs")
KVM_TRANSLATE = _IOWR(_KVMIO, 0x85, "struct kvm_translation")
KVM_INTERRUPT = _IOW(_KVMIO, 0x86, "struct kvm_interrupt")
KVM_GET_MSRS = _IOWR(_KVMIO, 0x88, "struct kvm_msrs")
KVM_SET_MSRS = _IOW(_KVMIO, 0x89, "struct kvm_msrs")
KVM_GET_FPU = _IOR(_KVMIO, 0x8C, "struct kvm_fpu")
KVM_SET_FPU = _IOW(_KVMIO, 0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _IOR(_KVMIO, 0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _IOW(_KVMIO, 0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _IOW(_KVMIO, 0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _IOWR(_KVMIO, 0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _IOR(_KVMIO, 0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _IOW(_KVMIO, 0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _IOW(_KVMIO, 0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _IOR(_KVMIO, 0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _IOW(_KVMIO, 0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _IOR(_KVMIO, 0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _IOW(_KVMIO, 0xA2, "struct kvm_debugregs")
KVM_ENABLE_CAP = _IOW(_KVMIO, 0xA3, "struct kvm_enable_cap")  # vCPU and VM fds
KVM_GET_XCRS = _IOR(_KVMIO, 0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _IOW(_KVMIO, 0xA7, "struct kvm_xcrs")
KVM_GET_NESTED_STATE = _IOWR(_KVMIO, 0xBE, "struct kvm_nested_state")
KVM_SET_NESTED_STATE = _IOW(_KVMIO, 0xBF, "struct kvm_nested_state")
KVM_GET_STATS_FD = _IO(_KVMIO, 0xCE)  # VM and vCPU fds

# /dev/sev
SEV_ISSUE_CMD = _IOWR(CONSTANTS["SEV_IOC_TYPE"], 0x0, "struct sev_issue_cmd")

#: Names of every ioctl number defined above.
IOCTLS: tuple[str, ...] = tuple(
    name for name, value in list(globals().items())
    if (name.startswith("KVM_") or name == "SEV_ISSUE_CMD") and name not in CONSTANTS
    and isinstance(value, int)
)
#: ioctl number -> kernel name (for error messages).
IOCTL_NAMES: dict[int, str] = {globals()[name]: name for name in IOCTLS}


# ---------------------------------------------------------------------------
# Calling ioctl.  These are on the per-exit hot path (KVM_RUN): no dict
# lookups or allocations unless the call failed.

_ioctl = libc.ioctl
_cast = ffi.cast
NULL = ffi.NULL


def ioctl(fd: int, request: int, arg=NULL) -> int:
    """Issue ``ioctl(fd, request, arg)``; raise :class:`KvmError` on failure.

    ``arg`` is a cdata pointer (``ffi.new(...)``, ``ffi.NULL``) or a Python
    int, which is passed by value as the kernel expects for KVM_CREATE_VM,
    KVM_CHECK_EXTENSION, KVM_CREATE_VCPU and the like.  Returns the ioctl's
    non-negative result.
    """
    try:
        ret = _ioctl(fd, request, arg)
    except TypeError:  # an int argument (zero-cost try: no check on the hot path)
        ret = _ioctl(fd, request, _cast("void *", arg))
    if ret == -1:
        raise KvmError(IOCTL_NAMES.get(request, hex(request)), ffi.errno)
    return ret


def ioctl_raw(fd: int, request: int, arg=NULL) -> tuple[int, int]:
    """Issue ``ioctl(fd, request, arg)`` and return ``(ret, errno)``; a failed ioctl never raises.

    ``errno`` is 0 when the call succeeded.  For callers that expect failure
    (probing a capability, negative tests), like the selftests' ``__vm_ioctl``.
    """
    try:
        ret = _ioctl(fd, request, arg)
    except TypeError:  # an int argument
        ret = _ioctl(fd, request, _cast("void *", arg))
    if ret == -1:
        return ret, ffi.errno
    return ret, 0


def check(ret: int, request: int) -> int:
    """Raise :class:`KvmError` for ``request`` if ``ret`` is -1 (errno from the last cffi call)."""
    if ret == -1:
        raise KvmError(IOCTL_NAMES.get(request, hex(request)), ffi.errno)
    return ret
