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
  (the selftests' ``__vm_ioctl`` pattern);
* :class:`IoctlRecorder`, the seam below ``kvm/``: installed (as a context
  manager), it sees every call ``ioctl()`` / ``ioctl_raw()`` make -- fd kind,
  ioctl name and number, the struct bytes in and out, the result -- and may
  answer in the kernel's place.  Not installed, the cost is one ``None`` check
  per call.  (``kvm/vcpu.py`` issues KVM_RUN straight through ``libc.ioctl``
  for speed unless a recorder is installed: ``run()`` checks per call,
  ``runner()`` once per run loop, and the compiled loop is not used then.)
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING

import cffi

from ..datafiles import data_path
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
    return data_path("cdefs", name).read_text()


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
if TYPE_CHECKING:  # the constants above come from cdefs/ at import; to a type checker they are ints
    def __getattr__(name: str) -> int: ...
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
KVM_SET_MEMORY_ATTRIBUTES = _IOW(_KVMIO, 0xD2, "struct kvm_memory_attributes")  # VM fd, 6.8+
KVM_CREATE_GUEST_MEMFD = _IOWR(_KVMIO, 0xD4, "struct kvm_create_guest_memfd")  # VM fd, 6.8+

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
_recorder: IoctlRecorder | None = None  # the installed recorder (a test's), else None


def ioctl(fd: int, request: int, arg: typing.Any = NULL) -> int:
    """Issue ``ioctl(fd, request, arg)``; raise :class:`KvmError` on failure.

    ``arg`` is a cdata pointer (``ffi.new(...)``, ``ffi.NULL``) or a Python
    int, which is passed by value as the kernel expects for KVM_CREATE_VM,
    KVM_CHECK_EXTENSION, KVM_CREATE_VCPU and the like.  Returns the ioctl's
    non-negative result.
    """
    if _recorder is not None:
        answered, err = _recorder(fd, request, arg)
        if answered == -1:
            raise KvmError(IOCTL_NAMES.get(request, hex(request)), err)
        return answered
    try:
        ret: int = _ioctl(fd, request, arg)
    except TypeError:  # an int argument (zero-cost try: no check on the hot path)
        ret = _ioctl(fd, request, _cast("void *", arg))
    if ret == -1:
        raise KvmError(IOCTL_NAMES.get(request, hex(request)), ffi.errno)
    return ret


def ioctl_raw(fd: int, request: int, arg: typing.Any = NULL) -> tuple[int, int]:
    """Issue ``ioctl(fd, request, arg)`` and return ``(ret, errno)``; a failed ioctl never raises.

    ``errno`` is 0 when the call succeeded.  For callers that expect failure
    (probing a capability, negative tests), like the selftests' ``__vm_ioctl``.
    """
    if _recorder is not None:
        return _recorder(fd, request, arg)
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


def _syscall(fd: int, request: int, arg: typing.Any) -> tuple[int, int]:
    """The real ioctl, as ``ioctl_raw`` issues it (for a recorder that passes through)."""
    try:
        ret = int(_ioctl(fd, request, arg))
    except TypeError:
        ret = int(_ioctl(fd, request, _cast("void *", arg)))
    return (ret, int(ffi.errno)) if ret == -1 else (ret, 0)


# ---------------------------------------------------------------------------
# The recording seam

#: KVM_MEMORY_ENCRYPT_OP sub-commands: kvm_sev_cmd.id -> (name, data struct or None).
SEV_KVM_COMMANDS: dict[int, tuple[str, str | None]] = {
    CONSTANTS[name]: (name, ctype) for name, ctype in (
        ("KVM_SEV_INIT", None), ("KVM_SEV_ES_INIT", None),
        ("KVM_SEV_INIT2", "struct kvm_sev_init"),
        ("KVM_SEV_LAUNCH_START", "struct kvm_sev_launch_start"),
        ("KVM_SEV_LAUNCH_UPDATE_DATA", "struct kvm_sev_launch_update_data"),
        ("KVM_SEV_LAUNCH_UPDATE_VMSA", None),
        ("KVM_SEV_LAUNCH_SECRET", "struct kvm_sev_launch_secret"),
        ("KVM_SEV_LAUNCH_MEASURE", "struct kvm_sev_launch_measure"),
        ("KVM_SEV_LAUNCH_FINISH", None),
        ("KVM_SEV_GUEST_STATUS", "struct kvm_sev_guest_status"),
        ("KVM_SEV_DBG_DECRYPT", "struct kvm_sev_dbg"),
        ("KVM_SEV_DBG_ENCRYPT", "struct kvm_sev_dbg"),
        ("KVM_SEV_SNP_LAUNCH_START", "struct kvm_sev_snp_launch_start"),
        ("KVM_SEV_SNP_LAUNCH_UPDATE", "struct kvm_sev_snp_launch_update"),
        ("KVM_SEV_SNP_LAUNCH_FINISH", "struct kvm_sev_snp_launch_finish"),
    )
}
#: SEV_ISSUE_CMD commands (/dev/sev): sev_issue_cmd.cmd -> (name, data struct or None).
SEV_DEV_COMMANDS: dict[int, tuple[str, str | None]] = {
    CONSTANTS[name]: (name, ctype) for name, ctype in (
        ("SEV_FACTORY_RESET", None), ("SEV_PEK_GEN", None), ("SEV_PDH_GEN", None),
        ("SEV_PLATFORM_STATUS", "struct sev_user_data_status"),
        ("SEV_PEK_CSR", "struct sev_user_data_pek_csr"),
        ("SEV_PDH_CERT_EXPORT", "struct sev_user_data_pdh_cert_export"),
        ("SEV_PEK_CERT_IMPORT", "struct sev_user_data_pek_cert_import"),
        ("SEV_GET_ID2", "struct sev_user_data_get_id2"),
    )
}
# ioctls only /dev/kvm answers: their fd is the system fd
_SYSTEM_IOCTLS = {"KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_VCPU_MMAP_SIZE",
                  "KVM_GET_SUPPORTED_CPUID", "KVM_GET_EMULATED_CPUID", "KVM_GET_MSR_INDEX_LIST",
                  "KVM_GET_MSR_FEATURE_INDEX_LIST"}


@dataclasses.dataclass
class IoctlCall:
    """One recorded ioctl.

    ``arg_in``/``arg_out``: the bytes of the struct ``arg`` points to, before
    and after the call (``None`` for a NULL argument); for a by-value
    argument (KVM_CREATE_VM's type, KVM_CHECK_EXTENSION's cap) ``arg_in`` is
    that int.  For KVM_MEMORY_ENCRYPT_OP and SEV_ISSUE_CMD, ``command`` is
    the sub-command's kernel name and ``data_in``/``data_out`` the bytes of
    the command's own struct (``kvm_sev_cmd.data`` / ``sev_issue_cmd.data``).
    """

    fd: int
    fd_kind: str  # "kvm" (/dev/kvm), "vm", "vcpu", "sev" (/dev/sev) or "?"
    request: int
    name: str
    arg_in: bytes | int | None
    arg_out: bytes | None = None
    ret: int = 0
    errno: int = 0
    command: str | None = None
    data_in: bytes | None = None
    data_out: bytes | None = None
    data_type: str | None = None

    @property
    def step(self) -> str:
        """The sub-command name for the encryption ioctls, else the ioctl name."""
        return self.command or self.name

    def __str__(self) -> str:
        res = f"= {self.ret}" + (f" ({self.errno})" if self.errno else "")
        return f"{self.fd_kind}:{self.step} {res}"


#: ``answer(fd, request, arg, call) -> (ret, errno)``: a stand-in for the syscall.
Answer = Callable[[int, int, typing.Any, "IoctlCall | None"], tuple[int, int]]


class IoctlRecorder:
    """Records every ioctl the kvm backend issues; optionally answers in the kernel's place.

        with IoctlRecorder() as rec:            # the real kernel answers
            ...
        with IoctlRecorder(answer=fake) as rec:  # ``fake(fd, request, arg, call)`` answers
            ...
        print([c.step for c in rec.calls])

    ``answer(fd, request, arg, call) -> (ret, errno)`` stands for the syscall:
    it reads the input through the cdata ``arg`` (``call`` already names the
    ioctl and sub-command), writes what the kernel would write back, and
    returns the result.  Calls ``answer`` itself makes through this module
    are passed on to it but not recorded (they are the fake kernel's own).
    Only one recorder is installed at a time.
    """

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer
        self.calls: list[IoctlCall] = []
        self._kinds: dict[int, str] = {}
        self._depth = 0

    # -- installation -------------------------------------------------------------
    def __enter__(self) -> IoctlRecorder:
        global _recorder
        if _recorder is not None:
            raise RuntimeError("an IoctlRecorder is already installed")
        _recorder = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _recorder
        _recorder = None

    def name_fd(self, fd: int, kind: str) -> None:
        """Say what ``fd`` is (for fds the recorder cannot classify by itself)."""
        self._kinds[fd] = kind

    # -- the seam -------------------------------------------------------------------
    def __call__(self, fd: int, request: int, arg: typing.Any) -> tuple[int, int]:
        if self._depth:  # the fake kernel's own calls
            return self._issue(fd, request, arg, None)
        name = IOCTL_NAMES.get(request, hex(request))
        call = IoctlCall(fd, self._kind(fd, name), request, name, _snapshot(arg))
        sub = _sub_command(name, arg)
        if sub is not None:
            call.command, call.data_type, addr = sub
            call.data_in = _read_struct(call.data_type, addr)
        self._depth += 1
        try:
            ret, err = self._issue(fd, request, arg, call)
        finally:
            self._depth -= 1
        call.ret, call.errno = ret, err
        out = _snapshot(arg)
        call.arg_out = out if isinstance(out, bytes) else None
        if sub is not None:
            call.data_out = _read_struct(call.data_type, sub[2])
        if ret >= 0 and name == "KVM_CREATE_VM":
            self._kinds[ret] = "vm"
        elif ret >= 0 and name == "KVM_CREATE_VCPU":
            self._kinds[ret] = "vcpu"
        self.calls.append(call)
        return ret, err

    def _issue(self, fd: int, request: int, arg: typing.Any,
               call: IoctlCall | None) -> tuple[int, int]:
        if self.answer is None:
            return _syscall(fd, request, arg)
        return self.answer(fd, request, arg, call)

    def _kind(self, fd: int, name: str) -> str:
        kind = self._kinds.get(fd)
        if kind is None:
            if name == "SEV_ISSUE_CMD":
                kind = "sev"
            elif name in _SYSTEM_IOCTLS:
                kind = "kvm"
            else:
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    target = ""
                kind = ("kvm" if target.endswith("/dev/kvm") else
                        "sev" if target.endswith("/dev/sev") else
                        "vcpu" if "kvm-vcpu" in target else "vm" if "kvm-vm" in target else "?")
            if kind != "?":
                self._kinds[fd] = kind
        return kind

    # -- reading the record ---------------------------------------------------------------
    def steps(self, *kinds: str) -> list[str]:
        """The call names in order (sub-command names for the encryption ioctls)."""
        return [c.step for c in self.calls if not kinds or c.fd_kind in kinds]

    def find(self, step: str) -> list[IoctlCall]:
        return [c for c in self.calls if c.step == step]


def _snapshot(arg: typing.Any) -> bytes | int | None:
    """The bytes behind a struct pointer, the int of a by-value argument, None for NULL."""
    if isinstance(arg, int):
        return arg
    if arg == NULL:
        return None
    ctype = ffi.typeof(arg)
    if ctype.kind == "pointer" and ctype.item.kind == "struct":
        return bytes(ffi.buffer(arg))
    return int(ffi.cast("uintptr_t", arg))  # a by-value argument passed as void *


def _sub_command(name: str, arg: typing.Any) -> tuple[str, str | None, int] | None:
    """(command name, data struct type, data address) of an encryption ioctl, else None."""
    if name == "KVM_MEMORY_ENCRYPT_OP" and arg != NULL:
        cmd = ffi.cast("struct kvm_sev_cmd *", arg)
        known, ctype = SEV_KVM_COMMANDS.get(cmd.id, (f"KVM_SEV_{cmd.id}", None))
        return known, ctype, int(cmd.data)
    if name == "SEV_ISSUE_CMD" and arg != NULL:
        cmd = ffi.cast("struct sev_issue_cmd *", arg)
        known, ctype = SEV_DEV_COMMANDS.get(cmd.cmd, (f"SEV_{cmd.cmd}", None))
        return known, ctype, int(cmd.data)
    return None


def _read_struct(ctype: str | None, addr: int) -> bytes | None:
    if ctype is None or not addr:
        return None
    return bytes(ffi.buffer(ffi.cast(ctype + " *", addr)))
