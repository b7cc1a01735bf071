"""The SEV-SNP firmware (AMD-SP), simulated: platform and guest states, the launch commands.

Commands and buffers as the kernel issues them (``include/linux/psp-sev.h``:
``SEV_CMD_SNP_*``, ``struct sev_data_snp_launch_start/update/finish``, the
``SNP_PAGE_TYPE_*`` values), statuses from the SNP ABI (SEV_RET_*, docs/facts.md#facts-9f),
page states after APM vol. 2 §15.36.5 (Table 15-35) and the SNP ABI's "Page
States" chapter as KVM drives them (sev.c: ``snp_alloc_firmware_page`` makes a
page Firmware-owned, ``rmp_make_private(..., immutable=true)`` makes it
Pre-Guest before SNP_LAUNCH_UPDATE, ``snp_page_reclaim`` on failure).

The firmware here works on system-physical addresses in a sparse model of host
memory (:class:`HostMemory`) and on the :class:`~kvmharness.snp.rmp.Rmp`; each
refusal is a :class:`~kvmharness.errors.SevError` with errno EIO and the
firmware status, as ``/dev/sev`` reports it.

What the model does not do: encrypt pages (contents stay readable to the
model; the SEV model in ``kvmharness.sev`` has the XTS engine), 2 MiB
LAUNCH_UPDATE, migration agents, SNP_GUEST_REQUEST (the attestation side lives
in ``kvmharness.snp.attest``).  Choices our sources leave open are marked (model).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import secrets
import struct

from ..errors import SevError, SimulatorError
from ..sev.status import SevStatus
from .measure import LD_SIZE, LaunchDigest, PageType
from .policy import PlatformFeatures, SnpPolicy
from .rmp import PAGE_SIZE, Rmp, RmpPageSize


class SnpCommand(enum.IntEnum):
    """``SEV_CMD_SNP_*`` (include/linux/psp-sev.h)."""

    SNP_INIT = 0x081
    SNP_SHUTDOWN = 0x082
    SNP_PLATFORM_STATUS = 0x083
    SNP_DF_FLUSH = 0x084
    SNP_INIT_EX = 0x085
    SNP_SHUTDOWN_EX = 0x086
    SNP_DECOMMISSION = 0x090
    SNP_ACTIVATE = 0x091
    SNP_GUEST_STATUS = 0x092
    SNP_GCTX_CREATE = 0x093
    SNP_GUEST_REQUEST = 0x094
    SNP_ACTIVATE_EX = 0x095
    SNP_LAUNCH_START = 0x0A0
    SNP_LAUNCH_UPDATE = 0x0A1
    SNP_LAUNCH_FINISH = 0x0A2
    SNP_DBG_DECRYPT = 0x0B0
    SNP_DBG_ENCRYPT = 0x0B1
    SNP_PAGE_SWAP_OUT = 0x0C0
    SNP_PAGE_SWAP_IN = 0x0C1
    SNP_PAGE_MOVE = 0x0C2
    SNP_PAGE_MD_INIT = 0x0C3
    SNP_PAGE_SET_STATE = 0x0C6
    SNP_PAGE_RECLAIM = 0x0C7
    SNP_PAGE_UNSMASH = 0x0C8
    SNP_CONFIG = 0x0C9
    SNP_DOWNLOAD_FIRMWARE_EX = 0x0CA
    SNP_COMMIT = 0x0CB
    SNP_VLEK_LOAD = 0x0CD


class SnpPlatformState(enum.IntEnum):
    """SNP_PLATFORM_STATUS.state (docs/facts.md#facts-9d: 0 UNINIT, 1 INIT)."""

    UNINIT = 0
    INIT = 1


class SnpGuestState(enum.IntEnum):
    """The SNP guest context's state (SNP ABI GSTATE_*)."""

    INIT = 0  # after SNP_GCTX_CREATE
    LAUNCH = 1  # after SNP_LAUNCH_START
    RUNNING = 2  # after SNP_LAUNCH_FINISH


# -- the CPUID page (SNP ABI "CPUID page"; Linux struct snp_cpuid_table) -------------
CPUID_COUNT_MAX = 64
CPUID_HEADER = struct.Struct("<IIQ")  # count, reserved, reserved
CPUID_ENTRY = struct.Struct("<IIQQIIIIQ")  # eax_in, ecx_in, xcr0_in, xss_in, eax..edx, reserved


@dataclasses.dataclass(frozen=True)
class CpuidEntry:
    eax_in: int
    ecx_in: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    xcr0_in: int = 0
    xss_in: int = 0

    def pack(self) -> bytes:
        return CPUID_ENTRY.pack(self.eax_in, self.ecx_in, self.xcr0_in, self.xss_in,
                                self.eax, self.ebx, self.ecx, self.edx, 0)

    @classmethod
    def unpack(cls, raw: bytes) -> "CpuidEntry":
        eax_in, ecx_in, xcr0, xss, a, b, c, d, _ = CPUID_ENTRY.unpack(raw)
        return cls(eax_in, ecx_in, a, b, c, d, xcr0, xss)


def cpuid_page(entries) -> bytes:
    """A 4 KiB CPUID page holding ``entries`` (at most 64)."""
    entries = list(entries)
    raw = CPUID_HEADER.pack(len(entries), 0, 0) + b"".join(e.pack() for e in entries)
    if len(raw) > PAGE_SIZE:
        raise ValueError(f"{len(entries)} CPUID entries do not fit in a page")
    return raw + bytes(PAGE_SIZE - len(raw))


def parse_cpuid_page(page: bytes) -> tuple[int, list[CpuidEntry]]:
    """(count as written, the entries up to min(count, 64))."""
    count = CPUID_HEADER.unpack_from(page)[0]
    n = min(count, CPUID_COUNT_MAX)
    return count, [CpuidEntry.unpack(page[CPUID_HEADER.size + i * CPUID_ENTRY.size:]
                                     [:CPUID_ENTRY.size]) for i in range(n)]


# The registers the model firmware treats as feature masks: a guest may be
# told less than the hardware has, never more.  AMD's real CPUID policy (the
# PPR's per-leaf table) is longer; this is the model's subset (model).
FEATURE_MASKED = {(0x1, "ecx"), (0x1, "edx"), (0x7, "ebx"), (0x7, "ecx"), (0x7, "edx"),
                  (0x80000001, "ecx"), (0x80000001, "edx"), (0x8000001F, "eax")}

# The simulated part's CPUID (EPYC Milan-like; CPUID 1 EAX = family 19h model 1 stepping 1).
MILAN_SIG = 0x00A00F11
DEFAULT_HW_CPUID = {
    (0x0, 0): (0x10, 0x68747541, 0x444D4163, 0x69746E65),
    (0x1, 0): (MILAN_SIG, 0x00800800, 0x7EF8320B, 0x178BFBFF),
    (0x7, 0): (0x0, 0x219C97A9, 0x0040069C, 0x00000010),
    (0x80000000, 0): (0x80000021, 0x68747541, 0x444D4163, 0x69746E65),
    (0x80000001, 0): (0x00A00F11, 0x40000000, 0x75C237FF, 0x2FD3FBFF),
    (0x8000001F, 0): (0x0001007F, 0x00004173, 0x000001FD, 0x00000001),
}


# -- the secrets page (SNP ABI 1.51 §8.17.2.5; edk2 SnpSecretsPage.h) -----------------
SECRETS_VERSION = 2  # (model) the 1.51 layout below
SECRETS = struct.Struct("<III4x16s32s32s32s32s")  # version, imi_en, fms, gosvw, vmpck0-3


@dataclasses.dataclass(frozen=True)
class SnpPlatformStatus:
    """``struct sev_user_data_snp_status`` (32 bytes, docs/facts.md#facts-9c)."""

    api_major: int
    api_minor: int
    state: SnpPlatformState
    is_rmp_initialized: bool
    build_id: int
    guest_count: int
    current_tcb_version: int = 0
    reported_tcb_version: int = 0

    def to_bytes(self) -> bytes:
        return struct.pack("<BBBBIIIQQ", self.api_major, self.api_minor, int(self.state),
                           int(self.is_rmp_initialized), self.build_id, 0, self.guest_count,
                           self.current_tcb_version, self.reported_tcb_version)


@dataclasses.dataclass(frozen=True)
class SnpGuestStatus:
    policy: int
    asid: int
    state: SnpGuestState


@dataclasses.dataclass
class _SnpGuest:
    gctx_pfn: int
    state: SnpGuestState = SnpGuestState.INIT
    policy: SnpPolicy | None = None
    asid: int = 0
    gosvw: bytes = bytes(16)
    digest: LaunchDigest = dataclasses.field(default_factory=LaunchDigest)
    vmpck: tuple = ()
    id_block: bytes | None = None
    id_key_digest: bytes = bytes(LD_SIZE)
    author_key_digest: bytes = bytes(LD_SIZE)
    host_data: bytes = bytes(32)
    vcek_disabled: bool = False


class HostMemory:
    """Sparse host physical memory, 4 KiB pages, zero until written."""

    def __init__(self, pages: int):
        self.pages = pages
        self._data: dict[int, bytearray] = {}

    def _page(self, pfn: int) -> bytearray:
        if not 0 <= pfn < self.pages:
            raise IndexError(f"PFN {pfn:#x} is beyond host memory")
        p = self._data.get(pfn)
        if p is None:
            p = self._data[pfn] = bytearray(PAGE_SIZE)
        return p

    def read_page(self, pfn: int) -> bytes:
        p = self._data.get(pfn)
        if not 0 <= pfn < self.pages:
            raise IndexError(f"PFN {pfn:#x} is beyond host memory")
        return bytes(p) if p is not None else bytes(PAGE_SIZE)

    def write_page(self, pfn: int, data: bytes) -> None:
        if len(data) != PAGE_SIZE:
            raise ValueError("pages are 4096 bytes")
        self._page(pfn)[:] = data


def _fail(command: str, status: SevStatus, detail: str) -> SevError:
    return SevError(command, errno.EIO, int(status), detail)


def ecdsa_p384_public_key(raw: bytes):
    """The SNP ABI's ECDSA public key (curve u32 = 2 for P-384, QX[72], QY[72] little-endian)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    curve, qx, qy = struct.unpack_from("<I72s72s", raw)
    if curve != 2:
        raise ValueError(f"curve {curve} is not P-384 (2)")
    return ec.EllipticCurvePublicNumbers(int.from_bytes(qx, "little"), int.from_bytes(qy, "little"),
                                         ec.SECP384R1()).public_key()


def verify_snp_signature(public_key, signature: bytes, message: bytes) -> bool:
    """An SNP-format ECDSA P-384/SHA-384 signature (R[72], S[72] little-endian)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    r = int.from_bytes(signature[:72], "little")
    s = int.from_bytes(signature[72:144], "little")
    try:
        public_key.verify(utils.encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError):
        return False


ID_BLOCK_SIZE = 96  # KVM_SEV_SNP_ID_BLOCK_SIZE
ID_AUTH_SIZE = 4096  # KVM_SEV_SNP_ID_AUTH_SIZE
ID_BLOCK = struct.Struct("<48s16s16sIIQ")  # LD, FAMILY_ID, IMAGE_ID, VERSION, GUEST_SVN, POLICY
# ID_AUTH: ID_KEY_ALGO u32 @0, AUTH_KEY_ALGO u32 @4, ID_BLOCK_SIG @0x40 (0x200),
# ID_KEY @0x240 (0x404), ID_KEY_SIG @0x680 (0x200), AUTHOR_KEY @0x880 (0x404)
ID_AUTH_SIG_OFF, ID_AUTH_KEY_OFF = 0x40, 0x240
ID_AUTH_KEY_SIG_OFF, ID_AUTH_AUTHOR_OFF = 0x680, 0x880
SIG_LEN, KEY_LEN = 0x200, 0x404
KEY_ALGO_ECDSA_P384_SHA384 = 1


class SimulatedSnpFirmware:
    """The SNP side of a simulated AMD-SP."""

    def __init__(self, *, host_pages: int = 1 << 16, api_major: int = 1, api_minor: int = 55,
                 build: int = 21, platform: PlatformFeatures | None = None,
                 max_snp_asid: int = 99, hw_cpuid: dict | None = None, cpu_sig: int = MILAN_SIG):
        self.memory = HostMemory(host_pages)
        self.rmp = Rmp(host_pages)
        self.api_major, self.api_minor, self.build = api_major, api_minor, build
        self.platform = platform or PlatformFeatures(abi_major=api_major, abi_minor=api_minor)
        self.max_snp_asid = max_snp_asid
        self.hw_cpuid = dict(DEFAULT_HW_CPUID if hw_cpuid is None else hw_cpuid)
        self.cpu_sig = cpu_sig
        self.state = SnpPlatformState.UNINIT
        self.sev_legacy_initialized = False  # SEV INIT done (SNP_INIT must come first)
        self.guests: dict[int, _SnpGuest] = {}

    # -- platform --------------------------------------------------------------------
    def _require_init(self, command: str) -> None:
        if self.state != SnpPlatformState.INIT:
            raise _fail(command, SevStatus.INVALID_PLATFORM_STATE,
                        f"the SNP platform is {self.state.name}, needs INIT (run SNP_INIT)")

    def snp_init(self) -> None:
        """SNP_INIT: UNINIT -> INIT.  Refused once SNP is up, or after legacy SEV INIT (model:
        the kernel always issues SNP_INIT before INIT, __sev_platform_init_locked)."""
        if self.state == SnpPlatformState.INIT:
            raise _fail("SNP_INIT", SevStatus.INVALID_PLATFORM_STATE, "SNP is already initialized")
        if self.sev_legacy_initialized:
            raise _fail("SNP_INIT", SevStatus.INVALID_PLATFORM_STATE,
                        "legacy SEV is already initialized; SNP_INIT must come first")
        self.state = SnpPlatformState.INIT

    def snp_shutdown(self) -> None:
        """SNP_SHUTDOWN: INIT -> UNINIT; guest contexts must be decommissioned first (model)."""
        if self.guests:
            raise _fail("SNP_SHUTDOWN", SevStatus.INVALID_PLATFORM_STATE,
                        f"{len(self.guests)} guest context(s) still exist")
        self.state = SnpPlatformState.UNINIT

    def platform_status(self) -> SnpPlatformStatus:
        """SNP_PLATFORM_STATUS (valid in any state)."""
        return SnpPlatformStatus(self.api_major, self.api_minor, self.state,
                                 self.state == SnpPlatformState.INIT, self.build, len(self.guests))

    def df_flush(self) -> None:
        self._require_init("SNP_DF_FLUSH")

    # -- pages the kernel hands the firmware ------------------------------------------
    def alloc_firmware_page(self, pfn: int) -> None:
        """What ``snp_alloc_firmware_page`` does: RMPUPDATE to Firmware state (assigned,
        ASID 0, immutable)."""
        self.rmp.firmware_set(pfn, assigned=True, asid=0, immutable=True, validated=False,
                              page_size=RmpPageSize.SIZE_4K, gpa=0)

    def _guest(self, command: str, gctx_spa: int) -> _SnpGuest:
        g = self.guests.get(gctx_spa >> 12)
        if g is None or gctx_spa & 0xFFF:
            raise _fail(command, SevStatus.INVALID_GUEST, f"no guest context at {gctx_spa:#x}")
        return g

    @staticmethod
    def _require_state(command: str, g: _SnpGuest, state: SnpGuestState) -> None:
        if g.state != state:
            raise _fail(command, SevStatus.INVALID_GUEST_STATE,
                        f"the guest is {g.state.name}, {command} needs {state.name}")

    # -- guest lifecycle ----------------------------------------------------------------
    def gctx_create(self, gctx_spa: int) -> None:
        """SNP_GCTX_CREATE: the page must be Firmware-owned; it becomes the guest context."""
        cmd = "SNP_GCTX_CREATE"
        self._require_init(cmd)
        pfn = gctx_spa >> 12
        if gctx_spa & 0xFFF or not self.rmp.covered(pfn):
            raise _fail(cmd, SevStatus.INVALID_ADDRESS, f"{gctx_spa:#x} is not a page")
        e, _ = self.rmp.effective(pfn)
        if not (e.assigned and e.asid == 0 and e.immutable) or pfn in self.guests:
            raise _fail(cmd, SevStatus.INVALID_PAGE_STATE,
                        "the context page is not in the Firmware state")
        self.guests[pfn] = _SnpGuest(pfn)

    def launch_start(self, gctx_spa: int, policy: int | SnpPolicy, *, ma_en: bool = False,
                     imi_en: bool = False, gosvw: bytes = bytes(16),
                     desired_tsc_khz: int = 0) -> None:
        """SNP_LAUNCH_START: bind the policy, GSTATE_INIT -> GSTATE_LAUNCH, LD = 0."""
        cmd = "SNP_LAUNCH_START"
        self._require_init(cmd)
        g = self._guest(cmd, gctx_spa)
        self._require_state(cmd, g, SnpGuestState.INIT)
        policy = policy if isinstance(policy, SnpPolicy) else SnpPolicy(policy)
        bad = policy.firmware_check(self.platform, ma_en=ma_en)
        if bad:
            raise _fail(cmd, bad[0], bad[1])
        if len(gosvw) != 16:
            raise _fail(cmd, SevStatus.INVALID_PARAM, "GOSVW is 16 bytes")
        g.policy, g.gosvw, g.digest = policy, bytes(gosvw), LaunchDigest()
        g.vmpck = tuple(secrets.token_bytes(32) for _ in range(4))
        g.state = SnpGuestState.LAUNCH

    def activate(self, gctx_spa: int, asid: int) -> None:
        """SNP_ACTIVATE: bind an ASID (1..max SNP ASID, not another guest's)."""
        cmd = "SNP_ACTIVATE"
        self._require_init(cmd)
        g = self._guest(cmd, gctx_spa)
        if not 1 <= asid <= self.max_snp_asid:
            raise _fail(cmd, SevStatus.INVALID_ASID, f"ASID {asid} is not an SNP ASID "
                        f"(1..{self.max_snp_asid})")
        if any(o.asid == asid for o in self.guests.values() if o is not g):
            raise _fail(cmd, SevStatus.ASID_OWNED, f"ASID {asid} belongs to another guest")
        if g.asid:
            raise _fail(cmd, SevStatus.INVALID_GUEST_STATE, f"already active on ASID {g.asid}")
        g.asid = asid

    def launch_update(self, gctx_spa: int, page_spa: int, page_type: int, *,
                      page_size: int = 0, imi_page: bool = False, vmpl1_perms: int = 0,
                      vmpl2_perms: int = 0, vmpl3_perms: int = 0) -> None:
        """SNP_LAUNCH_UPDATE of one page.

        The page must be Pre-Guest: assigned to this guest's ASID, immutable,
        not validated (``rmp_make_private(..., immutable=true)``).  It is
        measured at the GPA its RMP entry records, then becomes Guest-Valid
        (validated, mutable; a VMSA page also gets the VMSA bit).  ZERO pages
        are zeroed, SECRETS pages filled, CPUID pages checked: a table the
        firmware rejects is rewritten with the corrected entries and the
        command fails with INVALID_PARAM (KVM copies that page back to
        userspace, ``sev_gmem_post_populate``).
        """
        cmd = "SNP_LAUNCH_UPDATE"
        self._require_init(cmd)
        g = self._guest(cmd, gctx_spa)
        self._require_state(cmd, g, SnpGuestState.LAUNCH)
        if not g.asid:
            raise _fail(cmd, SevStatus.INACTIVE, "the guest has no ASID (SNP_ACTIVATE)")
        try:
            ptype = PageType(page_type)
        except ValueError:
            raise _fail(cmd, SevStatus.INVALID_PARAM, f"page type {page_type} is not 1..6") from None
        if page_size not in (0, 1):
            raise _fail(cmd, SevStatus.INVALID_PARAM, f"page size {page_size}")
        if page_size:
            raise SimulatorError("SNP_LAUNCH_UPDATE of a 2 MiB page is not modelled (KVM "
                                 "only issues 4 KiB updates)")
        if (vmpl1_perms | vmpl2_perms | vmpl3_perms) & 0xE0:
            raise _fail(cmd, SevStatus.INVALID_PARAM, "reserved VMPL permission bits")
        pfn = page_spa >> 12
        if page_spa & 0xFFF or not self.rmp.covered(pfn) or pfn >= self.memory.pages:
            raise _fail(cmd, SevStatus.INVALID_ADDRESS, f"{page_spa:#x} is not a page in memory")
        e, head = self.rmp.effective(pfn)
        if e.page_size != RmpPageSize.SIZE_4K:
            raise _fail(cmd, SevStatus.INVALID_PAGE_SIZE, "the RMP entry is 2 MiB, the update 4 KiB")
        if e.assigned and e.asid and e.asid != g.asid:
            raise _fail(cmd, SevStatus.INVALID_PAGE_OWNER,
                        f"the page belongs to ASID {e.asid}, the guest is ASID {g.asid}")
        if not (e.assigned and e.asid == g.asid and e.immutable and not e.validated):
            raise _fail(cmd, SevStatus.INVALID_PAGE_STATE,
                        f"the page is not Pre-Guest ({e.owner}-owned, immutable={e.immutable}, "
                        f"validated={e.validated})")
        gpa = e.gpa
        if gpa >> 52:
            raise _fail(cmd, SevStatus.INVALID_ADDRESS,  # (model)
                        f"the RMP GPA {gpa:#x} is beyond the 52-bit guest physical space")
        page = self.memory.read_page(pfn)
        if ptype == PageType.VMSA:
            sev_features = struct.unpack_from("<Q", page, 0x3B0)[0]
            if not sev_features & 1:  # (model) SEV_FEATURES.SNPActive
                raise _fail(cmd, SevStatus.INVALID_PARAM,
                            f"the VMSA's SEV_FEATURES {sev_features:#x} lacks SNPActive (bit 0)")
        elif ptype == PageType.ZERO:
            self.memory.write_page(pfn, bytes(PAGE_SIZE))
        elif ptype == PageType.SECRETS:
            self.memory.write_page(pfn, self._secrets_page(g, imi_page))
        elif ptype == PageType.CPUID:
            corrected = self._check_cpuid(page)
            if corrected is not None:
                self.memory.write_page(pfn, corrected)
                raise _fail(cmd, SevStatus.INVALID_PARAM,
                            "the CPUID page holds values the platform does not allow; "
                            "the corrected table was written back")
        g.digest.update(gpa, ptype, self.memory.read_page(pfn) if ptype.measures_contents else None,
                        imi=int(imi_page), vmpl3=vmpl3_perms, vmpl2=vmpl2_perms, vmpl1=vmpl1_perms)
        e.validated, e.immutable = True, False
        e.vmsa = ptype == PageType.VMSA
        e.perms[1:] = [vmpl1_perms, vmpl2_perms, vmpl3_perms]

    def _secrets_page(self, g: _SnpGuest, imi: bool) -> bytes:
        raw = SECRETS.pack(SECRETS_VERSION, int(imi), self.cpu_sig, g.gosvw, *g.vmpck)
        return raw + bytes(PAGE_SIZE - len(raw))

    def _check_cpuid(self, page: bytes) -> bytes | None:
        """None if the table passes, else the corrected page."""
        count, entries = parse_cpuid_page(page)
        bad = count > CPUID_COUNT_MAX
        fixed = []
        for ent in entries:
            hw = self.hw_cpuid.get((ent.eax_in, ent.ecx_in))
            if hw is None:
                hw = self.hw_cpuid.get((ent.eax_in, 0)) if ent.eax_in in (0x1, 0x80000001) else None
            values = dict(eax=ent.eax, ebx=ent.ebx, ecx=ent.ecx, edx=ent.edx)
            if hw is not None:
                for i, reg in enumerate(("eax", "ebx", "ecx", "edx")):
                    if (ent.eax_in, reg) in FEATURE_MASKED and values[reg] & ~hw[i]:
                        values[reg] &= hw[i]
                        bad = True
            fixed.append(dataclasses.replace(ent, **values))
        return cpuid_page(fixed) if bad else None

    def launch_finish(self, gctx_spa: int, *, id_block: bytes | None = None,
                      id_auth: bytes | None = None, auth_key_en: bool = False,
                      vcek_disabled: bool = False, host_data: bytes = bytes(32)) -> None:
        """SNP_LAUNCH_FINISH: check the optional ID block and author key, GSTATE_RUNNING.

        ID block (96 bytes): LD[48], FAMILY_ID[16], IMAGE_ID[16], VERSION u32 (1),
        GUEST_SVN u32, POLICY u64; ID_AUTH (4096 bytes): key algorithms (1 =
        ECDSA P-384 with SHA-384), the ID block's signature by the ID key, the
        ID key, the ID key's signature by the author key, the author key
        (virtee/sev-snp-measure ``id_block.py`` lays out the same).
        BAD_SIGNATURE for a signature that does not verify, BAD_MEASUREMENT for
        an ID block LD other than the guest's, POLICY_FAILURE for another policy.
        """
        cmd = "SNP_LAUNCH_FINISH"
        self._require_init(cmd)
        g = self._guest(cmd, gctx_spa)
        self._require_state(cmd, g, SnpGuestState.LAUNCH)
        if len(host_data) != 32:
            raise _fail(cmd, SevStatus.INVALID_PARAM, "HOST_DATA is 32 bytes")
        if id_block is not None:
            self._check_id_block(cmd, g, id_block, id_auth, auth_key_en)
        elif auth_key_en:
            raise _fail(cmd, SevStatus.INVALID_PARAM, "AUTH_KEY_EN without an ID block")
        g.host_data, g.vcek_disabled = bytes(host_data), vcek_disabled
        g.state = SnpGuestState.RUNNING

    def _check_id_block(self, cmd, g, id_block, id_auth, auth_key_en) -> None:
        if len(id_block) != ID_BLOCK_SIZE or id_auth is None or len(id_auth) != ID_AUTH_SIZE:
            raise _fail(cmd, SevStatus.INVALID_PARAM, "the ID block is 96 bytes, ID_AUTH 4096")
        ld, _family, _image, version, _svn, policy = ID_BLOCK.unpack(id_block)
        id_algo, author_algo = struct.unpack_from("<II", id_auth)
        if version != 1 or id_algo != KEY_ALGO_ECDSA_P384_SHA384 or (
                auth_key_en and author_algo != KEY_ALGO_ECDSA_P384_SHA384):
            raise _fail(cmd, SevStatus.INVALID_PARAM,  # (model)
                        f"ID block version {version}, key algorithms {id_algo}/{author_algo}")
        id_key_raw = id_auth[ID_AUTH_KEY_OFF:ID_AUTH_KEY_OFF + KEY_LEN]
        try:
            id_key = ecdsa_p384_public_key(id_key_raw)
        except ValueError as exc:
            raise _fail(cmd, SevStatus.INVALID_PARAM, f"ID key: {exc}") from None
        if not verify_snp_signature(id_key, id_auth[ID_AUTH_SIG_OFF:ID_AUTH_SIG_OFF + SIG_LEN],
                                    id_block):
            raise _fail(cmd, SevStatus.BAD_SIGNATURE, "the ID block's signature does not verify "
                        "with the ID key")
        if auth_key_en:
            author_raw = id_auth[ID_AUTH_AUTHOR_OFF:ID_AUTH_AUTHOR_OFF + KEY_LEN]
            try:
                author = ecdsa_p384_public_key(author_raw)
            except ValueError as exc:
                raise _fail(cmd, SevStatus.INVALID_PARAM, f"author key: {exc}") from None
            if not verify_snp_signature(author, id_auth[ID_AUTH_KEY_SIG_OFF:
                                                        ID_AUTH_KEY_SIG_OFF + SIG_LEN], id_key_raw):
                raise _fail(cmd, SevStatus.BAD_SIGNATURE, "the ID key's signature does not "
                            "verify with the author key")
            g.author_key_digest = hashlib.sha384(author_raw).digest()
        if ld != g.digest.digest:
            raise _fail(cmd, SevStatus.BAD_MEASUREMENT, f"the ID block's launch digest "
                        f"{ld.hex()[:16]}... is not the guest's {g.digest.hex()[:16]}...")
        if policy != g.policy.value:
            raise _fail(cmd, SevStatus.POLICY_FAILURE, f"the ID block's policy {policy:#x} is "
                        f"not the guest's {g.policy.value:#x}")
        g.id_block = bytes(id_block)
        g.id_key_digest = hashlib.sha384(id_key_raw).digest()

    def guest_status(self, gctx_spa: int) -> SnpGuestStatus:
        g = self._guest("SNP_GUEST_STATUS", gctx_spa)
        return SnpGuestStatus(g.policy.value if g.policy else 0, g.asid, g.state)

    def launch_digest(self, gctx_spa: int) -> bytes:
        """GCTX.LD (what the attestation report's MEASUREMENT carries)."""
        return self._guest("SNP_GUEST_STATUS", gctx_spa).digest.digest

    def page_reclaim(self, page_spa: int) -> None:
        """SNP_PAGE_RECLAIM: an immutable page (Pre-Guest, Firmware, ...) becomes mutable
        so the hypervisor can RMPUPDATE it back (``snp_page_reclaim``)."""
        cmd = "SNP_PAGE_RECLAIM"
        self._require_init(cmd)
        pfn = page_spa >> 12
        if not self.rmp.covered(pfn):
            raise _fail(cmd, SevStatus.INVALID_ADDRESS, f"{page_spa:#x} is beyond the RMP")
        e, _ = self.rmp.effective(pfn)
        if not (e.assigned and e.immutable) or pfn in self.guests:
            raise _fail(cmd, SevStatus.INVALID_PAGE_STATE, "the page is not reclaimable")
        e.immutable, e.validated, e.vmsa = False, False, False

    def decommission(self, gctx_spa: int) -> None:
        """SNP_DECOMMISSION: the context page returns to the Firmware state."""
        g = self._guest("SNP_DECOMMISSION", gctx_spa)
        del self.guests[g.gctx_pfn]


__all__ = [
    "CpuidEntry", "HostMemory", "SimulatedSnpFirmware", "SnpCommand", "SnpGuestState",
    "SnpGuestStatus", "SnpPlatformState", "SnpPlatformStatus", "cpuid_page", "parse_cpuid_page",
]
