"""Pin every declaration in cdefs/ to the kernel's own UAPI headers.

The test generates a C program from the cffi declarations themselves: for
every struct, union and typedef, its ``sizeof``; for every field (nested
named and anonymous members included) its ``offsetof`` and ``sizeof``; for
every bitfield its first bit and width; every ``#define``/enum constant; every
ioctl number of ``kvmharness.kvm._ffi``.  It compiles that program with gcc
against the installed ``<linux/kvm.h>``, ``<asm/kvm.h>`` and
``<linux/psp-sev.h>``, runs it, and compares each printed number with cffi's.

Items newer than the installed headers (Debian 12 ships 6.1 UAPI headers:
no KVM_SEV_INIT2, no SNP structs, no VM types 2-5...) are found by compiling:
a line gcc rejects names an item the headers lack.  Those items are compared
with the tables below instead (numbers from docs/facts.md, and for the few items it does not
list, from the current kernel UAPI headers).  Padding fields the kernel made
explicit later (``pad0``...) are checked to sit in a hole of the old header's
layout.  An item in neither the headers nor a table fails the test, so
nothing in cdefs/ goes unchecked.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmharness.errors import KvmError
from kvmharness.kvm import _ffi
from kvmharness.kvm._ffi import ffi

HEADERS = ("linux/kvm.h", "asm/kvm.h", "linux/psp-sev.h")

# ---------------------------------------------------------------------------
# Expected values for items the installed headers may lack.
#
# Layouts: {ctype: {"": total size or None, "a.b": (offset, size),
#                   "bitfield": ("bits", first bit, width)}}
# Offsets are from the start of the outermost struct.

_KVM_RUN_UNION = 32  # offsetof(struct kvm_run, <exit union>)

TABLE_LAYOUTS: dict[str, dict[str, object]] = {
    # docs/facts.md#facts-8b: kvm_sev_cmd pad (implicit in 6.1, explicit pad0 later)
    "struct kvm_sev_cmd": {"": 24, "id": (0, 4), "pad0": (4, 4), "data": (8, 8),
                           "error": (16, 4), "sev_fd": (20, 4)},
    # docs/facts.md#facts-8d
    "struct kvm_sev_init": {"": 48, "vmsa_features": (0, 8), "flags": (8, 4),
                            "ghcb_version": (12, 2), "pad1": (14, 2), "pad2": (16, 32)},
    "struct kvm_sev_launch_start": {"": 40, "handle": (0, 4), "policy": (4, 4),
                                    "dh_uaddr": (8, 8), "dh_len": (16, 4), "pad0": (20, 4),
                                    "session_uaddr": (24, 8), "session_len": (32, 4),
                                    "pad1": (36, 4)},
    "struct kvm_sev_launch_update_data": {"": 16, "uaddr": (0, 8), "len": (8, 4),
                                          "pad0": (12, 4)},
    "struct kvm_sev_launch_secret": {"": 48, "hdr_uaddr": (0, 8), "hdr_len": (8, 4),
                                     "guest_uaddr": (16, 8), "guest_len": (24, 4),
                                     "trans_uaddr": (32, 8), "trans_len": (40, 4)},
    "struct kvm_sev_launch_measure": {"": 16, "uaddr": (0, 8), "len": (8, 4)},
    "struct kvm_sev_guest_status": {"": 12, "handle": (0, 4), "policy": (4, 4),
                                    "state": (8, 4)},
    "struct kvm_sev_dbg": {"": 24, "src_uaddr": (0, 8), "dst_uaddr": (8, 8), "len": (16, 4)},
    "struct kvm_sev_attestation_report": {"": 32, "mnonce": (0, 16), "uaddr": (16, 8),
                                          "len": (24, 4)},
    "struct kvm_sev_send_start": {"": 72, "policy": (0, 4), "pdh_cert_uaddr": (8, 8),
                                  "pdh_cert_len": (16, 4), "plat_certs_uaddr": (24, 8),
                                  "plat_certs_len": (32, 4), "amd_certs_uaddr": (40, 8),
                                  "amd_certs_len": (48, 4), "session_uaddr": (56, 8),
                                  "session_len": (64, 4)},
    "struct kvm_sev_send_update_data": {"": 48, "hdr_uaddr": (0, 8), "hdr_len": (8, 4),
                                        "guest_uaddr": (16, 8), "guest_len": (24, 4),
                                        "trans_uaddr": (32, 8), "trans_len": (40, 4)},
    "struct kvm_sev_receive_start": {"": 40, "handle": (0, 4), "policy": (4, 4),
                                     "pdh_uaddr": (8, 8), "pdh_len": (16, 4),
                                     "session_uaddr": (24, 8), "session_len": (32, 4)},
    "struct kvm_sev_receive_update_data": {"": 48, "hdr_uaddr": (0, 8), "hdr_len": (8, 4),
                                           "guest_uaddr": (16, 8), "guest_len": (24, 4),
                                           "trans_uaddr": (32, 8), "trans_len": (40, 4)},
    "struct kvm_sev_snp_launch_start": {"": 64, "policy": (0, 8), "gosvw": (8, 16),
                                        "flags": (24, 2), "pad0": (26, 6), "pad1": (32, 32)},
    "struct kvm_sev_snp_launch_update": {"": 64, "gfn_start": (0, 8), "uaddr": (8, 8),
                                         "len": (16, 8), "type": (24, 1), "pad0": (25, 1),
                                         "flags": (26, 2), "pad1": (28, 4), "pad2": (32, 32)},
    "struct kvm_sev_snp_launch_finish": {"": 88, "id_block_uaddr": (0, 8),
                                         "id_auth_uaddr": (8, 8), "id_block_en": (16, 1),
                                         "auth_key_en": (17, 1), "vcek_disabled": (18, 1),
                                         "host_data": (19, 32), "pad0": (51, 3),
                                         "flags": (54, 2), "pad1": (56, 32)},
    "struct kvm_enc_region": {"": 16, "addr": (0, 8), "size": (8, 8)},
    "struct kvm_device_attr": {"": 24, "flags": (0, 4), "group": (4, 4), "attr": (8, 8),
                               "addr": (16, 8)},
    # docs/facts.md#facts-9a, #facts-9c (/dev/sev structs, packed)
    "struct sev_issue_cmd": {"": 16, "cmd": (0, 4), "data": (4, 8), "error": (12, 4)},
    "struct sev_user_data_status": {"": 12, "api_major": (0, 1), "api_minor": (1, 1),
                                    "state": (2, 1), "flags": (3, 4), "build": (7, 1),
                                    "guest_count": (8, 4)},
    "struct sev_user_data_pek_csr": {"": 12, "address": (0, 8), "length": (8, 4)},
    "struct sev_user_data_pek_cert_import": {"": 24, "pek_cert_address": (0, 8),
                                             "pek_cert_len": (8, 4),
                                             "oca_cert_address": (12, 8),
                                             "oca_cert_len": (20, 4)},
    "struct sev_user_data_pdh_cert_export": {"": 24, "pdh_cert_address": (0, 8),
                                             "pdh_cert_len": (8, 4),
                                             "cert_chain_address": (12, 8),
                                             "cert_chain_len": (20, 4)},
    "struct sev_user_data_get_id": {"": 128, "socket1": (0, 64), "socket2": (64, 64)},
    "struct sev_user_data_get_id2": {"": 12, "address": (0, 8), "length": (8, 4)},
    "struct sev_user_data_snp_status": {
        "": 32, "api_major": (0, 1), "api_minor": (1, 1), "state": (2, 1),
        "is_rmp_initialized": ("bits", 24, 1), "rsvd": ("bits", 25, 7),
        "build_id": (4, 4),
        "mask_chip_id": ("bits", 64, 1), "mask_chip_key": ("bits", 65, 1),
        "vlek_en": ("bits", 66, 1), "feature_info": ("bits", 67, 1),
        "rapl_dis": ("bits", 68, 1), "ciphertext_hiding_cap": ("bits", 69, 1),
        "ciphertext_hiding_en": ("bits", 70, 1), "rsvd1": ("bits", 71, 25),
        "guest_count": (12, 4), "current_tcb_version": (16, 8),
        "reported_tcb_version": (24, 8)},
    "struct sev_user_data_snp_config": {
        "": 64, "reported_tcb": (0, 8), "mask_chip_id": ("bits", 64, 1),
        "mask_chip_key": ("bits", 65, 1), "rsvd": ("bits", 66, 30), "rsvd1": (12, 52)},
    "struct sev_user_data_snp_vlek_load": {"": 16, "len": (0, 4),
                                           "vlek_wrapped_version": (4, 1), "rsvd": (5, 3),
                                           "vlek_wrapped_address": (8, 8)},
    "struct sev_user_data_snp_wrapped_vlek_hashstick": {"": 432, "data": (0, 432)},
    # Not in the facts reference; current kernel UAPI (6.8+ guest_memfd, newer
    # hypercall flags, 6.8+ memory_fault exit).
    "struct kvm_userspace_memory_region2": {
        "": 160, "slot": (0, 4), "flags": (4, 4), "guest_phys_addr": (8, 8),
        "memory_size": (16, 8), "userspace_addr": (24, 8), "guest_memfd_offset": (32, 8),
        "guest_memfd": (40, 4), "pad1": (44, 4), "pad2": (48, 112)},
    # guest_memfd and memory attributes (6.8+ include/uapi/linux/kvm.h)
    "struct kvm_memory_attributes": {"": 32, "address": (0, 8), "size": (8, 8),
                                     "attributes": (16, 8), "flags": (24, 8)},
    "struct kvm_create_guest_memfd": {"": 64, "size": (0, 8), "flags": (8, 8),
                                      "reserved": (16, 48)},
    "struct kvm_run": {
        "": 2352,
        "hypercall.flags": (_KVM_RUN_UNION + 64, 8),
        "memory_fault": (_KVM_RUN_UNION, 24),
        "memory_fault.flags": (_KVM_RUN_UNION, 8),
        "memory_fault.gpa": (_KVM_RUN_UNION + 8, 8),
        "memory_fault.size": (_KVM_RUN_UNION + 16, 8)},
}

# docs/facts.md#facts-8a, #facts-9a (computed by gcc against the 6.1 headers)
TABLE_IOCTLS: dict[str, int] = {
    "KVM_CREATE_VM": 0xAE01, "KVM_CHECK_EXTENSION": 0xAE03, "KVM_CREATE_VCPU": 0xAE41,
    "KVM_RUN": 0xAE80, "KVM_GET_REGS": 0x8090AE81, "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83, "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46, "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_MEMORY_ENCRYPT_OP": 0xC008AEBA, "KVM_MEMORY_ENCRYPT_REG_REGION": 0x8010AEBB,
    "KVM_MEMORY_ENCRYPT_UNREG_REGION": 0x8010AEBC, "KVM_SET_DEVICE_ATTR": 0x4018AEE1,
    "KVM_GET_DEVICE_ATTR": 0x4018AEE2, "KVM_HAS_DEVICE_ATTR": 0x4018AEE3,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05, "KVM_SET_CPUID2": 0x4008AE90,
    "SEV_ISSUE_CMD": 0xC0105300,
    # not in the facts reference; current kernel UAPI (6.8+)
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    # _IOW(KVMIO, 0xd2, struct kvm_memory_attributes), _IOWR(KVMIO, 0xd4, struct
    # kvm_create_guest_memfd): current include/uapi/linux/kvm.h
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2, "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
}

# SEV firmware status codes, docs/facts.md#facts-9f.  Checked against this table always:
# some kernel releases shipped wrong values after SECURE_DATA_INVALID (0x18),
# so for those codes a disagreeing header is reported, not trusted.
SEV_RET_FACTS: dict[str, int] = {
    "SEV_RET_NO_FW_CALL": -1, "SEV_RET_SUCCESS": 0x00,
    "SEV_RET_INVALID_PLATFORM_STATE": 0x01, "SEV_RET_INVALID_GUEST_STATE": 0x02,
    "SEV_RET_INAVLID_CONFIG": 0x03, "SEV_RET_INVALID_CONFIG": 0x03,
    "SEV_RET_INVALID_LEN": 0x04, "SEV_RET_ALREADY_OWNED": 0x05,
    "SEV_RET_INVALID_CERTIFICATE": 0x06, "SEV_RET_POLICY_FAILURE": 0x07,
    "SEV_RET_INACTIVE": 0x08, "SEV_RET_INVALID_ADDRESS": 0x09, "SEV_RET_BAD_SIGNATURE": 0x0A,
    "SEV_RET_BAD_MEASUREMENT": 0x0B, "SEV_RET_ASID_OWNED": 0x0C, "SEV_RET_INVALID_ASID": 0x0D,
    "SEV_RET_WBINVD_REQUIRED": 0x0E, "SEV_RET_DFFLUSH_REQUIRED": 0x0F,
    "SEV_RET_INVALID_GUEST": 0x10, "SEV_RET_INVALID_COMMAND": 0x11, "SEV_RET_ACTIVE": 0x12,
    "SEV_RET_HWSEV_RET_PLATFORM": 0x13, "SEV_RET_HWSEV_RET_UNSAFE": 0x14,
    "SEV_RET_UNSUPPORTED": 0x15, "SEV_RET_INVALID_PARAM": 0x16,
    "SEV_RET_RESOURCE_LIMIT": 0x17, "SEV_RET_SECURE_DATA_INVALID": 0x18,
    "SEV_RET_INVALID_PAGE_SIZE": 0x19, "SEV_RET_INVALID_PAGE_STATE": 0x1A,
    "SEV_RET_INVALID_MDATA_ENTRY": 0x1B, "SEV_RET_INVALID_PAGE_OWNER": 0x1C,
    "SEV_RET_AEAD_OFLOW": 0x1D, "SEV_RET_EXIT_RING_BUFFER": 0x1F,
    "SEV_RET_RMP_INIT_REQUIRED": 0x20, "SEV_RET_BAD_SVN": 0x21, "SEV_RET_BAD_VERSION": 0x22,
    "SEV_RET_SHUTDOWN_REQUIRED": 0x23, "SEV_RET_UPDATE_FAILED": 0x24,
    "SEV_RET_RESTORE_REQUIRED": 0x25, "SEV_RET_RMP_INITIALIZATION_FAILED": 0x26,
    "SEV_RET_INVALID_KEY": 0x27, "SEV_RET_SHUTDOWN_INCOMPLETE": 0x28,
}
_SEV_RET_HEADER_TRUSTED_MAX = 0x18

TABLE_CONSTANTS: dict[str, int] = {
    **SEV_RET_FACTS,
    # docs/facts.md#facts-8c
    "KVM_SEV_INIT": 0, "KVM_SEV_ES_INIT": 1, "KVM_SEV_LAUNCH_START": 2,
    "KVM_SEV_LAUNCH_UPDATE_DATA": 3, "KVM_SEV_LAUNCH_UPDATE_VMSA": 4,
    "KVM_SEV_LAUNCH_SECRET": 5, "KVM_SEV_LAUNCH_MEASURE": 6, "KVM_SEV_LAUNCH_FINISH": 7,
    "KVM_SEV_GUEST_STATUS": 16, "KVM_SEV_DBG_DECRYPT": 17, "KVM_SEV_DBG_ENCRYPT": 18,
    "KVM_SEV_GET_ATTESTATION_REPORT": 20, "KVM_SEV_SEND_CANCEL": 21,
    "KVM_SEV_INIT2": 22, "KVM_SEV_SNP_LAUNCH_START": 100, "KVM_SEV_SNP_LAUNCH_UPDATE": 101,
    "KVM_SEV_SNP_LAUNCH_FINISH": 102, "KVM_SEV_SNP_ENABLE_REQ_CERTS": 103,
    # docs/facts.md#facts-8d (kvm_sev_snp_launch_update.type)
    "KVM_SEV_SNP_PAGE_TYPE_NORMAL": 1, "KVM_SEV_SNP_PAGE_TYPE_ZERO": 3,
    "KVM_SEV_SNP_PAGE_TYPE_UNMEASURED": 4, "KVM_SEV_SNP_PAGE_TYPE_SECRETS": 5,
    "KVM_SEV_SNP_PAGE_TYPE_CPUID": 6,
    # docs/facts.md#facts-8e
    "KVM_X86_DEFAULT_VM": 0, "KVM_X86_SW_PROTECTED_VM": 1, "KVM_X86_SEV_VM": 2,
    "KVM_X86_SEV_ES_VM": 3, "KVM_X86_SNP_VM": 4, "KVM_X86_TDX_VM": 5,
    "KVM_CAP_VM_TYPES": 235, "KVM_CAP_SYS_ATTRIBUTES": 209, "KVM_CAP_EXIT_HYPERCALL": 201,
    "KVM_CAP_VM_COPY_ENC_CONTEXT_FROM": 197, "KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM": 206,
    "KVM_CAP_USER_MEMORY2": 231, "KVM_CAP_MEMORY_FAULT_INFO": 232,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233, "KVM_CAP_GUEST_MEMFD": 234,
    # docs/facts.md#facts-8f
    "KVM_X86_GRP_SYSTEM": 0, "KVM_X86_XCOMP_GUEST_SUPP": 0, "KVM_X86_GRP_SEV": 1,
    "KVM_X86_SEV_VMSA_FEATURES": 0, "KVM_X86_SNP_POLICY_BITS": 1,
    "KVM_X86_SEV_SNP_REQ_CERTS": 2,
    # docs/facts.md#facts-5 (KVM_EXIT_SYSTEM_EVENT for SEV termination)
    "KVM_EXIT_SYSTEM_EVENT": 24, "KVM_SYSTEM_EVENT_SEV_TERM": 6,
    # docs/facts.md#facts-9b, #facts-9d
    "SEV_FACTORY_RESET": 0, "SEV_PLATFORM_STATUS": 1, "SEV_PEK_GEN": 2, "SEV_PEK_CSR": 3,
    "SEV_PDH_GEN": 4, "SEV_PDH_CERT_EXPORT": 5, "SEV_PEK_CERT_IMPORT": 6, "SEV_GET_ID": 7,
    "SEV_GET_ID2": 8, "SNP_PLATFORM_STATUS": 9, "SNP_COMMIT": 10, "SNP_SET_CONFIG": 11,
    "SNP_VLEK_LOAD": 12, "SEV_IOC_TYPE": 0x53,
    "SEV_STATUS_FLAGS_CONFIG_ES": 0x100,
    "SEV_STATE_UNINIT": 0, "SEV_STATE_INIT": 1, "SEV_STATE_WORKING": 2,
    # Not in the facts reference; current kernel UAPI headers.
    "KVM_SEV_PAGE_TYPE_INVALID": 0,
    "KVM_SEV_SNP_ID_BLOCK_SIZE": 96, "KVM_SEV_SNP_ID_AUTH_SIZE": 4096,
    "KVM_SEV_SNP_FINISH_DATA_SIZE": 32,
    "KVM_EXIT_LOONGARCH_IOCSR": 38, "KVM_EXIT_MEMORY_FAULT": 39, "KVM_EXIT_TDX": 40,
    "KVM_MEM_GUEST_MEMFD": 1 << 2, "KVM_MEMORY_EXIT_FLAG_PRIVATE": 1 << 3,
    "KVM_EXIT_HYPERCALL_LONG_MODE": 1 << 0,
    "KVM_CAP_PRE_FAULT_MEMORY": 236, "KVM_CAP_X86_APIC_BUS_CYCLES_NS": 237,
    "KVM_CAP_X86_GUEST_MODE": 238,
    "KVM_X86_QUIRK_FIX_HYPERCALL_INSN": 1 << 5, "KVM_X86_QUIRK_SLOT_ZAP_ALL": 1 << 7,
    "KVM_X86_QUIRK_STUFF_FEATURE_MSRS": 1 << 8, "KVM_X86_QUIRK_IGNORE_GUEST_PAT": 1 << 9,
    "KVM_MEMORY_ATTRIBUTE_PRIVATE": 1 << 3,
    # include/uapi/linux/kvm_para.h (not among the headers compiled above)
    "KVM_HC_MAP_GPA_RANGE": 12, "KVM_MAP_GPA_RANGE_PAGE_SZ_4K": 0,
    "KVM_MAP_GPA_RANGE_PAGE_SZ_2M": 1 << 0, "KVM_MAP_GPA_RANGE_PAGE_SZ_1G": 1 << 1,
    "KVM_MAP_GPA_RANGE_ENCRYPTED": 1 << 4, "KVM_MAP_GPA_RANGE_DECRYPTED": 0,
}

_PAD_NAME = re.compile(r"^(pad|rsvd|reserved)\w*$")


# ---------------------------------------------------------------------------
# Collecting the items from the cffi declarations


@dataclass
class Item:
    kind: str  # size | fsize | offset | bits | const | ioctl
    key: str  # human-readable name, also the key into the tables
    code: str  # one line of C printing "<id> <value>"
    value: int  # what cffi says
    ctype: str = ""  # outermost struct/union ("struct kvm_run")
    path: tuple = ()  # field path inside it
    size: int | None = None  # field size (offset items)
    id: int = field(default=0)


def _bits_of(ctype: str, path: tuple, width: int) -> int:
    """(first bit << 8) | width of a bitfield, measured by setting it in cffi."""
    p = ffi.new(ctype + " *")
    obj = p[0]
    for name in path[:-1]:
        obj = getattr(obj, name)
    setattr(obj, path[-1], (1 << width) - 1)
    v = int.from_bytes(bytes(ffi.buffer(p)), "little")
    return (((v & -v).bit_length() - 1) << 8) | bin(v).count("1")


def _walk(items: list[Item], top: str, ct, path: tuple) -> None:
    for name, f in ct.fields:
        p = path + (name,)
        dotted = ".".join(p)
        if f.bitsize >= 0:  # a bitfield: offsetof/sizeof are not allowed in C
            items.append(Item(
                "bits", f"bits({top}.{dotted})",
                f"{{ {top} v; memset(&v, 0, sizeof v); v.{dotted} = -1; "
                f"bits(@ID@, &v, sizeof v); }}",
                _bits_of(top, p, f.bitsize), top, p))
            continue
        flexible = f.type.kind == "array" and f.type.length is None
        size = None if flexible else ffi.sizeof(f.type)
        items.append(Item("offset", f"offsetof({top}, {dotted})",
                          f"P(@ID@, offsetof({top}, {dotted}));",
                          ffi.offsetof(top, *p), top, p, size))
        if not flexible:
            items.append(Item("fsize", f"sizeof({top}.{dotted})",
                              f"P(@ID@, sizeof((({top} *)0)->{dotted}));",
                              size, top, p))
        if f.type.kind in ("struct", "union"):
            _walk(items, top, f.type, p)


def collect_items() -> list[Item]:
    typedefs, structs, unions = ffi.list_types()
    items: list[Item] = []
    for name in typedefs:
        items.append(Item("size", f"sizeof({name})", f"P(@ID@, sizeof({name}));",
                          ffi.sizeof(name), name))
    for kw, names in (("struct", structs), ("union", unions)):
        for name in names:
            top = f"{kw} {name}"
            items.append(Item("size", f"sizeof({top})", f"P(@ID@, sizeof({top}));",
                              ffi.sizeof(top), top))
            _walk(items, top, ffi.typeof(top), ())
    for name, value in _ffi.CONSTANTS.items():
        items.append(Item("const", name, f"P(@ID@, {name});", value))
    for name in _ffi.IOCTLS:
        items.append(Item("ioctl", name, f"P(@ID@, {name});", getattr(_ffi, name)))
    for i, it in enumerate(items):
        it.id = i
        it.code = it.code.replace("@ID@", str(i))
    return items


# ---------------------------------------------------------------------------
# Compiling against the headers

_PRELUDE = """\
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <linux/kvm.h>
#include <asm/kvm.h>
#include <linux/psp-sev.h>
#define P(id, expr) printf("%d %lld\\n", (id), (long long)(expr))
static void bits(int id, const void *p, size_t n)
{
	const unsigned char *b = p;
	int first = -1, count = 0;
	for (size_t i = 0; i < n * 8; i++)
		if (b[i / 8] >> (i % 8) & 1) {
			if (first < 0)
				first = (int)i;
			count++;
		}
	printf("%d %lld\\n", id, ((long long)first << 8) | count);
}
int main(void)
{
"""


def _compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def _headers_missing(cc: str, tmp: Path) -> str | None:
    probe = tmp / "probe.c"
    probe.write_text("".join(f"#include <{h}>\n" for h in HEADERS) + "int main(void){return 0;}\n")
    r = subprocess.run([cc, "-fsyntax-only", str(probe)], capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr.strip().splitlines()[0] if r.stderr.strip() else "compile failed"
    return None


def run_against_headers(cc: str, items: list[Item], tmp: Path) -> tuple[dict[int, int], set[int]]:
    """Compile and run the probe; return ({item id: header value}, ids the headers lack)."""
    src, exe = tmp / "layout.c", tmp / "layout"
    active = [it for it in items]
    absent: set[int] = set()
    for _ in range(8):
        lines = _PRELUDE.splitlines()
        line_of: dict[int, int] = {}
        for it in active:
            lines.append("\t" + it.code)
            line_of[len(lines)] = it.id
        lines += ["\treturn 0;", "}", ""]
        src.write_text("\n".join(lines))
        r = subprocess.run([cc, "-w", "-fmax-errors=0", "-o", str(exe), str(src)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
        bad_lines = {int(m.group(1)) for m in
                     re.finditer(rf"^{re.escape(str(src))}:(\d+):\d+: error", r.stderr, re.M)}
        bad = {line_of[n] for n in bad_lines if n in line_of}
        if not bad:
            pytest.fail(f"probe program failed to compile outside any item:\n{r.stderr[-4000:]}")
        absent |= bad
        active = [it for it in active if it.id not in bad]
    else:
        pytest.fail("probe program still fails to compile after 8 rounds")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    header = {int(a): int(b) for a, b in (line.split() for line in out.splitlines())}
    return header, absent


def _table_value(it: Item):
    """The table's expected value for an item, or None if the tables lack it."""
    if it.kind in ("const",):
        return TABLE_CONSTANTS.get(it.key)
    if it.kind == "ioctl":
        return TABLE_IOCTLS.get(it.key)
    layout = TABLE_LAYOUTS.get(it.ctype)
    if layout is None:
        return None
    if it.kind == "size":
        return layout.get("")
    entry = layout.get(".".join(it.path))
    if entry is None:
        return None
    if it.kind == "bits":
        return (entry[1] << 8) | entry[2] if entry[0] == "bits" else None
    if entry[0] == "bits":
        return None
    return entry[0] if it.kind == "offset" else entry[1]


# ---------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler (gcc) to compile the kernel headers "
                    "(apt-get install gcc)")
    tmp = tmp_path_factory.mktemp("cdefs_layout")
    missing = _headers_missing(cc, tmp)
    if missing:
        pytest.skip(f"kernel UAPI headers {', '.join(HEADERS)} not usable "
                    f"(apt-get install linux-libc-dev): {missing}")
    items = collect_items()
    header, absent = run_against_headers(cc, items, tmp)
    return items, header, absent


def test_every_declaration_matches_kernel_headers(layout_run):
    items, header, absent = layout_run
    by_key = {(it.kind, it.key): it for it in items}
    failures: list[str] = []
    notes: list[str] = []
    counts = {k: {"header": 0, "table": 0, "hole": 0} for k in
              ("size", "fsize", "offset", "bits", "const", "ioctl")}

    for it in items:
        table = _table_value(it)
        # 1. Every table number must agree with cffi, header or no header.
        if table is not None and table != it.value:
            failures.append(f"{it.key}: cdefs {it.value:#x}, table {table:#x}")
        # 2. Against the installed headers.
        if it.id in header:
            h = header[it.id]
            if it.kind == "const" and it.key in SEV_RET_FACTS and it.value > _SEV_RET_HEADER_TRUSTED_MAX:
                if h != it.value:
                    notes.append(f"{it.key}: installed header says {h:#x}, docs/facts.md says "
                                 f"{it.value:#x} (a kernel release with wrong SEV_RET values)")
                counts[it.kind]["table"] += 1
                continue
            if h != it.value:
                failures.append(f"{it.key}: cdefs {it.value:#x}, kernel header {h:#x}")
            counts[it.kind]["header"] += 1
            continue
        # 3. Absent from the installed headers.
        if table is not None:
            counts[it.kind]["table"] += 1
            continue
        if it.kind == "offset" and _PAD_NAME.match(it.path[-1]) and it.size is not None:
            why = _check_pad_in_hole(it, items, header, by_key)
            if why:
                failures.append(f"{it.key}: {why}")
            else:
                counts["offset"]["hole"] += 1
            continue
        if it.kind == "fsize" and _PAD_NAME.match(it.path[-1]):
            # Its offset item checked it lies in a hole of the old layout.
            counts["fsize"]["hole"] += 1
            continue
        failures.append(f"{it.key}: not in the installed headers and in no table "
                        f"(cdefs value {it.value:#x})")

    # Stale table entries (a table key no cdefs item uses) are errors too.
    used = {(it.kind, it.key) for it in items}
    for name in TABLE_CONSTANTS:
        if ("const", name) not in used:
            failures.append(f"table constant {name} is not declared in cdefs/")
    for name in TABLE_IOCTLS:
        if ("ioctl", name) not in used:
            failures.append(f"table ioctl {name} is not defined in _ffi")
    for ctype, layout in TABLE_LAYOUTS.items():
        for path, entry in layout.items():
            kind = "size" if path == "" else ("bits" if entry[0] == "bits" else "offset")
            key = (f"sizeof({ctype})" if kind == "size" else
                   f"bits({ctype}.{path})" if kind == "bits" else f"offsetof({ctype}, {path})")
            if (kind, key) not in by_key:
                failures.append(f"table entry {key} is not declared in cdefs/")

    def total(kind):
        c = counts[kind]
        return c["header"] + c["table"] + c["hole"]

    summary = (
        f"cdefs layout check: {total('size')} type sizes + {total('fsize')} field sizes, "
        f"{total('offset')} field offsets + {total('bits')} bitfield positions, "
        f"{total('const')} constants, {total('ioctl')} ioctl numbers "
        f"({sum(c['header'] for c in counts.values())} against the installed headers, "
        f"{sum(c['table'] for c in counts.values())} against the tables of newer items, "
        f"{sum(c['hole'] for c in counts.values())} padding fields in holes of the old layout; "
        f"{len(absent)} items absent from the installed headers)"
    )
    print("\n" + summary)
    for n in notes:
        print("NOTE:", n)
    assert not failures, summary + "\n" + "\n".join(failures)
    # Sanity: the check really ran against the headers.
    assert sum(c["header"] for c in counts.values()) > 500, summary


def _check_pad_in_hole(it: Item, items, header, by_key) -> str | None:
    """A padding field absent from the header must sit in a hole of its layout."""
    parent = it.path[:-1]
    if parent:
        pkey = f"{it.ctype}, {'.'.join(parent)}"
        poff = by_key.get(("offset", f"offsetof({pkey})"))
        psize = by_key.get(("fsize", f"sizeof({it.ctype}.{'.'.join(parent)})"))
        if poff is None or psize is None or poff.id not in header or psize.id not in header:
            return "its enclosing field is not in the installed headers"
        start, end = header[poff.id], header[poff.id] + header[psize.id]
    else:
        sz = by_key.get(("size", f"sizeof({it.ctype})"))
        if sz is None or sz.id not in header:
            return "its struct is not in the installed headers"
        start, end = 0, header[sz.id]
    lo, hi = it.value, it.value + it.size
    if lo < start or hi > end:
        return f"bytes {lo}..{hi} fall outside the header's {it.ctype} ({start}..{end})"
    for other in items:
        if other.kind != "offset" or other.ctype != it.ctype or other.path[:-1] != parent:
            continue
        if other is it or other.id not in header:
            continue
        fs = by_key.get(("fsize", f"sizeof({it.ctype}.{'.'.join(other.path)})"))
        if fs is None or fs.id not in header:
            continue
        o_lo, o_hi = header[other.id], header[other.id] + header[fs.id]
        if lo < o_hi and o_lo < hi:
            return f"bytes {lo}..{hi} overlap header field {'.'.join(other.path)} ({o_lo}..{o_hi})"
    return None


def test_exit_constants_of_exits_module_match_cdefs():
    """kvmharness.exits repeats some KVM_* numbers; they must equal the cdefs'."""
    from kvmharness import exits

    names = [n for n, v in vars(exits).items() if n.startswith("KVM_") and isinstance(v, int)]
    assert names, "kvmharness.exits defines no KVM_* constants"
    wrong = {n: (getattr(exits, n), _ffi.CONSTANTS.get(n)) for n in names
             if getattr(exits, n) != _ffi.CONSTANTS.get(n)}
    assert not wrong, f"exits.py vs cdefs (exits, cdefs): {wrong}"


def test_ioctl_names_are_unique_and_complete():
    assert len(_ffi.IOCTL_NAMES) == len(_ffi.IOCTLS), "two ioctls share a number"
    for name in ("KVM_RUN", "KVM_CREATE_VM", "KVM_MEMORY_ENCRYPT_OP", "SEV_ISSUE_CMD",
                 "KVM_GET_NESTED_STATE", "KVM_GET_STATS_FD", "KVM_X86_SET_MSR_FILTER"):
        assert _ffi.IOCTL_NAMES[getattr(_ffi, name)] == name


def test_bad_fd_raises_kvmerror_with_ebadf():
    with pytest.raises(KvmError) as info:
        _ffi.ioctl(-1, _ffi.KVM_GET_API_VERSION)
    assert info.value.errno == errno.EBADF
    assert info.value.ioctl == "KVM_GET_API_VERSION"
    assert "KVM_GET_API_VERSION" in str(info.value) and "EBADF" in str(info.value)
    assert _ffi.ioctl_raw(-1, _ffi.KVM_RUN) == (-1, errno.EBADF)


def test_non_kvm_fd_gives_enotty_and_unknown_request_is_named_in_hex():
    r, w = os.pipe()
    try:
        # An integer argument is passed by value (as for KVM_CHECK_EXTENSION).
        with pytest.raises(KvmError) as info:
            _ffi.ioctl(r, _ffi.KVM_CHECK_EXTENSION, _ffi.KVM_CAP_VM_TYPES)
        assert info.value.errno == errno.ENOTTY
        assert info.value.ioctl == "KVM_CHECK_EXTENSION"
        with pytest.raises(KvmError) as info:
            _ffi.ioctl(r, 0xAEFF, ffi.NULL)
        assert info.value.ioctl == "0xaeff"
        # ioctl_raw reports success with errno 0 (FIONREAD on a pipe).
        n = ffi.new("int *")
        assert _ffi.ioctl_raw(r, 0x541B, n) == (0, 0)  # FIONREAD
    finally:
        os.close(r)
        os.close(w)


_NO_COMPILE_PROBE = r"""
import sys
def hook(event, args):
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "os.fork", "os.forkpty"):
        raise RuntimeError(f"importing _ffi tried to run a program: {event} {args!r:.200}")
    if event == "open" and isinstance(args[0], str) and args[0].startswith("/usr/include"):
        raise RuntimeError(f"importing _ffi read a header: {args[0]}")
sys.addaudithook(hook)
import kvmharness.kvm._ffi as f
assert f.ffi.sizeof("struct kvm_run") == 2352
assert f.KVM_RUN == 0xAE80 and f.SEV_ISSUE_CMD == 0xC0105300
print("ok")
"""


def test_import_needs_no_compiler_and_no_headers():
    import kvmharness

    root = str(Path(kvmharness.__file__).resolve().parents[1])
    env = {"CC": "/nonexistent", "PATH": "/nonexistent", "CPATH": "/nonexistent",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "HOME": os.environ.get("HOME", "/nonexistent")}
    r = subprocess.run([sys.executable, "-c", _NO_COMPILE_PROBE], env=env, cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
