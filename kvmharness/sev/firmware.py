"""A simulated SEV firmware (the AMD Secure Processor's SEV API), for the simulator.

What it models, command by command, is the SEV firmware as the kernel exposes
it: the platform commands of /dev/sev (with the kernel driver's "INIT on first
use") and the guest commands KVM issues for KVM_MEMORY_ENCRYPT_OP.  Every
failure raises :class:`kvmharness.errors.SevError` the way the kernel reports
it: ``errno`` EIO with the firmware's SEV_RET_* code when the firmware refused
(the kernel's ``__sev_do_cmd_locked`` turns any non-zero status into -EIO and
copies the status into ``error``), or a plain errno with ``fw_error=None``
where the kernel refuses before calling the firmware.

State rules (AMD SEV API 55766, "Platform Management" and "Guest Management"):

    platform  UNINIT --INIT--> INIT --first LAUNCH_START--> WORKING
              WORKING --last DECOMMISSION--> INIT;  SHUTDOWN --> UNINIT
    PEK_GEN, PEK_CSR, PEK_CERT_IMPORT: INIT only.  PDH_GEN, PDH_CERT_EXPORT:
    INIT or WORKING.  FACTORY_RESET: UNINIT (the kernel shuts an INIT
    platform down first and refuses a WORKING one with EBUSY).
    guest     LAUNCH_START -> LUPDATE --LAUNCH_MEASURE--> LSECRET
              --LAUNCH_FINISH--> RUNNING; anything out of order is
              INVALID_GUEST_STATE, an unknown handle INVALID_GUEST.

Where the spec text was not at hand the choice is marked "(unconfirmed)".
The state table itself is the one in AMD's sev-tool (``sevapi.h``, from SEV
API 0.17 chapter 5.1.2 / 6.1.1).  Kernel-driver behaviour modelled is that of
mainline 4.16-6.x ``sev-dev.c``: /dev/sev commands that need INIT issue it on
first use and leave the platform INIT (the newest kernels shut it down again
afterwards; not modelled), PEK_GEN in WORKING reaches the firmware
(INVALID_PLATFORM_STATE), FACTORY_RESET in WORKING does not (EBUSY).

How the simulator drives a launch (what KVM does, facts 8g)::

    fw = SimulatedSevFirmware()
    fw.ensure_init()                          # KVM_SEV_INIT: sev_platform_init
    asid = fw.asids.allocate(es=False)        # KVM_SEV_INIT: sev_asid_new
    h = fw.launch_start(policy, dh_cert, session)
    fw.activate(h, asid)                      # KVM binds the ASID right away
    fw.launch_update_data(h, gpa, memoryview(ram)[gpa:gpa + n])
    m = fw.launch_measure(h)
    fw.launch_secret(h, hdr, trans, gpa, target_view)   # optional
    fw.launch_finish(h)
    ...                                       # guest runs with fw.guest_key(h)
    fw.deactivate(h); fw.decommission(h); fw.asids.free(asid)   # VM destroyed
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..errors import SevError
from .asid import AsidAllocator
from .certs import (
    CERT_SIZE,
    EMPTY_SIGNATURE,
    CertAlgo,
    CertificateError,
    CertUsage,
    PlatformCertChain,
    SevCertificate,
    generate_key,
)
from .measurement import (
    MEASUREMENT_LEN,
    VMSA_PAGE_SIZE,
    AttestationReport,
    LaunchDigest,
    LaunchMeasurement,
    compute_measure,
)
from .memcrypt import GuestKey
from .policy import GuestPolicy
from .session import (
    SECRET_FLAG_COMPRESSED,
    SECRET_HEADER_SIZE,
    SESSION_SIZE,
    SecretHeader,
    SessionBlob,
    aes128_ctr,
    ecdh_shared_secret,
    secret_mac,
    session_keys,
)
from .status import (
    SEV_STATUS_FLAGS_CONFIG_ES,
    SEV_STATUS_FLAGS_OWNER,
    GuestState,
    PlatformState,
    SevStatus,
)

PAGE_SIZE = 4096


def _fail(command: str, status: SevStatus, detail: str = "") -> SevError:
    return SevError(command, errno.EIO, int(status), detail)


def _refuse(command: str, err: int, detail: str) -> SevError:
    return SevError(command, err, None, detail)


@dataclasses.dataclass(frozen=True)
class PlatformStatus:
    """PLATFORM_STATUS output (``struct sev_user_data_status``, facts 9c)."""

    api_major: int
    api_minor: int
    state: PlatformState
    flags: int
    build: int
    guest_count: int

    @property
    def externally_owned(self) -> bool:
        return bool(self.flags & SEV_STATUS_FLAGS_OWNER)

    @property
    def config_es(self) -> bool:
        return bool(self.flags & SEV_STATUS_FLAGS_CONFIG_ES)

    def to_bytes(self) -> bytes:
        """The packed 12-byte struct (flags is an unaligned u32 at byte 3)."""
        return struct.pack("<BBBIBI", self.api_major, self.api_minor, self.state,
                           self.flags, self.build, self.guest_count)


@dataclasses.dataclass(frozen=True)
class GuestStatus:
    """GUEST_STATUS output (``struct kvm_sev_guest_status`` plus the ASID)."""

    handle: int
    policy: int
    asid: int
    state: GuestState


@dataclasses.dataclass
class _Guest:
    handle: int
    policy: GuestPolicy
    key: GuestKey
    tek: bytes
    tik: bytes
    state: GuestState = GuestState.LUPDATE
    asid: int = 0  # 0 = not activated
    digest: LaunchDigest = dataclasses.field(default_factory=LaunchDigest)
    measurement: LaunchMeasurement | None = None


class SimulatedSevFirmware:
    """A faithful-in-behaviour model of SEV firmware for one simulated chip.

    ``api_major/api_minor/build`` are what PLATFORM_STATUS reports (default
    1.55 build 21, a Milan-era firmware).  ``num_asids`` / ``min_sev_asid``
    are CPUID Fn8000_001F ECX / EDX; SEV-ES guests get ASIDs below
    ``min_sev_asid``.  ``es`` says whether INIT enables SEV-ES (CONFIG_ES).
    """

    def __init__(self, *, api_major: int = 1, api_minor: int = 55, build: int = 21,
                 num_asids: int = 509, min_sev_asid: int = 100, es: bool = True,
                 chip_id: bytes | None = None):
        self.api_major, self.api_minor, self.build = api_major, api_minor, build
        self.es_capable = es
        self.chip_id = os.urandom(64) if chip_id is None else bytes(chip_id)
        if len(self.chip_id) != 64:
            raise ValueError("chip_id is 64 bytes")
        self.state = PlatformState.UNINIT
        self._config_es = False
        self._guests: dict[int, _Guest] = {}
        self._next_handle = 1
        self._asid_owner: dict[int, int] = {}  # active ASID -> handle
        self._asid_dirty: set[int] = set()  # deactivated, not yet DF_FLUSHed
        self.asids = AsidAllocator(num_asids, min_sev_asid, flush=self.df_flush)
        # Chip identity: CEK is fused per chip (derived from the chip secret on
        # real parts), signed by the ASK with RSA-PSS as AMD's is; ark_cert and
        # ask_cert are the simulator's stand-in for AMD, in AMD's CA format (amd_ca.py).
        from .amd_ca import simulated_amd_roots

        self.ark_cert, self.ask_cert, ask_key = simulated_amd_roots()
        self._cek_key = generate_key()
        self._cek = self._new_cert(self._cek_key, CertUsage.CEK, CertAlgo.ECDSA_SHA256).signed(
            ask_key, CertUsage.ASK, CertAlgo.RSA_SHA256)
        self._owner_external = False
        self._self_own()

    # -- internal helpers ---------------------------------------------------
    def _new_cert(self, key: ec.EllipticCurvePrivateKey, usage: CertUsage,
                  algo: CertAlgo) -> SevCertificate:
        return SevCertificate.for_key(key, usage, algo, api_major=self.api_major,
                                      api_minor=self.api_minor)

    def _self_own(self) -> None:
        """New self-signed OCA, new PEK (signed by OCA and CEK), new PDH."""
        self._oca_key = generate_key()
        self._oca = self._new_cert(self._oca_key, CertUsage.OCA, CertAlgo.ECDSA_SHA256).signed(
            self._oca_key, CertUsage.OCA)
        self._pek_key = generate_key()
        self._pek = (self._new_cert(self._pek_key, CertUsage.PEK, CertAlgo.ECDSA_SHA256)
                     .signed(self._oca_key, CertUsage.OCA).signed(self._cek_key, CertUsage.CEK))
        self._owner_external = False
        self._new_pdh()

    def _new_pdh(self) -> None:
        self._pdh_key = generate_key()
        self._pdh = self._new_cert(self._pdh_key, CertUsage.PDH, CertAlgo.ECDH_SHA256).signed(
            self._pek_key, CertUsage.PEK)

    def _require_platform(self, command: str, *allowed: PlatformState) -> None:
        if self.state not in allowed:
            names = "/".join(s.name for s in allowed)
            raise _fail(command, SevStatus.INVALID_PLATFORM_STATE,
                        f"platform is {self.state.name}, {command} needs {names}")

    def _guest(self, command: str, handle: int) -> _Guest:
        guest = self._guests.get(handle)
        if guest is None:
            raise _fail(command, SevStatus.INVALID_GUEST, f"no guest with handle {handle}")
        return guest

    @staticmethod
    def _require_state(command: str, guest: _Guest, *allowed: GuestState) -> None:
        if guest.state not in allowed:
            names = "/".join(s.name for s in allowed)
            raise _fail(command, SevStatus.INVALID_GUEST_STATE,
                        f"guest {guest.handle} is {guest.state.name}, {command} needs {names}")

    @staticmethod
    def _require_active(command: str, guest: _Guest) -> None:
        if not guest.asid:
            raise _fail(command, SevStatus.INACTIVE,
                        f"guest {guest.handle} has no ASID; ACTIVATE it first")

    @staticmethod
    def _writable(command: str, buf) -> memoryview:
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError(f"{command}: pass a writable buffer (the firmware writes in place)")
        return view

    @staticmethod
    def _check_block_span(command: str, gpa: int, length: int) -> None:
        if gpa % 16:
            raise _fail(command, SevStatus.INVALID_ADDRESS,
                        f"address 0x{gpa:x} is not 16-byte aligned")
        if length % 16:
            raise _fail(command, SevStatus.INVALID_LEN, f"length {length} is not a multiple of 16")

    # -- platform commands ----------------------------------------------------
    def init(self) -> None:
        """INIT (0x001): UNINIT -> INIT.  A second INIT is INVALID_PLATFORM_STATE."""
        self._require_platform("INIT", PlatformState.UNINIT)
        self.state = PlatformState.INIT
        self._config_es = self.es_capable

    def ensure_init(self) -> None:
        """The kernel's sev_platform_init: INIT unless already initialized."""
        if self.state == PlatformState.UNINIT:
            self.init()

    def shutdown(self) -> None:
        """SHUTDOWN (0x002): any state -> UNINIT; every guest context is lost."""
        self._guests.clear()
        self._asid_dirty |= set(self._asid_owner)
        self._asid_owner.clear()
        self.state = PlatformState.UNINIT
        self._config_es = False

    def platform_status(self) -> PlatformStatus:
        """PLATFORM_STATUS (0x004): API version, state, owner/CONFIG_ES flags, guests."""
        flags = (SEV_STATUS_FLAGS_OWNER if self._owner_external else 0) | (
            SEV_STATUS_FLAGS_CONFIG_ES if self._config_es else 0)
        return PlatformStatus(self.api_major, self.api_minor, self.state, flags, self.build,
                              len(self._guests))

    def factory_reset(self) -> None:
        """FACTORY_RESET (0x003, /dev/sev SEV_FACTORY_RESET): forget the owner, new keys.

        The firmware accepts it only in UNINIT.  Modelled as the kernel's
        sev_ioctl_do_reset: a WORKING platform is refused with EBUSY before the
        firmware is called (guests would lose their keys); an INIT platform is
        shut down first.
        """
        if self.state == PlatformState.WORKING:
            raise _refuse("FACTORY_RESET", errno.EBUSY,
                          f"{len(self._guests)} SEV guest(s) are running; stop them first")
        if self.state == PlatformState.INIT:
            self.shutdown()
        self._self_own()

    def pek_gen(self) -> None:
        """PEK_GEN (0x005): new OCA (self-signed), PEK and PDH; the platform is self-owned.

        INIT only: WORKING gives INVALID_PLATFORM_STATE.  INITs on first use.
        """
        self.ensure_init()
        self._require_platform("PEK_GEN", PlatformState.INIT)
        self._self_own()

    def pek_csr(self) -> bytes:
        """PEK_CSR (0x006): the PEK certificate, unsigned, for an owner's OCA to sign."""
        self.ensure_init()
        self._require_platform("PEK_CSR", PlatformState.INIT)
        return dataclasses.replace(self._pek, sigs=(EMPTY_SIGNATURE, EMPTY_SIGNATURE)).to_bytes()

    def pek_cert_import(self, pek_cert: bytes, oca_cert: bytes) -> None:
        """PEK_CERT_IMPORT (0x007): take ownership with an owner-signed PEK and its OCA.

        The OCA must be self-signed and the PEK certificate must carry the
        platform's current PEK key signed by that OCA (BAD_SIGNATURE
        otherwise; a malformed certificate is INVALID_CERTIFICATE).  The
        firmware adds its CEK signature.  An externally owned platform must be
        reset (PEK_GEN or FACTORY_RESET) first: ALREADY_OWNED (unconfirmed).
        """
        cmd = "PEK_CERT_IMPORT"
        self.ensure_init()
        self._require_platform(cmd, PlatformState.INIT)
        if self._owner_external:
            raise _fail(cmd, SevStatus.ALREADY_OWNED, "platform already has an external owner")
        try:
            pek = SevCertificate.from_bytes(pek_cert)
            oca = SevCertificate.from_bytes(oca_cert)
            pek.expect_usage(CertUsage.PEK)
            oca.expect_usage(CertUsage.OCA)
            oca.public_key()
        except CertificateError as exc:
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE, str(exc)) from None
        if (pek.qx, pek.qy) != (self._pek.qx, self._pek.qy):
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE,
                        "PEK certificate does not hold this platform's PEK (use PEK_CSR)")
        if not oca.is_signed_by(oca) or not pek.is_signed_by(oca):
            raise _fail(cmd, SevStatus.BAD_SIGNATURE, "OCA or PEK signature does not verify")
        self._oca = oca
        self._oca_key = None  # the owner keeps it
        oca_sig = next(s for s in pek.sigs if s.usage == CertUsage.OCA and not s.empty)
        self._pek = dataclasses.replace(pek, sigs=(oca_sig, EMPTY_SIGNATURE)).signed(
            self._cek_key, CertUsage.CEK)
        self._owner_external = True
        self._new_pdh()

    def pdh_gen(self) -> None:
        """PDH_GEN (0x009): new PDH key signed by the PEK (INIT or WORKING)."""
        self.ensure_init()
        self._require_platform("PDH_GEN", PlatformState.INIT, PlatformState.WORKING)
        self._new_pdh()

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT (0x008): (PDH certificate, cert chain PEK||OCA||CEK)."""
        self.ensure_init()
        self._require_platform("PDH_CERT_EXPORT", PlatformState.INIT, PlatformState.WORKING)
        return self._pdh.to_bytes(), PlatformCertChain(self._pek, self._oca, self._cek).to_bytes()

    def get_id(self) -> bytes:
        """GET_ID (0x00C, /dev/sev SEV_GET_ID2): the 64-byte chip id (any state)."""
        return self.chip_id

    def df_flush(self) -> None:
        """DF_FLUSH (0x00A): flush data fabric write buffers; deactivated ASIDs become reusable.

        (KVM does WBINVD on every CPU first; the model does not track caches.)
        """
        self._require_platform("DF_FLUSH", PlatformState.INIT, PlatformState.WORKING)
        self._asid_dirty.clear()

    # -- guest lifecycle ------------------------------------------------------
    def launch_start(self, policy: GuestPolicy | int, dh_cert: bytes | None = None,
                     session: bytes | None = None, handle: int = 0) -> int:
        """LAUNCH_START (0x030): create a guest context; return its handle.

        With ``dh_cert`` (the owner's GODH certificate) and ``session`` (the
        128-byte blob) the firmware derives KEK/KIK by ECDH with its PDH key,
        checks the wrap MAC and unwraps the owner's TEK/TIK, then checks the
        policy MAC; a MAC that does not verify is BAD_MEASUREMENT (also when
        the host altered the policy).  Without them (an unattested launch, as
        the KVM selftests do) it picks TEK/TIK itself.  A policy with reserved
        bits set or a minimum API above this firmware's is POLICY_FAILURE, as
        is an ES policy on a platform initialized without SEV-ES
        (unconfirmed).  ``handle`` != 0 asks to share that guest's memory key;
        refused with POLICY_FAILURE if either policy has NOKS.
        """
        cmd = "LAUNCH_START"
        self._require_platform(cmd, PlatformState.INIT, PlatformState.WORKING)
        policy = policy if isinstance(policy, GuestPolicy) else GuestPolicy(int(policy))
        if policy.reserved:
            raise _fail(cmd, SevStatus.POLICY_FAILURE,
                        f"policy 0x{policy.value:08x} sets reserved bits 15:6")
        if not policy.api_satisfied_by(self.api_major, self.api_minor):
            raise _fail(cmd, SevStatus.POLICY_FAILURE,
                        f"policy requires firmware API >= {policy.api_major}.{policy.api_minor}, "
                        f"this firmware is {self.api_major}.{self.api_minor}")
        if policy.es and not self._config_es:
            raise _fail(cmd, SevStatus.POLICY_FAILURE,
                        "policy requires SEV-ES but the platform was initialized without it")
        key = None
        if handle:
            other = self._guest(cmd, handle)
            if other.policy.noks or policy.noks:
                raise _fail(cmd, SevStatus.POLICY_FAILURE,
                            f"key sharing with guest {handle} refused: a policy has NOKS")
            key = other.key
        if dh_cert is None:
            if session is not None:
                raise _fail(cmd, SevStatus.INVALID_PARAM, "a session blob needs a DH certificate")
            tek, tik = os.urandom(16), os.urandom(16)
        else:
            tek, tik = self._unwrap_session(cmd, policy, dh_cert, session)
        new = self._next_handle
        self._next_handle += 1
        self._guests[new] = _Guest(new, policy, key or GuestKey(), tek, tik)
        self.state = PlatformState.WORKING
        return new

    def _unwrap_session(self, cmd: str, policy: GuestPolicy, dh_cert: bytes,
                        session: bytes | None) -> tuple[bytes, bytes]:
        if len(dh_cert) != CERT_SIZE:
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"DH certificate is {len(dh_cert)} bytes, want {CERT_SIZE}")
        if session is None or len(session) != SESSION_SIZE:
            got = "none" if session is None else f"{len(session)} bytes"
            raise _fail(cmd, SevStatus.INVALID_LEN, f"session blob is {got}, want {SESSION_SIZE}")
        try:
            godh = SevCertificate.from_bytes(dh_cert)
            godh.expect_usage(CertUsage.PDH)
            if godh.algo not in (CertAlgo.ECDH_SHA256, CertAlgo.ECDH_SHA384):
                raise CertificateError(f"DH certificate algorithm 0x{godh.algo:x} is not ECDH")
            peer = godh.public_key()
            if not isinstance(peer.curve, ec.SECP384R1):
                raise CertificateError("DH certificate key is not P-384")
        except CertificateError as exc:
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE, str(exc)) from None
        blob = SessionBlob.from_bytes(session)
        kek, kik = session_keys(ecdh_shared_secret(self._pdh_key, peer), blob.nonce)
        if not blob.wrap_mac_ok(kik):
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT,
                        "session wrap MAC does not verify: the blob was made for another "
                        "PDH key (PDH_GEN or PEK_GEN since?) or was altered")
        tek, tik = blob.unwrap(kek)
        if not blob.policy_mac_ok(tik, policy.value):
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT,
                        f"policy MAC does not verify for policy 0x{policy.value:08x}: the "
                        "owner signed a different policy")
        return tek, tik

    def activate(self, handle: int, asid: int) -> None:
        """ACTIVATE (0x021): bind the guest's key to ``asid``.

        INVALID_ASID if ``asid`` is 0, above CPUID ECX, or of the wrong kind
        (an ES guest needs an ASID below CPUID EDX, a plain SEV guest one at or
        above it); ASID_OWNED if another active guest holds it;
        DFFLUSH_REQUIRED if it was deactivated and DF_FLUSH has not run since;
        ACTIVE if this guest is already active (unconfirmed).
        """
        cmd = "ACTIVATE"
        guest = self._guest(cmd, handle)
        if not 1 <= asid <= self.asids.num_asids:
            raise _fail(cmd, SevStatus.INVALID_ASID,
                        f"ASID {asid} outside 1..{self.asids.num_asids}")
        if asid not in self.asids.range_for(guest.policy.es):
            kind = "SEV-ES" if guest.policy.es else "SEV"
            r = self.asids.range_for(guest.policy.es)
            raise _fail(cmd, SevStatus.INVALID_ASID,
                        f"ASID {asid} is not a {kind} ASID ({r.start}..{r.stop - 1})")
        if guest.asid:
            raise _fail(cmd, SevStatus.ACTIVE, f"guest {handle} is already active on ASID "
                        f"{guest.asid}")
        owner = self._asid_owner.get(asid)
        if owner is not None:
            raise _fail(cmd, SevStatus.ASID_OWNED, f"ASID {asid} belongs to guest {owner}")
        if asid in self._asid_dirty:
            raise _fail(cmd, SevStatus.DFFLUSH_REQUIRED,
                        f"ASID {asid} was deactivated; run DF_FLUSH before reusing it")
        guest.asid = asid
        self._asid_owner[asid] = handle

    def deactivate(self, handle: int) -> None:
        """DEACTIVATE (0x022): unbind the guest's ASID (INACTIVE if it has none, unconfirmed).

        The ASID then needs a DF_FLUSH before any guest may ACTIVATE on it.
        """
        guest = self._guest("DEACTIVATE", handle)
        self._require_active("DEACTIVATE", guest)
        del self._asid_owner[guest.asid]
        self._asid_dirty.add(guest.asid)
        guest.asid = 0

    def decommission(self, handle: int) -> None:
        """DECOMMISSION (0x020): delete the guest context (ACTIVE if still active).

        The platform drops back to INIT when its last guest goes.
        """
        guest = self._guest("DECOMMISSION", handle)
        if guest.asid:
            raise _fail("DECOMMISSION", SevStatus.ACTIVE,
                        f"guest {handle} is active on ASID {guest.asid}; DEACTIVATE first")
        del self._guests[handle]
        if not self._guests and self.state == PlatformState.WORKING:
            self.state = PlatformState.INIT

    def guest_status(self, handle: int) -> GuestStatus:
        """GUEST_STATUS (0x023): policy, ASID (0 if inactive) and state."""
        guest = self._guest("GUEST_STATUS", handle)
        return GuestStatus(handle, guest.policy.value, guest.asid, guest.state)

    def guest_key(self, handle: int) -> GuestKey:
        """The guest's memory key, for the simulated memory controller (not a command)."""
        return self._guest("GUEST_KEY", handle).key

    # -- launch ---------------------------------------------------------------
    def launch_update_data(self, handle: int, gpa: int, buf) -> None:
        """LAUNCH_UPDATE_DATA (0x031): measure ``buf`` and encrypt it in place.

        ``buf`` is a writable view of the plaintext that lives at physical
        address ``gpa`` (the tweak).  The plaintext extends the launch
        digest, then is replaced by its ciphertext under the guest's key.
        Needs LUPDATE and an active guest; address and length 16-byte
        aligned (INVALID_ADDRESS / INVALID_LEN).  An empty region is refused
        by KVM itself (EINVAL).
        """
        cmd = "LAUNCH_UPDATE_DATA"
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LUPDATE)
        self._require_active(cmd, guest)
        view = self._writable(cmd, buf)
        if not len(view):
            raise _refuse(cmd, errno.EINVAL, "empty region")
        self._check_block_span(cmd, gpa, len(view))
        guest.digest.update_data(view)
        guest.key.encrypt_into(gpa, view)

    def launch_update_vmsa(self, handle: int, gpa: int, page) -> None:
        """LAUNCH_UPDATE_VMSA (0x032): measure and encrypt one vCPU's 4 KiB VMSA page.

        SEV-ES guests only (KVM refuses others with ENOTTY before the
        firmware); ``page`` is a writable 4096-byte view at page-aligned
        ``gpa``.  Call it after the data updates, vCPU 0 first, as KVM does.
        """
        cmd = "LAUNCH_UPDATE_VMSA"
        guest = self._guest(cmd, handle)
        if not guest.policy.es:
            raise _refuse(cmd, errno.ENOTTY, f"guest {handle} is not an SEV-ES guest")
        self._require_state(cmd, guest, GuestState.LUPDATE)
        self._require_active(cmd, guest)
        view = self._writable(cmd, page)
        if gpa % PAGE_SIZE:
            raise _fail(cmd, SevStatus.INVALID_ADDRESS, f"VMSA address 0x{gpa:x} is not "
                        "page aligned")
        if len(view) != VMSA_PAGE_SIZE:
            raise _fail(cmd, SevStatus.INVALID_LEN, f"a VMSA is {VMSA_PAGE_SIZE} bytes, "
                        f"got {len(view)}")
        guest.digest.update_vmsa(view)
        guest.key.encrypt_into(gpa, view)

    def launch_measure(self, handle: int, length: int = MEASUREMENT_LEN) -> LaunchMeasurement:
        """LAUNCH_MEASURE (0x033): the 48-byte measurement; LUPDATE -> LSECRET.

        ``length`` is the caller's buffer size: below 48 the firmware answers
        INVALID_LEN (that is how KVM's length query works).
        """
        cmd = "LAUNCH_MEASURE"
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LUPDATE)
        if length < MEASUREMENT_LEN:
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"buffer is {length} bytes, the measurement needs {MEASUREMENT_LEN}")
        mnonce = os.urandom(16)
        measure = compute_measure(guest.tik, api_major=self.api_major, api_minor=self.api_minor,
                                  build=self.build, policy=guest.policy.value,
                                  digest=guest.digest.digest(), mnonce=mnonce)
        guest.measurement = LaunchMeasurement(measure, mnonce)
        guest.state = GuestState.LSECRET
        return guest.measurement

    def launch_secret(self, handle: int, header: bytes, trans: bytes, gpa: int, target) -> None:
        """LAUNCH_UPDATE_SECRET (0x034, KVM_SEV_LAUNCH_SECRET): inject an owner secret.

        Checks the packet MAC with the TIK (over flags, IV, lengths,
        ciphertext and the MEASURE this guest reported; BAD_MEASUREMENT if it
        does not verify), decrypts ``trans`` with the TEK and writes the
        secret, encrypted with the guest's key for address ``gpa``, into the
        writable view ``target`` (the guest's memory there).  LSECRET only.
        KVM refuses a target that crosses a page with EINVAL.
        """
        cmd = "LAUNCH_SECRET"
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LSECRET)
        view = self._writable(cmd, target)
        if (gpa % PAGE_SIZE) + len(view) > PAGE_SIZE:
            raise _refuse(cmd, errno.EINVAL, "the secret's target must lie within one page")
        if len(header) != SECRET_HEADER_SIZE:
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"packet header is {len(header)} bytes, want {SECRET_HEADER_SIZE}")
        hdr = SecretHeader.from_bytes(header)
        if hdr.flags & SECRET_FLAG_COMPRESSED:
            raise _fail(cmd, SevStatus.UNSUPPORTED, "compressed secrets are not supported")
        if len(trans) != len(view):
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"transport data is {len(trans)} bytes but the guest area {len(view)}")
        self._check_block_span(cmd, gpa, len(view))
        self._require_active(cmd, guest)
        mac = secret_mac(guest.tik, hdr.flags, hdr.iv, len(view), bytes(trans),
                         guest.measurement.measure)
        if not hmac.compare_digest(mac, hdr.mac):
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT,
                        "secret packet MAC does not verify (wrong TIK, altered packet, or "
                        "built for another measurement)")
        view[:] = guest.key.encrypt(gpa, aes128_ctr(guest.tek, hdr.iv, bytes(trans)))

    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH (0x035): LSECRET -> RUNNING (measure first, else INVALID_GUEST_STATE)."""
        guest = self._guest("LAUNCH_FINISH", handle)
        self._require_state("LAUNCH_FINISH", guest, GuestState.LSECRET)
        guest.state = GuestState.RUNNING
        # The transport keys are not needed once the launch is over.
        guest.tek = guest.tik = b""

    def attestation_report(self, handle: int, mnonce: bytes) -> bytes:
        """ATTESTATION_REPORT (0x036): the 208-byte launch report, signed with the PEK.

        ``mnonce`` (16 bytes) is the caller's freshness nonce.  Allowed once
        the launch is measured: LSECRET or RUNNING (unconfirmed).
        """
        cmd = "ATTESTATION_REPORT"
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LSECRET, GuestState.RUNNING)
        if len(mnonce) != 16:
            raise _refuse(cmd, errno.EINVAL, f"mnonce is 16 bytes, got {len(mnonce)}")
        unsigned = AttestationReport(bytes(mnonce), guest.digest.digest(), guest.policy.value,
                                     CertUsage.PEK, CertAlgo.ECDSA_SHA256, 0, 0)
        der = self._pek_key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return dataclasses.replace(unsigned, r=r, s=s).to_bytes()

    # -- debug ----------------------------------------------------------------
    def _dbg(self, cmd: str, handle: int, gpa: int, data) -> _Guest:
        guest = self._guest(cmd, handle)
        if guest.policy.nodbg:
            raise _fail(cmd, SevStatus.POLICY_FAILURE,
                        f"guest {handle}'s policy has NODBG; debugging is refused")
        self._require_active(cmd, guest)
        self._check_block_span(cmd, gpa, len(data))
        return guest

    def dbg_decrypt(self, handle: int, gpa: int, ciphertext) -> bytes:
        """DBG_DECRYPT (0x060): plaintext of guest memory at ``gpa``.

        POLICY_FAILURE if the policy has NODBG.  16-byte granules (KVM
        widens unaligned requests itself, using bounce buffers).
        """
        guest = self._dbg("DBG_DECRYPT", handle, gpa, ciphertext)
        return guest.key.decrypt(gpa, ciphertext)

    def dbg_encrypt(self, handle: int, gpa: int, plaintext) -> bytes:
        """DBG_ENCRYPT (0x061): ciphertext to store at ``gpa`` (POLICY_FAILURE with NODBG)."""
        guest = self._dbg("DBG_ENCRYPT", handle, gpa, plaintext)
        return guest.key.encrypt(gpa, plaintext)
