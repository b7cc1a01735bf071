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
              INVALID_GUEST_STATE, an unknown handle INVALID_GUEST (but
              GUEST_STATUS answers state INVALID).

Every status and the order of the checks follow AMD's published SEV firmware
source (github.com/amd/AMD-ASPFW: sev_mcmd.c, sev_guest.c, sev_plat.c,
sev_cert.c, sev_channel.c, sev_es.c), listed check by check in
:data:`AMD_FIRMWARE_CHECKS` (rendered in docs/sev-firmware-checks.md).  The
platform state is checked before the handle, the handle before the guest
state, as that source does.  Kernel-driver behaviour modelled is that of
mainline 4.16-6.x ``sev-dev.c``: /dev/sev commands that need INIT issue it on
first use and leave the platform INIT (the newest kernels shut it down again
afterwards; not modelled), PEK_GEN in WORKING reaches the firmware
(INVALID_PLATFORM_STATE), FACTORY_RESET in WORKING does not (EBUSY).

How the simulator drives a launch (what KVM does, docs/facts.md#facts-8g)::

    fw = SimulatedSevFirmware()
    fw.ensure_init()                          # KVM_SEV_INIT: sev_platform_init (INIT, DF_FLUSH)
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
    ATTESTATION_REPORT_LEN,
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
    SEV_INIT_FLAGS_ES,
    SEV_STATUS_FLAGS_CONFIG_ES,
    SEV_STATUS_FLAGS_OWNER,
    GuestState,
    PlatformState,
    SevStatus,
)

SCRATCH_BUF_LEN = 0x5000  # SEV_SCRATCH_BUF_LEN (sev_globals.h): the largest LAUNCH_SECRET


def _fail(command: str, status: SevStatus, detail: str = "", check: str | None = None) -> SevError:
    """The firmware refused: EIO plus its status.  ``check`` names the row of
    :data:`AMD_FIRMWARE_CHECKS` that fired (kept on the error as ``fw_check``)."""
    err = SevError(command, errno.EIO, int(status), detail)
    err.fw_check = check
    return err


def _usage_text(usage: int) -> str:
    try:
        return CertUsage(usage).name
    except ValueError:
        return f"usage 0x{usage:x}"


def _refuse(command: str, err: int, detail: str) -> SevError:
    return SevError(command, err, None, detail)


@dataclasses.dataclass(frozen=True)
class PlatformStatus:
    """PLATFORM_STATUS output (``struct sev_user_data_status``, docs/facts.md#facts-9c)."""

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


#: The API version in the body of the KDS's ASK-signed CEKs: 0.14 in both real captures
#: (tests/data/sev/{naples,rome}/cek.cert, whose platforms' own certificates say 0.16 and
#: 0.22), while an exported CEK carries the exporting firmware's version (sev_cert_init).
KDS_CEK_API = (0, 14)


class SimulatedKds:
    """AMD's Key Distribution Service for simulated chips: the ASK-signed CEK by chip id.

    Real guest owners fetch ``https://kdsintf.amd.com/cek/id/<chip id>`` (the 64-byte
    GET_ID value in hex; virtee/sevctl ``src/main.rs`` ``chain()`` replaces the exported
    CEK with it, ``sevctl export --full``).  kvmharness never uses the network: on a real
    platform the user fetches the file and passes it (``sev verify --cek``,
    ``GuestOwner(cek=...)``); a simulated chip publishes its CEK here, read with
    :meth:`cek` (bytes) or :meth:`open` (a file-like object, as the download would be).
    """

    URL = "https://kdsintf.amd.com/cek/id/"

    def __init__(self) -> None:
        import weakref

        # chip id -> its SimulatedSevFirmware (weakly: a simulated chip that is gone is gone)
        self._chips: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def publish(self, chip: SimulatedSevFirmware) -> None:
        self._chips[bytes(chip.chip_id)] = chip

    def url(self, chip_id: bytes) -> str:
        return self.URL + bytes(chip_id).hex()

    def cek(self, chip_id: bytes) -> bytes:
        """The ASK-signed CEK of ``chip_id``; ``LookupError`` for a chip it does not know."""
        chip = self._chips.get(bytes(chip_id))
        if chip is None:
            raise LookupError(f"the simulated KDS has no CEK for chip id "
                              f"{bytes(chip_id).hex()[:16]}...")
        return chip._kds_cek.to_bytes()

    def open(self, chip_id: bytes):
        import io

        return io.BytesIO(self.cek(chip_id))


SIMULATED_KDS = SimulatedKds()


class SimulatedSevFirmware:
    """A faithful-in-behaviour model of SEV firmware for one simulated chip.

    ``api_major/api_minor/build`` are what PLATFORM_STATUS reports (default
    1.55 build 21, a Milan-era firmware).  ``num_asids`` / ``min_sev_asid``
    are CPUID Fn8000_001F ECX / EDX; SEV-ES guests get ASIDs below
    ``min_sev_asid``.  ``es`` says whether the chip has SEV-ES (the kernel
    then INITs with CONFIG_ES).  ``max_guests`` is the firmware's
    guest-context table (SEV_GUEST_COUNT_MAX, 1024 in AMD's source): handles
    are 1..max_guests, the lowest free one is handed out, and a full table is
    RESOURCE_LIMIT.

    ASIDs follow AMD's firmware (sev_mcmd.c ``activate_common``,
    ``sev_mcmd_deactivate``, ``mcmd_df_flush_common``; one CCX modelled):
    each is *dirty*, *clean*, *allocated* (bound to a guest that has not run)
    or *in use* (bound to a RUNNING guest).  INIT makes every ASID dirty;
    DF_FLUSH (after a WBINVD on every core, :meth:`wbinvd`) cleans them;
    DEACTIVATE of a guest that never ran leaves its ASID clean, of one that
    ran leaves it dirty and clears the WBINVD-done state.  Every check and
    the status it returns is listed in :data:`AMD_FIRMWARE_CHECKS`.
    """

    def __init__(self, *, api_major: int = 1, api_minor: int = 55, build: int = 21,
                 num_asids: int = 509, min_sev_asid: int = 100, es: bool = True,
                 chip_id: bytes | None = None, max_guests: int = 1024):
        self.api_major, self.api_minor, self.build = api_major, api_minor, build
        self.es_capable = es
        self.chip_id = os.urandom(64) if chip_id is None else bytes(chip_id)
        if len(self.chip_id) != 64:
            raise ValueError("chip_id is 64 bytes")
        self.state = PlatformState.UNINIT
        self._config_es = False
        self._guests: dict[int, _Guest] = {}
        self.max_guests = max_guests
        self._asid_owner: dict[int, int] = {}  # bound ASID -> handle (allocated or in use)
        self._asid_dirty: set[int] = set(range(1, num_asids + 1))  # dirty from power-on
        self._wbinvd_done = False  # every core's WBINVD_DONE flag (one CCX modelled)
        self.asids = AsidAllocator(num_asids, min_sev_asid, flush=self.kernel_flush)
        # Chip identity: the CEK key is fused per chip (derived from the chip secret on
        # real parts).  PDH_CERT_EXPORT hands out an *unsigned* CEK certificate made on
        # the spot (see pdh_cert_export); the ASK-signed one is AMD's, served by its Key
        # Distribution Service by chip id -- here SIMULATED_KDS, signed with RSA-PSS by
        # the simulator's stand-in for AMD (ark_cert, ask_cert: AMD's CA format, amd_ca.py).
        from .amd_ca import simulated_amd_roots

        self.ark_cert, self.ask_cert, ask_key = simulated_amd_roots()
        self._cek_key = generate_key()
        self._kds_cek = SevCertificate.for_key(
            self._cek_key, CertUsage.CEK, CertAlgo.ECDSA_SHA256, api_major=KDS_CEK_API[0],
            api_minor=KDS_CEK_API[1]).signed(ask_key, CertUsage.ASK, CertAlgo.RSA_SHA256)
        SIMULATED_KDS.publish(self)
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
                        f"platform is {self.state.name}, {command} needs {names}",
                        "platform-state")

    def _guest(self, command: str, handle: int, check: str = "handle") -> _Guest:
        """handle_is_valid: a handle in range whose context is not free."""
        guest = self._guests.get(handle)
        if guest is None:
            raise _fail(command, SevStatus.INVALID_GUEST, f"no guest with handle {handle}",
                        check)
        return guest

    @staticmethod
    def _require_state(command: str, guest: _Guest, *allowed: GuestState) -> None:
        if guest.state not in allowed:
            names = "/".join(s.name for s in allowed)
            raise _fail(command, SevStatus.INVALID_GUEST_STATE,
                        f"guest {guest.handle} is {guest.state.name}, {command} needs {names}",
                        "guest-state")

    @staticmethod
    def _require_active(command: str, guest: _Guest) -> None:
        """guest_is_inactive: neither active nor pending activation."""
        if not guest.asid:
            raise _fail(command, SevStatus.INACTIVE,
                        f"guest {guest.handle} has no ASID; ACTIVATE it first", "inactive")

    @staticmethod
    def _writable(command: str, buf) -> memoryview:
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError(f"{command}: pass a writable buffer (the firmware writes in place)")
        return view

    @staticmethod
    def _check_address(command: str, *addresses: int) -> None:
        for gpa in addresses:
            if gpa % 16:
                raise _fail(command, SevStatus.INVALID_ADDRESS,
                            f"address 0x{gpa:x} is not 16-byte aligned", "address")

    @staticmethod
    def _check_length(command: str, length: int) -> None:
        if length % 16 or not length:
            raise _fail(command, SevStatus.INVALID_LEN,
                        f"length {length} is not a non-zero multiple of 16", "length")

    def _asid_in_use(self, asid: int) -> bool:
        """The ASID's guest has run (state RUNNING while bound): 'in use', not 'allocated'."""
        owner = self._asid_owner.get(asid)
        return owner is not None and self._guests[owner].state == GuestState.RUNNING

    @staticmethod
    def _validate_cert(cmd: str, cert: SevCertificate, signer: SevCertificate,
                       usage: CertUsage, what: str) -> None:
        """sev_cert_validate: the signature slots, then the body's usage.

        A half-empty slot is BAD_SIGNATURE; no slot of the signer's usage and
        algorithm INVALID_CERTIFICATE; a matching slot that does not verify
        BAD_SIGNATURE; a certificate of the wrong usage INVALID_CERTIFICATE.
        """
        slots = [sig for sig in cert.sigs
                 if (sig.usage, sig.algo) != (CertUsage.INVALID, CertAlgo.INVALID)]
        if any(sig.usage == CertUsage.INVALID or sig.algo == CertAlgo.INVALID for sig in slots):
            raise _fail(cmd, SevStatus.BAD_SIGNATURE, f"{what.upper()} certificate has a "
                        "malformed signature slot", f"{what}-signature")
        if not any((sig.usage, sig.algo) == (signer.usage, signer.algo) for sig in slots):
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE, f"{what.upper()} certificate "
                        f"carries no signature by the {_usage_text(signer.usage)} key",
                        f"{what}-unsigned")
        if not cert.is_signed_by(signer):
            raise _fail(cmd, SevStatus.BAD_SIGNATURE, f"{what.upper()} signature does not "
                        "verify", f"{what}-signature")
        if cert.usage != usage:
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE, f"expected a {usage.name} "
                        f"certificate, got {_usage_text(cert.usage)}", f"{what}-usage")

    # -- platform commands ----------------------------------------------------
    def init(self, flags: int | None = None) -> None:
        """INIT (0x001): UNINIT -> INIT; every ASID starts dirty.

        ``flags`` is the command buffer's config word; ``None`` is what the
        kernel passes (CONFIG_ES when the chip has SEV-ES).  Any flag bit this
        firmware does not know is INVALID_CONFIG (on a chip without SEV-ES the
        ES bit is such a bit).
        """
        self._require_platform("INIT", PlatformState.UNINIT)
        if flags is None:
            flags = SEV_INIT_FLAGS_ES if self.es_capable else 0
        known = SEV_INIT_FLAGS_ES if self.es_capable else 0
        if flags & ~known:
            raise _fail("INIT", SevStatus.INVALID_CONFIG,
                        f"INIT flags 0x{flags:x} set bits outside 0x{known:x}", "flags")
        self.state = PlatformState.INIT
        self._config_es = bool(flags & SEV_INIT_FLAGS_ES)
        self._asid_dirty = set(range(1, self.asids.num_asids + 1))
        self._wbinvd_done = False

    def ensure_init(self) -> None:
        """The kernel's sev_platform_init: INIT unless initialized, then WBINVD + DF_FLUSH.

        (``__sev_platform_init_locked`` flushes right after INIT "to prepare
        for the first SEV guest launch": INIT leaves every ASID dirty.)
        """
        if self.state == PlatformState.UNINIT:
            self.init()
            self.kernel_flush()

    def wbinvd(self) -> None:
        """WBINVD on every core (x86, not a firmware command): sets the WBINVD-done flags."""
        self._wbinvd_done = True

    def kernel_flush(self) -> None:
        """What KVM's sev_flush_asids and the driver do: WBINVD on all CPUs, then DF_FLUSH."""
        self.wbinvd()
        self.df_flush()

    def shutdown(self) -> None:
        """SHUTDOWN (0x002): any state -> UNINIT; every guest context is lost.

        Bound ASIDs of guests that ran become dirty, the others clean
        (sev_plat.c ``sev_clear``).
        """
        for asid in list(self._asid_owner):
            if self._asid_in_use(asid):
                self._asid_dirty.add(asid)
        self._guests.clear()
        self._asid_owner.clear()
        self.state = PlatformState.UNINIT
        self._config_es = False

    def platform_status(self) -> PlatformStatus:
        """PLATFORM_STATUS (0x004): API version, state, owner/CONFIG_ES flags, guests.

        In UNINIT the owner flag, CONFIG_ES and the guest count read 0.
        """
        live = self.state != PlatformState.UNINIT
        flags = (SEV_STATUS_FLAGS_OWNER if self._owner_external and live else 0) | (
            SEV_STATUS_FLAGS_CONFIG_ES if self._config_es and live else 0)
        return PlatformStatus(self.api_major, self.api_minor, self.state, flags, self.build,
                              len(self._guests) if live else 0)

    def platform_reset(self) -> None:
        """PLATFORM_RESET (0x003, the kernel's FACTORY_RESET): UNINIT only; new identity."""
        self._require_platform("PLATFORM_RESET", PlatformState.UNINIT)
        self._self_own()

    def factory_reset(self) -> None:
        """/dev/sev SEV_FACTORY_RESET: the kernel's sev_ioctl_do_reset, then PLATFORM_RESET.

        A WORKING platform is refused with EBUSY before the firmware is called
        (guests would lose their keys); an INIT platform is shut down first.
        """
        if self.state == PlatformState.WORKING:
            raise _refuse("FACTORY_RESET", errno.EBUSY,
                          f"{len(self._guests)} SEV guest(s) are running; stop them first")
        if self.state == PlatformState.INIT:
            self.shutdown()
        self.platform_reset()

    def pek_gen(self, *, auto_init: bool = True) -> None:
        """PEK_GEN (0x005): new OCA (self-signed), PEK and PDH; the platform is self-owned.

        INIT only: WORKING gives INVALID_PLATFORM_STATE.  INITs on first use
        as the kernel does (``auto_init=False``: the bare firmware command).
        """
        if auto_init:
            self.ensure_init()
        self._require_platform("PEK_GEN", PlatformState.INIT)
        self._self_own()

    def pek_csr(self, length: int = CERT_SIZE, *, auto_init: bool = True) -> bytes:
        """PEK_CSR (0x006): the PEK certificate, unsigned, for an owner's OCA to sign.

        INIT or WORKING; a buffer below one certificate is INVALID_LEN (the
        firmware writes the length it needs).  INITs on first use (``auto_init``).
        """
        if auto_init:
            self.ensure_init()
        self._require_platform("PEK_CSR", PlatformState.INIT, PlatformState.WORKING)
        if length < CERT_SIZE:
            raise _fail("PEK_CSR", SevStatus.INVALID_LEN,
                        f"buffer is {length} bytes, a certificate is {CERT_SIZE}", "length")
        return dataclasses.replace(self._pek, sigs=(EMPTY_SIGNATURE, EMPTY_SIGNATURE)).to_bytes()

    def pek_cert_import(self, pek_cert: bytes, oca_cert: bytes) -> None:
        """PEK_CERT_IMPORT (0x007): take ownership with an owner-signed PEK and its OCA.

        In AMD's order (sev_mcmd.c ``sev_mcmd_pek_cert_import``, sev_cert.c
        ``sev_cert_validate``): INIT only; an externally owned platform is
        ALREADY_OWNED (reset it with PEK_GEN or FACTORY_RESET); each
        certificate must be exactly one certificate long (INVALID_LEN); the OCA
        must be self-signed and the PEK signed by that OCA -- no signature slot
        of the signer's usage and algorithm is INVALID_CERTIFICATE, a slot that
        does not verify (or a half-empty slot) BAD_SIGNATURE; the PEK body must
        be the platform's own PEK body (INVALID_CERTIFICATE; use PEK_CSR).  The
        firmware adds its CEK signature.  INITs on first use (the kernel).
        """
        cmd = "PEK_CERT_IMPORT"
        self.ensure_init()
        self._require_platform(cmd, PlatformState.INIT)
        if self._owner_external:
            raise _fail(cmd, SevStatus.ALREADY_OWNED, "platform already has an external owner",
                        "owned")
        if len(pek_cert) != CERT_SIZE or len(oca_cert) != CERT_SIZE:
            raise _fail(cmd, SevStatus.INVALID_LEN, f"certificates are {len(pek_cert)} and "
                        f"{len(oca_cert)} bytes, want {CERT_SIZE} each", "length")
        try:
            pek = SevCertificate.from_bytes(pek_cert)
            oca = SevCertificate.from_bytes(oca_cert)
        except CertificateError as exc:
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE, str(exc), "format") from None
        self._validate_cert(cmd, oca, oca, CertUsage.OCA, "oca")
        self._validate_cert(cmd, pek, oca, CertUsage.PEK, "pek")
        if pek.body() != self._pek.body():
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE,
                        "PEK certificate body is not this platform's PEK (use PEK_CSR)",
                        "pek-body")
        self._oca = oca
        self._oca_key = None  # the owner keeps it
        oca_sig = next(s for s in pek.sigs if s.usage == CertUsage.OCA and not s.empty)
        self._pek = dataclasses.replace(pek, sigs=(oca_sig, EMPTY_SIGNATURE)).signed(
            self._cek_key, CertUsage.CEK)
        self._owner_external = True
        self._new_pdh()

    def pdh_gen(self, *, auto_init: bool = True) -> None:
        """PDH_GEN (0x009): new PDH key signed by the PEK (INIT or WORKING).

        INITs on first use (``auto_init``, the kernel).
        """
        if auto_init:
            self.ensure_init()
        self._require_platform("PDH_GEN", PlatformState.INIT, PlatformState.WORKING)
        self._new_pdh()

    def pdh_cert_export(self, pdh_len: int = CERT_SIZE, certs_len: int = 3 * CERT_SIZE, *,
                        auto_init: bool = True) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT (0x008): (PDH certificate, cert chain PEK||OCA||CEK).

        INIT or WORKING; buffers below one certificate / three certificates
        are INVALID_LEN (the firmware writes back the lengths it needs).
        INITs on first use (``auto_init``, the kernel).

        The chain's CEK is the one AMD's firmware exports: sev_mcmd.c
        ``pdh_cert_chain_init`` makes "a dummy CEK certificate without a signature"
        (``sev_cert_create(&cek_cert, &cek_pubkey, NULL)``): sev_cert.c ``sev_cert_init``
        zeroes it, sets version 1 and the firmware's own API version, and leaves both
        signature slots empty (usage INVALID 0x1000, algo INVALID 0); then the CEK's
        public key.  The ASK-signed CEK comes from AMD's KDS by chip id
        (:meth:`kds_cek`; https://kdsintf.amd.com/cek/id/<GET_ID hex>, as sevctl and
        virtee/sev fetch it).
        """
        if auto_init:
            self.ensure_init()
        self._require_platform("PDH_CERT_EXPORT", PlatformState.INIT, PlatformState.WORKING)
        if pdh_len < CERT_SIZE or certs_len < 3 * CERT_SIZE:
            raise _fail("PDH_CERT_EXPORT", SevStatus.INVALID_LEN,
                        f"buffers are {pdh_len} and {certs_len} bytes, want {CERT_SIZE} and "
                        f"{3 * CERT_SIZE}", "length")
        cek = self._new_cert(self._cek_key, CertUsage.CEK, CertAlgo.ECDSA_SHA256)  # unsigned
        return self._pdh.to_bytes(), PlatformCertChain(self._pek, self._oca, cek).to_bytes()

    def kds_cek(self) -> bytes:
        """This chip's ASK-signed CEK as AMD's KDS serves it (``SIMULATED_KDS.cek(chip_id)``)."""
        return SIMULATED_KDS.cek(self.chip_id)

    def get_id(self, length: int = 64) -> bytes:
        """GET_ID (0x00C, /dev/sev SEV_GET_ID2): the 64-byte chip id (any platform state).

        A buffer below 64 bytes is INVALID_LEN (the length query).
        """
        if length < len(self.chip_id):
            raise _fail("GET_ID", SevStatus.INVALID_LEN,
                        f"buffer is {length} bytes, the ID is {len(self.chip_id)}", "length")
        return self.chip_id

    def df_flush(self) -> None:
        """DF_FLUSH (0x00A): dirty ASIDs become clean; any platform state.

        Needs a WBINVD on every core since the last INIT or the last
        DEACTIVATE of a guest that ran (:meth:`wbinvd`): WBINVD_REQUIRED
        otherwise (sev_mcmd.c ``mcmd_df_flush_common``).
        """
        if not self._wbinvd_done:
            raise _fail("DF_FLUSH", SevStatus.WBINVD_REQUIRED,
                        "a core has not run WBINVD since its cache last held guest data",
                        "wbinvd")
        self._asid_dirty.clear()

    # -- guest lifecycle ------------------------------------------------------
    def launch_start(self, policy: GuestPolicy | int, dh_cert: bytes | None = None,
                     session: bytes | None = None, handle: int = 0) -> int:
        """LAUNCH_START (0x030): create a guest context; return its handle.

        With ``dh_cert`` (the owner's GODH certificate) the firmware takes
        ``session`` (the 128-byte blob), derives KEK/KIK by ECDH with its PDH
        key, checks the wrap MAC and unwraps the owner's TEK/TIK, then checks
        the policy: its MAC (BAD_MEASUREMENT, also when the host altered the
        policy), the minimum API version and the reserved bits 15:6
        (POLICY_FAILURE).  Without a DH certificate (an unattested launch, as
        the KVM selftests do) the firmware picks TEK/TIK itself, ignores any
        session and checks nothing of the policy (sev_mcmd.c
        ``sev_mcmd_launch_start``, sev_guest.c ``sev_guest_verify_policy``).
        ``handle`` != 0 asks to share that guest's memory key: an unknown
        handle is INVALID_GUEST, a different policy or a NOKS one
        POLICY_FAILURE.  A full context table is RESOURCE_LIMIT; an ES policy
        on a platform initialized without SEV-ES is UNSUPPORTED.
        """
        cmd = "LAUNCH_START"
        self._require_platform(cmd, PlatformState.INIT, PlatformState.WORKING)
        policy = policy if isinstance(policy, GuestPolicy) else GuestPolicy(int(policy))
        if dh_cert is None:
            tek, tik = os.urandom(16), os.urandom(16)
        else:
            tek, tik = self._unwrap_session(cmd, policy, dh_cert, session)
            if not policy.api_satisfied_by(self.api_major, self.api_minor):
                raise _fail(cmd, SevStatus.POLICY_FAILURE,
                            f"policy requires firmware API >= {policy.api_major}."
                            f"{policy.api_minor}, this firmware is {self.api_major}."
                            f"{self.api_minor}", "policy-api")
            if policy.reserved:
                raise _fail(cmd, SevStatus.POLICY_FAILURE,
                            f"policy 0x{policy.value:08x} sets reserved bits 15:6",
                            "policy-reserved")
        key = None
        if handle:
            other = self._guest(cmd, handle, "share-handle")
            if other.policy.value != policy.value or other.policy.noks:
                raise _fail(cmd, SevStatus.POLICY_FAILURE,
                            f"key sharing with guest {handle} refused: its policy is "
                            f"0x{other.policy.value:x} (must be equal, without NOKS), this one "
                            f"0x{policy.value:x}", "share-policy")
            key = other.key
        new = next((h for h in range(1, self.max_guests + 1) if h not in self._guests), None)
        if new is None:
            raise _fail(cmd, SevStatus.RESOURCE_LIMIT,
                        f"all {self.max_guests} guest contexts are in use", "guests")
        if policy.es and not self._config_es:
            raise _fail(cmd, SevStatus.UNSUPPORTED,
                        "policy requires SEV-ES but the platform was initialized without it",
                        "es-platform")
        self._guests[new] = _Guest(new, policy, key or GuestKey(), tek, tik)
        self.state = PlatformState.WORKING
        return new

    def _unwrap_session(self, cmd: str, policy: GuestPolicy, dh_cert: bytes,
                        session: bytes | None) -> tuple[bytes, bytes]:
        """sev_channel_open_server + the policy MAC of sev_guest_verify_policy."""
        if session is None or len(session) != SESSION_SIZE:
            got = "none" if session is None else f"{len(session)} bytes"
            raise _fail(cmd, SevStatus.INVALID_LEN, f"session blob is {got}, want {SESSION_SIZE}",
                        "session-length")
        if len(dh_cert) != CERT_SIZE:
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"DH certificate is {len(dh_cert)} bytes, want {CERT_SIZE}",
                        "dh-cert-length")
        try:
            godh = SevCertificate.from_bytes(dh_cert)
            godh.expect_usage(CertUsage.PDH)
            if godh.algo != CertAlgo.ECDH_SHA256:  # sev_cert_sanity_check: exactly this one
                raise CertificateError(f"DH certificate algorithm 0x{godh.algo:x} is not "
                                       "ECDH-SHA256")
            peer = godh.public_key()
            if not isinstance(peer.curve, ec.SECP384R1):
                raise CertificateError("DH certificate key is not P-384")
        except CertificateError as exc:
            raise _fail(cmd, SevStatus.INVALID_CERTIFICATE, str(exc), "dh-cert") from None
        blob = SessionBlob.from_bytes(session)
        kek, kik = session_keys(ecdh_shared_secret(self._pdh_key, peer), blob.nonce)
        if not blob.wrap_mac_ok(kik):
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT,
                        "session wrap MAC does not verify: the blob was made for another "
                        "PDH key (PDH_GEN or PEK_GEN since?) or was altered", "wrap-mac")
        tek, tik = blob.unwrap(kek)
        if not blob.policy_mac_ok(tik, policy.value):
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT,
                        f"policy MAC does not verify for policy 0x{policy.value:08x}: the "
                        "owner signed a different policy", "policy-mac")
        return tek, tik

    def activate(self, handle: int, asid: int) -> None:
        """ACTIVATE (0x021): bind the guest's key to ``asid``.

        In AMD's order (sev_mcmd.c ``sev_mcmd_activate``,
        ``mcmd_activate_common``, ``activate_common``; sev_guest.c
        ``sev_guest_activate``; sev_es.c ``sev_es_validate_asid``): WORKING
        only; an unknown handle is INVALID_GUEST; ASID 0 or above CPUID ECX
        INVALID_ASID; an ASID bound to any guest ASID_OWNED; a guest already
        active (or pending activation) ACTIVE; a dirty ASID DFFLUSH_REQUIRED;
        an ASID of the wrong kind (an ES guest needs one below CPUID EDX, a
        plain SEV guest one at or above it) INVALID_ASID.  An ASID whose last
        guest never ran is clean again and may be activated at once.
        """
        cmd = "ACTIVATE"
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        if not 1 <= asid <= self.asids.num_asids:
            raise _fail(cmd, SevStatus.INVALID_ASID,
                        f"ASID {asid} outside 1..{self.asids.num_asids}", "asid-range")
        owner = self._asid_owner.get(asid)
        if owner is not None:
            raise _fail(cmd, SevStatus.ASID_OWNED, f"ASID {asid} belongs to guest {owner}",
                        "asid-owned")
        if guest.asid:
            raise _fail(cmd, SevStatus.ACTIVE, f"guest {handle} is already active on ASID "
                        f"{guest.asid}", "guest-active")
        if asid in self._asid_dirty:
            raise _fail(cmd, SevStatus.DFFLUSH_REQUIRED,
                        f"ASID {asid} may hold another guest's data; WBINVD and DF_FLUSH first",
                        "asid-dirty")
        kinds = self.asids.range_for(guest.policy.es)
        if asid not in kinds:
            kind = "SEV-ES" if guest.policy.es else "SEV"
            raise _fail(cmd, SevStatus.INVALID_ASID,
                        f"ASID {asid} is not a {kind} ASID ({kinds.start}..{kinds.stop - 1})",
                        "asid-kind")
        guest.asid = asid
        self._asid_owner[asid] = handle

    def deactivate(self, handle: int) -> None:
        """DEACTIVATE (0x022): unbind the guest's ASID.

        WORKING only; INVALID_GUEST; INACTIVE if the guest has no ASID
        (sev_mcmd.c ``sev_mcmd_deactivate``).  If the guest ran on the ASID it
        is left dirty (WBINVD and DF_FLUSH before reuse); if it never ran, clean.
        """
        cmd = "DEACTIVATE"
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        self._require_active(cmd, guest)
        if self._asid_in_use(guest.asid):
            self._asid_dirty.add(guest.asid)
            self._wbinvd_done = False  # sev_guest_deactivate: clear_wbinvd_done
        del self._asid_owner[guest.asid]
        guest.asid = 0

    def decommission(self, handle: int) -> None:
        """DECOMMISSION (0x020): delete the guest context.

        WORKING only; INVALID_GUEST; ACTIVE while the guest holds an ASID
        (sev_mcmd.c ``sev_mcmd_decommission``, ``mcmd_decommission_common``).
        The platform drops back to INIT when its last guest goes.
        """
        cmd = "DECOMMISSION"
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        if guest.asid:
            raise _fail(cmd, SevStatus.ACTIVE,
                        f"guest {handle} is active on ASID {guest.asid}; DEACTIVATE first",
                        "guest-active")
        del self._guests[handle]
        if not self._guests:
            self.state = PlatformState.INIT

    def guest_status(self, handle: int) -> GuestStatus:
        """GUEST_STATUS (0x023): policy, ASID (0 if inactive) and state.

        INIT or WORKING; an unknown handle is not an error: SUCCESS with state
        INVALID (0) and policy/ASID 0 (sev_mcmd.c ``sev_mcmd_guest_status``).
        """
        self._require_platform("GUEST_STATUS", PlatformState.INIT, PlatformState.WORKING)
        guest = self._guests.get(handle)
        if guest is None:
            return GuestStatus(handle, 0, 0, GuestState.INVALID)
        return GuestStatus(handle, guest.policy.value, guest.asid, guest.state)

    def guest_key(self, handle: int) -> GuestKey:
        """The guest's memory key, for the simulated memory controller (not a command)."""
        return self._guest("GUEST_KEY", handle).key

    # -- launch ---------------------------------------------------------------
    def _launch_update(self, cmd: str, handle: int, gpa: int, view: memoryview,
                       vmsa: bool) -> _Guest:
        """launch_update_common (sev_mcmd.c): the checks both LAUNCH_UPDATE_* share."""
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LUPDATE)
        if vmsa and not guest.policy.es:
            raise _fail(cmd, SevStatus.UNSUPPORTED, f"guest {handle}'s policy has no ES",
                        "es-guest")
        self._require_active(cmd, guest)
        self._check_address(cmd, gpa)
        self._check_length(cmd, len(view))
        return guest

    def launch_update_data(self, handle: int, gpa: int, buf) -> None:
        """LAUNCH_UPDATE_DATA (0x031): measure ``buf`` and encrypt it in place.

        ``buf`` is a writable view of the plaintext that lives at physical
        address ``gpa`` (the tweak).  The plaintext extends the launch
        digest, then is replaced by its ciphertext under the guest's key.
        WORKING; a known handle; LUPDATE; an active guest; address 16-byte
        aligned (INVALID_ADDRESS); length a non-zero multiple of 16
        (INVALID_LEN).
        """
        cmd = "LAUNCH_UPDATE_DATA"
        view = self._writable(cmd, buf)
        guest = self._launch_update(cmd, handle, gpa, view, vmsa=False)
        guest.digest.update_data(view)
        guest.key.encrypt_into(gpa, view)

    def launch_update_vmsa(self, handle: int, gpa: int, page) -> None:
        """LAUNCH_UPDATE_VMSA (0x032): measure and encrypt one vCPU's 4 KiB VMSA page.

        The length is checked first (anything but 4096 is INVALID_LEN), then
        LAUNCH_UPDATE_DATA's checks, with a guest whose policy lacks ES
        UNSUPPORTED after the state check (KVM refuses non-ES VMs with ENOTTY
        before the firmware).  Call it after the data updates, vCPU 0 first,
        as KVM does.
        """
        cmd = "LAUNCH_UPDATE_VMSA"
        view = self._writable(cmd, page)
        if len(view) != VMSA_PAGE_SIZE:
            raise _fail(cmd, SevStatus.INVALID_LEN, f"a VMSA is {VMSA_PAGE_SIZE} bytes, "
                        f"got {len(view)}", "vmsa-length")
        guest = self._launch_update(cmd, handle, gpa, view, vmsa=True)
        guest.digest.update_vmsa(view)
        guest.key.encrypt_into(gpa, view)

    def launch_measure(self, handle: int, length: int = MEASUREMENT_LEN) -> LaunchMeasurement:
        """LAUNCH_MEASURE (0x033): the 48-byte measurement; LUPDATE -> LSECRET.

        WORKING; a known handle; LUPDATE; ``length`` is the caller's buffer
        size: below 48 the firmware answers INVALID_LEN (that is how KVM's
        length query works).  The guest need not be active.
        """
        cmd = "LAUNCH_MEASURE"
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LUPDATE)
        if length < MEASUREMENT_LEN:
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"buffer is {length} bytes, the measurement needs {MEASUREMENT_LEN}",
                        "length")
        mnonce = os.urandom(16)
        measure = compute_measure(guest.tik, api_major=self.api_major, api_minor=self.api_minor,
                                  build=self.build, policy=guest.policy.value,
                                  digest=guest.digest.digest(), mnonce=mnonce)
        guest.measurement = LaunchMeasurement(measure, mnonce)
        guest.state = GuestState.LSECRET
        return guest.measurement

    def launch_secret(self, handle: int, header: bytes, trans: bytes, gpa: int, target) -> None:
        """LAUNCH_UPDATE_SECRET (0x034, KVM_SEV_LAUNCH_SECRET): inject an owner secret.

        In AMD's order (sev_mcmd.c ``sev_mcmd_launch_secret``): WORKING; a
        known handle; ``gpa`` 16-byte aligned (INVALID_ADDRESS); a 52-byte
        header and a guest area (``target``) of a non-zero multiple of 16 up to
        the firmware's 20 KiB scratch buffer, as long as ``trans``
        (INVALID_LEN); LSECRET; an active guest; the packet MAC with the TIK
        over flags, IV, lengths, ciphertext and this guest's MEASURE
        (BAD_MEASUREMENT); a compressed packet is UNSUPPORTED.  Then ``trans``
        is decrypted with the TEK and written, encrypted with the guest's key
        for ``gpa``, into the writable view ``target``.
        """
        cmd = "LAUNCH_SECRET"
        view = self._writable(cmd, target)
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        self._check_address(cmd, gpa)
        n = len(view)
        if (len(header) != SECRET_HEADER_SIZE or not n or n % 16 or n > SCRATCH_BUF_LEN
                or n != len(trans)):
            raise _fail(cmd, SevStatus.INVALID_LEN,
                        f"header {len(header)} bytes (want {SECRET_HEADER_SIZE}), guest area "
                        f"{n} and transport data {len(trans)} bytes (equal, a non-zero multiple "
                        f"of 16, at most {SCRATCH_BUF_LEN})", "length")
        self._require_state(cmd, guest, GuestState.LSECRET)
        self._require_active(cmd, guest)
        hdr = SecretHeader.from_bytes(header)
        mac = secret_mac(guest.tik, hdr.flags, hdr.iv, n, bytes(trans),
                         guest.measurement.measure)
        if not hmac.compare_digest(mac, hdr.mac):
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT,
                        "secret packet MAC does not verify (wrong TIK, altered packet, or "
                        "built for another measurement)", "mac")
        if hdr.flags & SECRET_FLAG_COMPRESSED:
            raise _fail(cmd, SevStatus.UNSUPPORTED, "compressed secrets are not supported",
                        "compressed")
        view[:] = guest.key.encrypt(gpa, aes128_ctr(guest.tek, hdr.iv, bytes(trans)))

    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH (0x035): LSECRET -> RUNNING.

        WORKING; a known handle; LSECRET (measure first, else
        INVALID_GUEST_STATE).  A bound ASID goes from allocated to in use.
        """
        cmd = "LAUNCH_FINISH"
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LSECRET)
        guest.state = GuestState.RUNNING
        # The transport keys are not needed once the launch is over.
        guest.tek = guest.tik = b""

    def attestation_report(self, handle: int, mnonce: bytes,
                           length: int = ATTESTATION_REPORT_LEN) -> bytes:
        """ATTESTATION_REPORT (0x036): the 208-byte launch report, signed with the PEK.

        WORKING; a known handle; measured (LSECRET or RUNNING); a buffer below
        208 bytes is INVALID_LEN (sev_mcmd.c ``sev_mcmd_attestation``).
        ``mnonce`` (16 bytes) is the caller's freshness nonce.
        """
        cmd = "ATTESTATION_REPORT"
        self._require_platform(cmd, PlatformState.WORKING)
        guest = self._guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LSECRET, GuestState.RUNNING)
        if length < ATTESTATION_REPORT_LEN:
            raise _fail(cmd, SevStatus.INVALID_LEN, f"buffer is {length} bytes, the report "
                        f"is {ATTESTATION_REPORT_LEN}", "length")
        if len(mnonce) != 16:
            raise _refuse(cmd, errno.EINVAL, f"mnonce is 16 bytes, got {len(mnonce)}")
        unsigned = AttestationReport(bytes(mnonce), guest.digest.digest(), guest.policy.value,
                                     CertUsage.PEK, CertAlgo.ECDSA_SHA256, 0, 0)
        der = self._pek_key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return dataclasses.replace(unsigned, r=r, s=s).to_bytes()

    # -- debug ----------------------------------------------------------------
    def _dbg(self, cmd: str, handle: int, gpa: int, data) -> _Guest:
        """sev_mcmd_dbg_decrypt/encrypt + debug_crypt_common, in AMD's order."""
        self._require_platform(cmd, PlatformState.WORKING)
        self._check_address(cmd, gpa)
        if len(data) % 16:
            raise _fail(cmd, SevStatus.INVALID_LEN, f"length {len(data)} is not a multiple "
                        "of 16", "length")
        guest = self._guest(cmd, handle)
        if guest.policy.nodbg:
            raise _fail(cmd, SevStatus.POLICY_FAILURE,
                        f"guest {handle}'s policy has NODBG; debugging is refused", "nodbg")
        self._require_active(cmd, guest)
        return guest

    def dbg_decrypt(self, handle: int, gpa: int, ciphertext) -> bytes:
        """DBG_DECRYPT (0x060): plaintext of guest memory at ``gpa``.

        WORKING; address and length in 16-byte granules (KVM widens unaligned
        requests itself, using bounce buffers); a known handle; no NODBG
        (POLICY_FAILURE); an active guest.
        """
        guest = self._dbg("DBG_DECRYPT", handle, gpa, ciphertext)
        return guest.key.decrypt(gpa, ciphertext)

    def dbg_encrypt(self, handle: int, gpa: int, plaintext) -> bytes:
        """DBG_ENCRYPT (0x061): ciphertext to store at ``gpa`` (DBG_DECRYPT's checks)."""
        guest = self._dbg("DBG_ENCRYPT", handle, gpa, plaintext)
        return guest.key.encrypt(gpa, plaintext)


# -- what AMD's firmware checks, in its order ---------------------------------------------

AMD_FIRMWARE_SOURCE = ("github.com/amd/AMD-ASPFW, commit 3ca6650dd35d878b3fcbe5c7f58b145eed042bbf, "
                       "fw/psp_bl_uapps/sev_uapp/src/")


@dataclasses.dataclass(frozen=True)
class FirmwareCheck:
    """One check a firmware command makes, as AMD's SEV firmware source makes it.

    ``check`` is the key the model puts on the error (``SevError.fw_check``);
    ``source`` is the file and function in :data:`AMD_FIRMWARE_SOURCE`.  A
    ``SUCCESS`` row records where AMD's firmware accepts what a naive model
    would refuse.  Rows of one command are in the order the firmware checks.
    """

    command: str
    check: str
    condition: str
    status: SevStatus
    source: str


def _rows(command: str, source: str, *rows: tuple) -> list[FirmwareCheck]:
    return [FirmwareCheck(command, check, condition, status, src or source)
            for check, condition, status, src in rows]


_S = SevStatus
_PS = ("platform-state", "platform not WORKING", _S.INVALID_PLATFORM_STATE, None)
_PS_IW = ("platform-state", "platform UNINIT (INIT or WORKING needed)",
          _S.INVALID_PLATFORM_STATE, None)
_HANDLE = ("handle", "handle of no guest context (handle_is_valid)", _S.INVALID_GUEST, None)
_INACTIVE = ("inactive", "guest neither active nor pending activation (guest_is_inactive)",
             _S.INACTIVE, None)

#: Every check the model makes, with the status and where AMD's source makes it.
AMD_FIRMWARE_CHECKS: tuple[FirmwareCheck, ...] = tuple(
    _rows("INIT", "sev_mcmd.c sev_mcmd_init_common",
          ("platform-state", "platform not UNINIT", _S.INVALID_PLATFORM_STATE, None),
          ("flags", "a flag bit other than CONFIG_ES (the ES bit on a chip without SEV-ES)",
           _S.INVALID_CONFIG, "sev_mcmd.c init_cmd_buf_valid"))
    + _rows("SHUTDOWN", "sev_mcmd.c sev_mcmd_shutdown",
            ("any-state", "any platform state; UNINIT stays UNINIT", _S.SUCCESS,
             "sev_plat.c state_tbl_sev"))
    + _rows("PLATFORM_RESET", "sev_mcmd.c sev_mcmd_platform_reset",
            ("platform-state", "platform not UNINIT", _S.INVALID_PLATFORM_STATE, None))
    + _rows("PLATFORM_STATUS", "sev_mcmd.c sev_mcmd_platform_status",
            ("uninit-fields", "in UNINIT the owner flag, CONFIG_ES and guest count read 0",
             _S.SUCCESS, None))
    + _rows("PEK_GEN", "sev_mcmd.c sev_mcmd_pek_gen",
            ("platform-state", "platform not INIT", _S.INVALID_PLATFORM_STATE, None))
    + _rows("PEK_CSR", "sev_mcmd.c sev_mcmd_pek_csr",
            _PS_IW,
            ("length", "buffer shorter than one certificate", _S.INVALID_LEN, None))
    + _rows("PEK_CERT_IMPORT", "sev_mcmd.c sev_mcmd_pek_cert_import",
            ("platform-state", "platform not INIT", _S.INVALID_PLATFORM_STATE, None),
            ("owned", "platform already externally owned", _S.ALREADY_OWNED, None),
            ("length", "PEK or OCA length not one certificate", _S.INVALID_LEN, None),
            ("format", "a certificate the model cannot read (version, curve, algorithm); AMD "
             "checks the body after the signature, the model cannot (same status)",
             _S.INVALID_CERTIFICATE, "sev_cert.c sev_cert_validate_body"),
            ("oca-signature", "OCA has a half-empty signature slot, or its OCA signature "
             "does not verify", _S.BAD_SIGNATURE, "sev_cert.c sev_cert_validate_sig"),
            ("oca-unsigned", "OCA has no signature slot of the OCA key's usage and algorithm",
             _S.INVALID_CERTIFICATE, "sev_cert.c sev_cert_validate_sig"),
            ("oca-usage", "the OCA certificate's usage is not OCA",
             _S.INVALID_CERTIFICATE, "sev_cert.c sev_cert_validate"),
            ("pek-signature", "PEK has a half-empty signature slot, or its OCA signature "
             "does not verify", _S.BAD_SIGNATURE, "sev_cert.c sev_cert_validate_sig"),
            ("pek-unsigned", "PEK has no signature slot of the OCA key's usage and algorithm",
             _S.INVALID_CERTIFICATE, "sev_cert.c sev_cert_validate_sig"),
            ("pek-usage", "the PEK certificate's usage is not PEK",
             _S.INVALID_CERTIFICATE, "sev_cert.c sev_cert_validate"),
            ("pek-body", "PEK body differs from the platform's PEK", _S.INVALID_CERTIFICATE,
             None))
    + _rows("PDH_GEN", "sev_mcmd.c sev_mcmd_pdh_gen", _PS_IW)
    + _rows("PDH_CERT_EXPORT", "sev_mcmd.c sev_mcmd_pdh_cert_export",
            _PS_IW,
            ("length", "PDH buffer below one certificate or chain buffer below three",
             _S.INVALID_LEN, None))
    + _rows("GET_ID", "sev_mcmd.c sev_mcmd_get_id",
            ("length", "buffer below 64 bytes (any platform state)", _S.INVALID_LEN, None))
    + _rows("DF_FLUSH", "sev_mcmd.c mcmd_df_flush_common",
            ("wbinvd", "a core has not run WBINVD since INIT or since a guest that ran was "
             "deactivated", _S.WBINVD_REQUIRED, None),
            ("any-state", "no platform state check: UNINIT works too", _S.SUCCESS, None))
    + _rows("DECOMMISSION", "sev_mcmd.c sev_mcmd_decommission",
            _PS, _HANDLE,
            ("guest-active", "guest still holds an ASID", _S.ACTIVE,
             "sev_mcmd.c mcmd_decommission_common"))
    + _rows("ACTIVATE", "sev_mcmd.c sev_mcmd_activate",
            _PS, _HANDLE,
            ("asid-range", "ASID 0 or above CPUID 0x8000001F ECX", _S.INVALID_ASID,
             "sev_mcmd.c mcmd_activate_common"),
            ("asid-owned", "ASID bound to a guest (allocated or in use)", _S.ASID_OWNED,
             "sev_mcmd.c mcmd_activate_common"),
            ("guest-active", "guest already active or pending activation", _S.ACTIVE,
             "sev_mcmd.c mcmd_activate_common"),
            ("asid-dirty", "ASID dirty: INIT, or its last guest ran and no WBINVD + DF_FLUSH "
             "since", _S.DFFLUSH_REQUIRED, "sev_mcmd.c activate_common"),
            ("asid-kind", "ES guest on an ASID >= CPUID EDX, or SEV guest below it",
             _S.INVALID_ASID, "sev_es.c sev_es_validate_asid"),
            ("asid-clean", "ASID whose last guest never ran: clean, activates at once",
             _S.SUCCESS, "sev_mcmd.c sev_mcmd_deactivate"))
    + _rows("DEACTIVATE", "sev_mcmd.c sev_mcmd_deactivate", _PS, _HANDLE, _INACTIVE)
    + _rows("GUEST_STATUS", "sev_mcmd.c sev_mcmd_guest_status",
            _PS_IW,
            ("unknown-handle", "handle of no guest: state INVALID (0), not an error",
             _S.SUCCESS, None))
    + _rows("LAUNCH_START", "sev_mcmd.c sev_mcmd_launch_start",
            _PS_IW,
            ("session-length", "with a DH certificate: session blob not 128 bytes",
             _S.INVALID_LEN, None),
            ("dh-cert-length", "DH certificate not one certificate long", _S.INVALID_LEN, None),
            ("dh-cert", "DH certificate not PDH usage with an ECDH-SHA256 P-384 key",
             _S.INVALID_CERTIFICATE, "sev_channel.c sev_channel_open_server"),
            ("wrap-mac", "session wrap MAC does not verify with the KIK", _S.BAD_MEASUREMENT,
             "sev_channel.c establish_channel"),
            ("policy-mac", "policy MAC does not verify with the TIK", _S.BAD_MEASUREMENT,
             "sev_guest.c sev_guest_verify_policy"),
            ("policy-api", "policy's minimum API above the firmware's", _S.POLICY_FAILURE,
             "sev_guest.c sev_guest_verify_policy"),
            ("policy-reserved", "policy sets reserved bits 15:6", _S.POLICY_FAILURE,
             "sev_guest.c sev_guest_verify_policy"),
            ("unattested-policy", "without a DH certificate nothing of the policy is checked",
             _S.SUCCESS, None),
            ("share-handle", "key-sharing handle of no guest", _S.INVALID_GUEST, None),
            ("share-policy", "key-sharing guest's policy differs or has NOKS",
             _S.POLICY_FAILURE, None),
            ("guests", "no free guest context (SEV_GUEST_COUNT_MAX)", _S.RESOURCE_LIMIT,
             "sev_guest.c find_free_guest_handle"),
            ("es-platform", "ES policy on a platform INITed without CONFIG_ES",
             _S.UNSUPPORTED, None))
    + _rows("LAUNCH_UPDATE_DATA", "sev_mcmd.c launch_update_common",
            _PS, _HANDLE,
            ("guest-state", "guest not LUPDATE", _S.INVALID_GUEST_STATE, None),
            _INACTIVE,
            ("address", "address not 16-byte aligned", _S.INVALID_ADDRESS, None),
            ("length", "length 0 or not a multiple of 16", _S.INVALID_LEN, None))
    + _rows("LAUNCH_UPDATE_VMSA", "sev_mcmd.c launch_update_common",
            ("vmsa-length", "length not 4096 (before anything else)", _S.INVALID_LEN,
             "sev_mcmd.c sev_mcmd_launch_update_vmsa"),
            _PS, _HANDLE,
            ("guest-state", "guest not LUPDATE", _S.INVALID_GUEST_STATE, None),
            ("es-guest", "guest's policy has no ES", _S.UNSUPPORTED, None),
            _INACTIVE,
            ("address", "address not 16-byte aligned", _S.INVALID_ADDRESS, None))
    + _rows("LAUNCH_MEASURE", "sev_mcmd.c sev_mcmd_launch_measure",
            _PS, _HANDLE,
            ("guest-state", "guest not LUPDATE", _S.INVALID_GUEST_STATE, None),
            ("length", "buffer below 48 bytes (the length query)", _S.INVALID_LEN, None))
    + _rows("LAUNCH_SECRET", "sev_mcmd.c sev_mcmd_launch_secret",
            _PS, _HANDLE,
            ("address", "guest address not 16-byte aligned", _S.INVALID_ADDRESS, None),
            ("length", "header not 52 bytes, or guest length 0, not a multiple of 16, above "
             "the 20 KiB scratch buffer or unequal to the transport length", _S.INVALID_LEN,
             None),
            ("guest-state", "guest not LSECRET", _S.INVALID_GUEST_STATE, None),
            _INACTIVE,
            ("mac", "packet MAC does not verify (TIK, flags, IV, lengths, data, MEASURE)",
             _S.BAD_MEASUREMENT, "sev_channel.c sev_channel_verify_hmac"),
            ("compressed", "packet flags say compressed", _S.UNSUPPORTED, None))
    + _rows("LAUNCH_FINISH", "sev_mcmd.c sev_mcmd_launch_finish",
            _PS, _HANDLE,
            ("guest-state", "guest not LSECRET", _S.INVALID_GUEST_STATE, None))
    + _rows("ATTESTATION_REPORT", "sev_mcmd.c sev_mcmd_attestation",
            _PS, _HANDLE,
            ("guest-state", "guest not measured (LSECRET, RUNNING, SUPDATE, SENT)",
             _S.INVALID_GUEST_STATE, None),
            ("length", "buffer below the 208-byte report", _S.INVALID_LEN, None))
    + [row for cmd, fn in (("DBG_DECRYPT", "sev_mcmd_dbg_decrypt"),
                           ("DBG_ENCRYPT", "sev_mcmd_dbg_encrypt"))
       for row in _rows(cmd, f"sev_mcmd.c {fn}",
                        _PS,
                        ("address", "address not 16-byte aligned", _S.INVALID_ADDRESS, None),
                        ("length", "length not a multiple of 16", _S.INVALID_LEN, None),
                        _HANDLE,
                        ("nodbg", "guest's policy has NODBG", _S.POLICY_FAILURE, None),
                        ("inactive", "guest neither active nor pending activation",
                         _S.INACTIVE, "sev_mcmd.c debug_crypt_common"))]
)


def render_checks_markdown() -> str:
    """docs/sev-firmware-checks.md: :data:`AMD_FIRMWARE_CHECKS` as a table."""
    commands = list(dict.fromkeys(c.command for c in AMD_FIRMWARE_CHECKS))
    lines = [
        "# SEV firmware checks: the model against AMD's firmware source",
        "",
        "Generated from `kvmharness.sev.firmware.AMD_FIRMWARE_CHECKS` by",
        "`render_checks_markdown()`; `tests/test_sev_firmware_amd.py` fails when this",
        "file and the table differ, and drives every row against the model.",
        "",
        f"Source: {AMD_FIRMWARE_SOURCE} (files named per row).",
        f"{len(commands)} commands, {len(AMD_FIRMWARE_CHECKS)} checks; rows of a command are "
        "in the order the firmware makes them.",
        "",
        "| command | check | condition | status | source |",
        "|---|---|---|---|---|",
    ]
    for c in AMD_FIRMWARE_CHECKS:
        lines.append(f"| {c.command} | `{c.check}` | {c.condition} | {c.status.name} "
                     f"(0x{int(c.status):02x}) | `{c.source}` |")
    return "\n".join(lines) + "\n"
