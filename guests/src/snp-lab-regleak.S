/*
 * snp-lab-regleak: lab-regleak.S as an SEV-SNP guest (kvmharness lab regleak --mode sev-snp).
 *
 * SNP_START and snp_init (snp.h: PVALIDATE of the guest's memory, the GHCB page shared
 * and registered, the SEV-ES runtime), then lab-regleak.S: secrets in R12-R14, a CPUID
 * (#VC, answered through the GHCB), a REPORT through the GHCB, the secrets checked.
 * Under SNP the registers live in the VMSA, which the RMP marks as a VMSA page the
 * hypervisor cannot write; the host sees only what the guest copies into the GHCB.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"
#define LAB_SEV_ES

GUEST_ENTRY
        SNP_LAB_START

#include "lab-regleak.S"
