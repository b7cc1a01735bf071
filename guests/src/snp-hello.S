/*
 * snp-hello: an SEV-SNP guest end to end.
 *
 * SNP_START validates the stack page (PVALIDATE) before any memory access;
 * snp_init (snp.h) validates the pages it uses, turns the GHCB page shared
 * with a GHCB MSR page-state change (0x014), registers it (0x012) and sets up
 * the SEV-ES runtime (page tables with the C-bit, IDT, #VC handler).  Then:
 *
 *   SEV_STATUS (MSR 0xC0010131, answered by the CPU)             key ...01
 *   the secrets page the firmware filled: version, FMS,            keys ...02, ...03
 *     the first 8 bytes of VMPCK0, whether VMPCK0-3 are non-zero   keys ...04, ...05
 *   the CPUID page: entry count, EAX of leaf 0x8000001F          keys ...06, ...07
 *   CPUID 0x8000001F through #VC and the GHCB page                key ...08
 *   page 0x17000: a private write read back                       key ...09
 *     rescinded (PVALIDATE RDX=0: RAX | CF << 8)                   key ...0a
 *     made shared with the PSC NAE event (0x80000010):
 *       SW_EXIT_INFO_2 and the descriptor's cur_entry after        keys ...0b, ...0c
 *     mapped C=0 and "snp-hello shared" written there (the host reads it)
 *   page 0x18000: shared then private with the MSR protocol
 *     (each response's high half, 0 = done)                        keys ...0d, ...0e
 *     validated (RAX | CF << 8), a private write read back         keys ...0f, ...10
 * then DONE.  Keys are 0x736e700000000000 ("snp") | n.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

#define KEY(n)          (0x736e700000000000 | (n))
#define PAGE_B          0x18000
#define PATTERN         0x5A17C0DE5EC12E75

GUEST_ENTRY
        SNP_START
        call    snp_init

        mov     $MSR_SEV_STATUS, %ecx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        ES_REPORT($KEY(1), %rax)

        /* the secrets page */
        mov     SNP_SECRETS_GPA, %eax
        ES_REPORT($KEY(2), %rax)
        mov     SNP_SECRETS_GPA + 8, %eax
        ES_REPORT($KEY(3), %rax)
        mov     SNP_SECRETS_GPA + 0x20, %rax
        ES_REPORT($KEY(4), %rax)
        mov     $SNP_SECRETS_GPA + 0x20, %esi
        xor     %edx, %edx
        mov     $16, %ecx
1:      or      (%rsi), %rdx
        add     $8, %rsi
        dec     %ecx
        jnz     1b
        xor     %eax, %eax
        test    %rdx, %rdx
        setnz   %al
        ES_REPORT($KEY(5), %rax)

        /* the CPUID page: count, then the entry of leaf 0x8000001F */
        mov     SNP_CPUID_GPA, %eax
        ES_REPORT($KEY(6), %rax)
        mov     SNP_CPUID_GPA, %ecx
        mov     $SNP_CPUID_GPA + 16, %esi
        xor     %r8d, %r8d
2:      test    %ecx, %ecx
        jz      3f
        cmpl    $0x8000001F, (%rsi)
        jne     4f
        mov     0x18(%rsi), %r8d
        jmp     3f
4:      add     $48, %rsi
        dec     %ecx
        jmp     2b
3:      ES_REPORT($KEY(7), %r8)

        /* CPUID through the GHCB */
        mov     $0x8000001F, %eax
        xor     %ecx, %ecx
        cpuid
        ES_REPORT($KEY(8), %rax)

        /* page 0x17000: private, then shared through the GHCB page */
        movabs  $PATTERN, %rax
        mov     %rax, SNP_DATA_GPA
        mov     SNP_DATA_GPA, %rax
        ES_REPORT($KEY(9), %rax)
        SNP_PVALIDATE(SNP_DATA_GPA, 0)
        setc    %cl
        movzbl  %cl, %ecx
        shl     $8, %ecx
        or      %rcx, %rax
        ES_REPORT($KEY(0xA), %rax)
        SNP_PSC_GHCB(psc_desc)
        ES_REPORT($KEY(0xB), %rax)
        movzwl  psc_desc(%rip), %eax
        ES_REPORT($KEY(0xC), %rax)
        mov     es_cbit(%rip), %rcx
        btr     %rcx, ES_PT0 + 8 * (SNP_DATA_GPA >> 12)
        mov     %cr3, %rax
        mov     %rax, %cr3
        lea     shared_text(%rip), %rsi
        mov     $SNP_DATA_GPA, %edi
        mov     $16, %ecx
        cld
        rep movsb

        /* page 0x18000: shared, then private again and validated */
        mov     $(PAGE_B >> 12), %r8d
        snp_psc_msr %r8, SNP_PSC_OP_SHARED
        ES_REPORT($KEY(0xD), %rdx)
        snp_psc_msr %r8, SNP_PSC_OP_PRIVATE
        ES_REPORT($KEY(0xE), %rdx)
        SNP_PVALIDATE(PAGE_B, 1)
        setc    %cl
        movzbl  %cl, %ecx
        shl     $8, %ecx
        or      %rcx, %rax
        ES_REPORT($KEY(0xF), %rax)
        movabs  $PATTERN, %rax
        not     %rax
        mov     %rax, PAGE_B
        mov     PAGE_B, %rax
        ES_REPORT($KEY(0x10), %rax)
        ES_DONE

snp_on_vc:
        ES_FAIL(0x404)

        .section .data
        .balign 8
psc_desc:       /* header: cur_entry 0, end_entry 0; one entry: GFN 0x17 -> shared */
        .short  0, 0
        .long   0
        .quad   (SNP_PSC_OP_SHARED << 52) | ((SNP_DATA_GPA >> 12) << 12)
psc_desc_end:
        .section .rodata
shared_text:    .ascii "snp-hello shared"
