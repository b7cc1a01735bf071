"""The one exception tree of kvmharness.

Every error a user can meet is a :class:`HarnessError`; the CLI prints its
message (never a traceback) and exits with its ``exit_code``.  Each backend maps
its low-level failures into this tree in exactly one place (the KVM backend in
``kvm/_ffi.py:check``, the SEV firmware in ``sev/``).
"""

from __future__ import annotations

import errno as _errno
import os

# CLI exit codes (documented in the README and `kvmharness --help`).
EXIT_OK = 0
EXIT_GUEST_FAILED = 1  # the guest ran and reported failure / unexpected exit
EXIT_USAGE = 2  # bad command line, unknown guest, bad manifest
EXIT_HOST = 3  # the host cannot do what was asked (no /dev/kvm, no SEV, EACCES)
EXIT_TIMEOUT = 4  # the guest did not finish within --timeout
EXIT_INTERNAL = 5  # a bug in kvmharness: please report it


class HarnessError(Exception):
    """Base of every kvmharness error."""

    exit_code = EXIT_INTERNAL
    #: The ``kvmharness info`` verdict ("sev", "sev-es", ...) that explains this error on the
    #: host at hand.  The bindings state the bare fact (the ioctl, the errno, the missing
    #: device) and set this; the CLI's error printer adds the host's reason (hostinfo).
    host_verdict: str | None = None


class UsageError(HarnessError):
    """The caller asked for something malformed (bad guest, bad argument)."""

    exit_code = EXIT_USAGE


class GuestImageError(UsageError):
    """A guest image or its manifest entry is missing or malformed."""


class HostError(HarnessError):
    """The host lacks a device, permission or feature the request needs."""

    exit_code = EXIT_HOST


class DeviceMissing(HostError):
    """A device node (/dev/kvm, /dev/sev) does not exist."""


class PermissionDenied(HostError):
    """A device node exists but cannot be opened (EACCES/EPERM)."""


class FeatureUnavailable(HostError):
    """The device works but lacks a feature (SVM, SEV, a VM type, a cap)."""


class KvmError(HarnessError):
    """An ioctl on a KVM fd failed.  Carries the ioctl name and the errno."""

    exit_code = EXIT_HOST

    def __init__(self, ioctl: str, errno: int, detail: str = ""):
        self.ioctl = ioctl
        self.errno = errno
        self.detail = detail
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{ioctl} failed: {name} ({errno}): {os.strerror(errno)}"
        if detail:
            msg += f" -- {detail}"
        super().__init__(msg)


class SevError(HarnessError):
    """A SEV command failed: carries the errno *and* the firmware status.

    ``fw_error`` is the firmware's SEV_RET_* code (``None`` when the firmware
    was never reached, e.g. the kernel refused the ioctl first).
    """

    exit_code = EXIT_HOST

    def __init__(self, command: str, errno: int, fw_error: int | None, detail: str = ""):
        from .sev.status import status_name  # local: keeps errors.py import-light

        self.command = command
        self.errno = errno
        self.fw_error = fw_error
        self.fw_name = status_name(fw_error) if fw_error is not None else None
        self.detail = detail
        parts = [f"{command} failed"]
        if errno:
            parts.append(f"errno {_errno.errorcode.get(errno, errno)} ({errno})")
        if fw_error is not None:
            parts.append(f"firmware {self.fw_name} (0x{fw_error & 0xFFFFFFFF:x})")
        msg = ": ".join([parts[0], ", ".join(parts[1:])]) if len(parts) > 1 else parts[0]
        if detail:
            msg += f" -- {detail}"
        super().__init__(msg)


class MeasurementMismatch(HarnessError):
    """The firmware's launch measurement is not the one the owner expected.

    Means the guest image, the VMSA, the policy or the firmware version differs
    from what the owner measured, or the firmware does not hold the owner's
    TIK.  Do not release secrets to this guest.
    """

    exit_code = EXIT_GUEST_FAILED


class CertificateError(HarnessError):
    """A SEV certificate is malformed, has the wrong usage, or fails its signature."""

    exit_code = EXIT_HOST


class GuestTimeout(HarnessError):
    """The guest did not finish within its time budget; the VM was torn down."""

    exit_code = EXIT_TIMEOUT

    def __init__(self, guest: str, seconds: float, exits: int, last_exit: object = None):
        self.guest = guest
        self.seconds = seconds
        self.exits = exits
        self.last_exit = last_exit
        msg = f"guest {guest!r} did not finish within {seconds:g} s ({exits} exits handled"
        if last_exit is not None:
            msg += f", last: {last_exit}"
        msg += "); the VM was torn down"
        super().__init__(msg)


class GuestFailure(HarnessError):
    """The guest reported a failure (assertion with code and line) or crashed."""

    exit_code = EXIT_GUEST_FAILED

    def __init__(self, guest: str, message: str, *, code: int | None = None,
                 line: int | None = None, result: object = None):
        self.guest = guest
        self.code = code
        self.line = line
        self.result = result
        super().__init__(f"guest {guest!r}: {message}")


class UnexpectedExit(GuestFailure):
    """The guest caused an exit no device or handler accepts."""


class SimulatorError(HarnessError):
    """The simulator reached a state it does not model (a bug or a gap)."""

    exit_code = EXIT_INTERNAL
