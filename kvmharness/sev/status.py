"""SEV firmware status codes, platform states and guest states.

The numbers are hard-coded from the reference (docs/facts.md#facts-9f), not taken
from an installed ``linux/psp-sev.h``: some SNP-era kernel releases shipped a
header whose values after 0x18 were wrong (INVALID_KEY = 0x27 followed by
INVALID_PAGE_SIZE = 0x28, ...), and the 6.1 header stops at 0x18 anyway.

The kernel puts the firmware's status into the ``error`` field of
``struct kvm_sev_cmd`` / ``struct sev_issue_cmd`` (a ``__u32``) and returns
``-EIO``; when it never reached the firmware it may store ``SEV_RET_NO_FW_CALL``
(-1, i.e. 0xFFFFFFFF in the u32 field).
"""

from __future__ import annotations

import enum


class SevStatus(enum.IntEnum):
    """SEV_RET_* firmware status codes (kernel names without the prefix)."""

    NO_FW_CALL = -1  # kernel-only: the firmware was not reached
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03  # the kernel header spells it INAVLID_CONFIG
    INVALID_LEN = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWSEV_RET_PLATFORM = 0x13
    HWSEV_RET_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    EXIT_RING_BUFFER = 0x1F
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27
    SHUTDOWN_INCOMPLETE = 0x28


# Kernel spellings for the binding layer (include/linux/psp-sev.h names).
SEV_RET_NO_FW_CALL = -1
SEV_RET_SUCCESS = 0x00
SEV_RET_INVALID_PLATFORM_STATE = 0x01
SEV_RET_INVALID_GUEST_STATE = 0x02
SEV_RET_INVALID_CONFIG = 0x03
SEV_RET_INVALID_LEN = 0x04
SEV_RET_ALREADY_OWNED = 0x05
SEV_RET_INVALID_CERTIFICATE = 0x06
SEV_RET_POLICY_FAILURE = 0x07
SEV_RET_INACTIVE = 0x08
SEV_RET_INVALID_ADDRESS = 0x09
SEV_RET_BAD_SIGNATURE = 0x0A
SEV_RET_BAD_MEASUREMENT = 0x0B
SEV_RET_ASID_OWNED = 0x0C
SEV_RET_INVALID_ASID = 0x0D
SEV_RET_WBINVD_REQUIRED = 0x0E
SEV_RET_DFFLUSH_REQUIRED = 0x0F
SEV_RET_INVALID_GUEST = 0x10
SEV_RET_INVALID_COMMAND = 0x11
SEV_RET_ACTIVE = 0x12
SEV_RET_HWSEV_RET_PLATFORM = 0x13
SEV_RET_HWSEV_RET_UNSAFE = 0x14
SEV_RET_UNSUPPORTED = 0x15
SEV_RET_INVALID_PARAM = 0x16
SEV_RET_RESOURCE_LIMIT = 0x17
SEV_RET_SECURE_DATA_INVALID = 0x18
SEV_RET_INVALID_PAGE_SIZE = 0x19
SEV_RET_INVALID_PAGE_STATE = 0x1A
SEV_RET_INVALID_MDATA_ENTRY = 0x1B
SEV_RET_INVALID_PAGE_OWNER = 0x1C
SEV_RET_AEAD_OFLOW = 0x1D
SEV_RET_EXIT_RING_BUFFER = 0x1F
SEV_RET_RMP_INIT_REQUIRED = 0x20
SEV_RET_BAD_SVN = 0x21
SEV_RET_BAD_VERSION = 0x22
SEV_RET_SHUTDOWN_REQUIRED = 0x23
SEV_RET_UPDATE_FAILED = 0x24
SEV_RET_RESTORE_REQUIRED = 0x25
SEV_RET_RMP_INITIALIZATION_FAILED = 0x26
SEV_RET_INVALID_KEY = 0x27
SEV_RET_SHUTDOWN_INCOMPLETE = 0x28
SEV_RET_INAVLID_CONFIG = SEV_RET_INVALID_CONFIG  # the header's own typo


def status_name(code: int) -> str:
    """Name of a firmware status code: ``1 -> "INVALID_PLATFORM_STATE"``.

    Accepts the kernel's u32 ``error`` field as well (0xFFFFFFFF is
    ``NO_FW_CALL``).  Codes this table does not know (newer firmware, SEV-TIO
    0x30-0x3E) come back as ``"UNKNOWN_0x.."`` rather than raising, so an error
    message can always be built.
    """
    if code == 0xFFFFFFFF:
        code = -1
    try:
        return SevStatus(code).name
    except ValueError:
        return f"UNKNOWN_0x{code & 0xFFFFFFFF:x}"


class PlatformState(enum.IntEnum):
    """PLATFORM_STATUS.state (docs/facts.md#facts-9d)."""

    UNINIT = 0
    INIT = 1
    WORKING = 2  # initialized and managing at least one guest


class GuestState(enum.IntEnum):
    """GUEST_STATUS.state: the firmware's values (docs/facts.md#facts-9e).

    The KVM documentation's names (INVALID, LAUNCHING, SECRET, RUNNING,
    RECEIVING, SENDING) do not match values 4-6; these are the firmware's.
    """

    UNINIT = 0
    INVALID = 0  # AMD's firmware source name (SEV_GUEST_STATE_INVALID): no such guest
    LUPDATE = 1  # launching: LAUNCH_UPDATE_* accepted
    LSECRET = 2  # measured: LAUNCH_SECRET accepted
    RUNNING = 3
    SUPDATE = 4  # sending
    RUPDATE = 5  # receiving
    SENT = 6


class SevCommand(enum.IntEnum):
    """PSP mailbox command IDs (kernel-internal ``SEV_CMD_*``, docs/facts.md#facts-9g)."""

    INIT = 0x001
    SHUTDOWN = 0x002
    FACTORY_RESET = 0x003
    PLATFORM_STATUS = 0x004
    PEK_GEN = 0x005
    PEK_CSR = 0x006
    PEK_CERT_IMPORT = 0x007
    PDH_CERT_EXPORT = 0x008
    PDH_GEN = 0x009
    DF_FLUSH = 0x00A
    DOWNLOAD_FIRMWARE = 0x00B
    GET_ID = 0x00C
    INIT_EX = 0x00D
    DECOMMISSION = 0x020
    ACTIVATE = 0x021
    DEACTIVATE = 0x022
    GUEST_STATUS = 0x023
    LAUNCH_START = 0x030
    LAUNCH_UPDATE_DATA = 0x031
    LAUNCH_UPDATE_VMSA = 0x032
    LAUNCH_MEASURE = 0x033
    LAUNCH_UPDATE_SECRET = 0x034
    LAUNCH_FINISH = 0x035
    ATTESTATION_REPORT = 0x036
    SEND_START = 0x040
    SEND_UPDATE_DATA = 0x041
    SEND_UPDATE_VMSA = 0x042
    SEND_FINISH = 0x043
    SEND_CANCEL = 0x044
    RECEIVE_START = 0x050
    RECEIVE_UPDATE_DATA = 0x051
    RECEIVE_UPDATE_VMSA = 0x052
    RECEIVE_FINISH = 0x053
    DBG_DECRYPT = 0x060
    DBG_ENCRYPT = 0x061


# PLATFORM_STATUS.flags bits (docs/facts.md#facts-9d): the flags u32 overlays the owner byte
# and the config u16 of the firmware's structure.
SEV_STATUS_FLAGS_OWNER = 1 << 0  # 1 = externally owned (PEK_CERT_IMPORT done)
SEV_STATUS_FLAGS_CONFIG_ES = 1 << 8  # SEV-ES initialized on the platform
# INIT command buffer flags (psp-sev.h SEV_INIT_FLAGS_SEV_ES; AMD: SEV_CONFIG_ES_FLAG)
SEV_INIT_FLAGS_ES = 1 << 0
