"""``/dev/sev``: the PSP driver's platform commands (SEV_ISSUE_CMD), docs/facts.md#facts-9.

One ioctl, ``SEV_ISSUE_CMD``, with a packed ``struct sev_issue_cmd`` (cmd u32,
data pointer u64 at offset 4, firmware ``error`` u32 out).  The driver
(drivers/crypto/ccp/sev-dev.c) answers some failures itself -- EPERM for a
mutating command on a read-only fd, EBUSY for FACTORY_RESET while guests run
(sev_ioctl_do_reset) -- and otherwise passes the firmware status back as EIO
plus ``error``.  Both channels end up in :class:`SevError`.

Variable-length outputs (GET_ID2, PEK_CSR, PDH_CERT_EXPORT) are read as the
driver intends: first with a zero length, which the firmware answers with
INVALID_LEN and the length it needs, then with a buffer of that size.
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import TYPE_CHECKING, Any

from ..backend import SEV_DEVICE
from ..errors import DeviceMissing, HostError, PermissionDenied, SevError
from ..sev.launch import SEV_FW_BLOB_MAX_SIZE, SevPlatformInterface
from ..sev.status import PlatformState, SevStatus
from . import _ffi as K
from ._ffi import ffi, ioctl_raw

if TYPE_CHECKING:
    from ..sev.firmware import PlatformStatus


def _fw(error: int, err: int) -> int | None:
    if error == 0 and err != errno.EIO:
        return None
    return -1 if error == 0xFFFFFFFF else error


class SevDevice(SevPlatformInterface):
    """An open ``/dev/sev``.  Destructive commands need ``allow_destructive=True``."""

    backend = "kvm"

    def __init__(self, path: str = SEV_DEVICE):
        self.path = path
        self.writable = True
        try:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                # read-only still allows PLATFORM_STATUS, GET_ID2 and (in INIT)
                # PDH_CERT_EXPORT; the mutating commands then give EPERM.
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self.writable = False
        except FileNotFoundError:
            missing = DeviceMissing(f"no {path}: load ccp, enable SEV in firmware; "
                                    "or use --backend sim for the simulated platform")
            missing.host_verdict = "sev"  # the CLI adds why this host has none (hostinfo)
            raise missing from None
        except PermissionError:
            raise PermissionDenied(f"cannot open {path}: permission denied. Run as root or give "
                                   "your user access with a udev rule") from None
        except OSError as e:
            raise HostError(f"cannot open {path}: {e.strerror or e}") from None
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    # -- plumbing -----------------------------------------------------------------
    def _issue(self, cmd: int, data: Any = ffi.NULL) -> tuple[int, int]:
        c = ffi.new("struct sev_issue_cmd *")
        c.cmd = cmd
        c.data = int(ffi.cast("uintptr_t", data))
        ret, err = ioctl_raw(self.fd, K.SEV_ISSUE_CMD, c)
        return (err if ret < 0 else 0), c.error

    def _op(self, name: str, cmd: int, data: Any = ffi.NULL) -> None:
        err, error = self._issue(cmd, data)
        if err:
            raise self._error(name, err, error)

    def _error(self, name: str, err: int, error: int) -> SevError:
        detail = ""
        if err == errno.EPERM:
            detail = f"{self.path} is open read-only; {name} needs it writable (run as root)"
        elif err == errno.EBUSY and name == "SEV_FACTORY_RESET":
            detail = "SEV guests are running (platform WORKING); stop them first"
        return SevError(name, err, _fw(error, err), detail)

    def _query_ok(self, err: int, error: int) -> bool:
        """A zero-length query: success, or EIO with INVALID_LEN (the length is filled in)."""
        return not err or (err == errno.EIO and error == SevStatus.INVALID_LEN)

    # -- commands -------------------------------------------------------------------
    def status(self) -> PlatformStatus:
        """SEV_PLATFORM_STATUS."""
        from ..sev.firmware import PlatformStatus

        s = ffi.new("struct sev_user_data_status *")
        self._op("SEV_PLATFORM_STATUS", K.SEV_PLATFORM_STATUS, s)
        return PlatformStatus(s.api_major, s.api_minor, PlatformState(s.state), s.flags, s.build,
                              s.guest_count)

    def _sized(self, name: str, cmd: int, ctype: str) -> bytes:
        """A {address, length} command: query the length, then read."""
        p = ffi.new(ctype)
        err, error = self._issue(cmd, p)
        if not self._query_ok(err, error) or not p.length:
            raise self._error(name, err or errno.EINVAL, error)
        n = p.length
        if n > SEV_FW_BLOB_MAX_SIZE:
            raise SevError(name, errno.EINVAL, None, f"firmware asks for {n} bytes")
        buf = ffi.new("char[]", n)
        p.address, p.length = int(ffi.cast("uintptr_t", buf)), n
        self._op(name, cmd, p)
        return bytes(ffi.buffer(buf, p.length))

    def get_id(self) -> bytes:
        """SEV_GET_ID2 (length queried first): the chip id, 64 bytes on current parts."""
        return self._sized("SEV_GET_ID2", K.SEV_GET_ID2, "struct sev_user_data_get_id2 *")

    def pek_csr(self) -> bytes:
        """SEV_PEK_CSR (length queried first)."""
        return self._sized("SEV_PEK_CSR", K.SEV_PEK_CSR, "struct sev_user_data_pek_csr *")

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """SEV_PDH_CERT_EXPORT: lengths queried first, then PDH and the chain."""
        name = "SEV_PDH_CERT_EXPORT"
        p = ffi.new("struct sev_user_data_pdh_cert_export *")
        err, error = self._issue(K.SEV_PDH_CERT_EXPORT, p)
        if not self._query_ok(err, error) or not p.pdh_cert_len or not p.cert_chain_len:
            raise self._error(name, err or errno.EINVAL, error)
        pdh = ffi.new("char[]", p.pdh_cert_len)
        chain = ffi.new("char[]", p.cert_chain_len)
        p.pdh_cert_address = int(ffi.cast("uintptr_t", pdh))
        p.cert_chain_address = int(ffi.cast("uintptr_t", chain))
        self._op(name, K.SEV_PDH_CERT_EXPORT, p)
        return bytes(ffi.buffer(pdh, p.pdh_cert_len)), bytes(ffi.buffer(chain, p.cert_chain_len))

    def _factory_reset(self) -> None:
        self._op("SEV_FACTORY_RESET", K.SEV_FACTORY_RESET)

    def _pek_gen(self) -> None:
        self._op("SEV_PEK_GEN", K.SEV_PEK_GEN)

    def _pdh_gen(self) -> None:
        self._op("SEV_PDH_GEN", K.SEV_PDH_GEN)

    def _pek_cert_import(self, pek_cert: bytes, oca_cert: bytes) -> None:
        p = ffi.new("struct sev_user_data_pek_cert_import *")
        pek = ffi.new("char[]", bytes(pek_cert))
        oca = ffi.new("char[]", bytes(oca_cert))
        p.pek_cert_address, p.pek_cert_len = int(ffi.cast("uintptr_t", pek)), len(pek_cert)
        p.oca_cert_address, p.oca_cert_len = int(ffi.cast("uintptr_t", oca)), len(oca_cert)
        self._op("SEV_PEK_CERT_IMPORT", K.SEV_PEK_CERT_IMPORT, p)

    def close(self) -> None:
        self._finalizer()
        self.fd = -1

    def __repr__(self) -> str:
        return f"SevDevice({self.path!r}, fd={self.fd}, writable={self.writable})"
