/*
 * snp-lab-counter: lab-counter.S as an SEV-SNP guest (kvmharness lab ciphertext --mode sev-snp).
 *
 * SNP_START and snp_init (snp.h: PVALIDATE of the guest's memory, the GHCB page shared
 * and registered, the SEV-ES runtime), then lab-counter.S: R12 counts 0..15, then walks
 * the nibbles of a secret, one GHCB REPORT per value.  Under SNP the registers live in
 * the VMSA, a guest-owned page in the RMP: the host cannot write it, but (without
 * ciphertext hiding) it can still read its ciphertext.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"
#define LAB_SEV_ES

GUEST_ENTRY
        SNP_LAB_START

#include "lab-counter.S"
