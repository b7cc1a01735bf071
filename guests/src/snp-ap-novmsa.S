/*
 * snp-ap-novmsa: snp-ap whose RMPADJUST leaves the VMSA bit clear (RDX = target VMPL 1,
 * read permission only), so the page it names in AP_CREATE is not a VMSA: KVM accepts
 * the request (sev_snp_ap_creation checks the GPA, not the RMP) and the AP's VMRUN fails
 * its VMSA check (VMEXIT_INVALID, KVM_EXIT_FAIL_ENTRY): the AP never runs and the BSP
 * reports its flag 0.
 */
#define GUEST_MODE_LONG64
#define SNP_AP_VMSA_ATTRS 0x00101   /* target VMPL 1 | read; no VMSA bit */
#include "guest.h"
#include "snp.h"

GUEST_ENTRY
#include "snp_ap.h"
