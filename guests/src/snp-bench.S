/*
 * snp-bench: the cost of SEV-SNP's guest operations (PVALIDATE, page-state
 * changes) on whichever backend runs it.  After snp_init, three timed phases,
 * each ended by a report the host can timestamp (key 0x736e700000000500 | n,
 * value = the operations done):
 *   1  1000 PVALIDATEs: page 0x17000 rescinded and validated again, 500 times
 *   2  400 page-state changes through the GHCB MSR protocol: page 0x19000
 *      shared, then private, 200 times
 *   3  400 page-state changes through the PSC NAE event (0x80000010), the same
 * Every result is checked (RAX 0 / response 0) or the guest FAILs (code = phase).
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

#define KEY(n)          (0x736e700000000500 | (n))
#define PAGE            0x19000
#define ROUNDS          200

GUEST_ENTRY
        SNP_START
        call    snp_init
        ES_REPORT($KEY(0), $0)
        mov     $500, %r12d
1:      SNP_PVALIDATE(SNP_DATA_GPA, 0)
        test    %eax, %eax
        jz      2f
        ES_FAIL(1)
2:      SNP_PVALIDATE(SNP_DATA_GPA, 1)
        test    %eax, %eax
        jz      3f
        ES_FAIL(1)
3:      dec     %r12d
        jnz     1b
        ES_REPORT($KEY(1), $1000)

        mov     $ROUNDS, %r12d
        mov     $(PAGE >> 12), %r8d
4:      snp_psc_msr %r8, SNP_PSC_OP_SHARED
        test    %edx, %edx
        jz      5f
        ES_FAIL(2)
5:      snp_psc_msr %r8, SNP_PSC_OP_PRIVATE
        test    %edx, %edx
        jz      6f
        ES_FAIL(2)
6:      dec     %r12d
        jnz     4b
        ES_REPORT($KEY(2), $(2 * ROUNDS))

        mov     $ROUNDS, %r12d
7:      lea     to_shared(%rip), %rsi
        mov     $16, %ecx
        call    snp_psc_ghcb
        test    %rax, %rax
        jz      8f
        ES_FAIL(3)
8:      lea     to_private(%rip), %rsi
        mov     $16, %ecx
        call    snp_psc_ghcb
        test    %rax, %rax
        jz      9f
        ES_FAIL(3)
9:      movw    $0, to_shared(%rip)        /* cur_entry back to 0 for the next round */
        movw    $0, to_private(%rip)
        dec     %r12d
        jnz     7b
        ES_REPORT($KEY(3), $(2 * ROUNDS))
        ES_DONE

snp_on_vc:
        ES_FAIL(0x404)

        .section .data
        .balign 8
to_shared:
        .short  0, 0
        .long   0
        .quad   (SNP_PSC_OP_SHARED << 52) | ((PAGE >> 12) << 12)
to_private:
        .short  0, 0
        .long   0
        .quad   (SNP_PSC_OP_PRIVATE << 52) | ((PAGE >> 12) << 12)
