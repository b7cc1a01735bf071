/*
 * snp-ap: an SEV-SNP guest with two vCPUs whose AP the guest itself starts (GHCB NAE
 * 0x80000013, AP creation), as a Linux SNP guest does (sev.c wakeup_cpu_via_vmgexit).
 *
 * The BSP (SNP_START, snp_init as snp-hello):
 *   PVALIDATEs a page for the AP's VMSA (AP_VMSA) and one for its stack (AP_STACK),
 *   makes the AP's GHCB page (AP_GHCB) shared with a GHCB MSR page-state change and
 *   maps it C=0, clears the flag at AP_FLAG, builds the AP's VMSA in AP_VMSA: 64-bit
 *   state copied from its own (segment selectors, GDTR, IDTR, CR0, CR3, CR4; EFER the
 *   harness's long64 entry value LME|LMA|SCE|NXE plus SVME), RIP = ap_entry, RSP the
 *   top of AP_STACK, RFLAGS 2, SEV_FEATURES = SEV_STATUS >> 2 (as Linux), XCR0 1;
 *   RMPADJUSTs AP_VMSA with RDX = SNP_AP_VMSA_ATTRS (VMSA bit 16, target VMPL 1,
 *   read permission)                                                         key ...01 (RAX)
 *   issues AP_CREATE (SW_EXITINFO1 = APIC ID 1 << 32 | 1, SW_EXITINFO2 = AP_VMSA,
 *   RAX = SEV_FEATURES) through its GHCB: SW_EXITINFO1, SW_EXITINFO2      keys ...02, ...03
 *   waits (at most SPIN_LIMIT loads) for the AP's flag                       key ...04
 *   (0x100 | the AP's APIC ID; 0 when the AP never ran), then DONE.
 * The AP (at ap_entry): CPUID 1 through the GHCB MSR protocol (0x004, EBX = register 1),
 *   registers its own GHCB page AP_GHCB (0x012), reports its APIC ID (CPUID 1 EBX[31:24])
 *   with a GHCB IOIO ucall through that page                                 key ...10
 *   sets the flag and HLTs.
 * Keys are 0x736e706100000000 ("snpa") | n.  The code is guests/include/snp_ap.h;
 * snp-ap-novmsa.S builds it with
 * SNP_AP_VMSA_ATTRS lacking the VMSA bit.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

GUEST_ENTRY
#include "snp_ap.h"
