/*
 * snp-bad-psc: page-state changes the hypervisor must refuse (negative guest).
 * Each result is reported (keys 0x736e700000000300 | n):
 *   1 NAE 0x80000010, end_entry 300 (beyond the 253 entries the GHCB buffer
 *     holds): SW_EXIT_INFO_2 = 0x100000001 (PSC_ERROR_INVALID_HDR)
 *   2 NAE 0x80000010, a 2 MiB entry at GFN 0x19 (not 2 MiB aligned):
 *     0x100000002 (PSC_ERROR_INVALID_ENTRY)
 *   3 its cur_entry afterwards (0: nothing done)
 *   4 GHCB MSR protocol 0x014 with operation 3 (neither private nor shared):
 *     the response's high half, 0x80000000 (bit 63: error)
 *   5 the response's low half: 0x015
 * then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

#define KEY(n)          (0x736e700000000300 | (n))

GUEST_ENTRY
        SNP_START
        call    snp_init
        SNP_PSC_GHCB(bad_hdr)
        ES_REPORT($KEY(1), %rax)
        SNP_PSC_GHCB(bad_entry)
        ES_REPORT($KEY(2), %rax)
        movzwl  bad_entry(%rip), %eax
        ES_REPORT($KEY(3), %rax)
        mov     $0x19, %r8d
        snp_psc_msr %r8, 3
        mov     %rax, %r9
        ES_REPORT($KEY(4), %rdx)
        and     $0xFFF, %r9d
        ES_REPORT($KEY(5), %r9)
        ES_DONE

snp_on_vc:
        ES_FAIL(0x404)

        .section .data
        .balign 8
bad_hdr:        /* cur_entry 0, end_entry 300 */
        .short  0, 300
        .long   0
        .quad   (SNP_PSC_OP_SHARED << 52) | (0x19 << 12)
bad_hdr_end:
bad_entry:      /* cur_entry 0, end_entry 0; a 2 MiB entry at an unaligned GFN */
        .short  0, 0
        .long   0
        .quad   (1 << 56) | (SNP_PSC_OP_SHARED << 52) | (0x19 << 12)
bad_entry_end:
