/*
 * snp-lab-service: lab-service.S as an SEV-SNP guest (kvmharness lab remap --mode sev-snp).
 *
 * Before the service runs: SNP_START and snp_init (snp.h: PVALIDATE, the GHCB page
 * shared and registered, the SEV-ES runtime), then PVALIDATE of the service's
 * page tables (0x18000-0x1BFFF), its reply page (0x20000) and secret page
 * (0x21000), and a page-state change of its shared buffer (0x40000) to shared
 * (GHCB MSR protocol).  Then lab-service.S's service loop, ucalls through the
 * GHCB.  Under SNP the RMP records for each validated page the GPA it was
 * validated at: a nested page table entry re-pointed from 0x20000 at the memory
 * of 0x21000 fails the RMP check (#NPF) instead of reading the secret.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"
#define LAB_SEV_ES

GUEST_ENTRY
        SNP_START
        call    snp_init
        mov     $0x18000, %esi
        mov     $0x1C000, %edi
        call    snp_validate_range
        mov     $0x20000, %esi
        mov     $0x22000, %edi
        call    snp_validate_range
        mov     $(0x40000 >> 12), %r8d
        snp_psc_msr %r8, SNP_PSC_OP_SHARED
        test    %edx, %edx
        jz      1f
        ES_FAIL(0x31)
1:      jmp     lab_main

snp_on_vc:
        ES_FAIL(0x404)

#include "lab-service.S"
