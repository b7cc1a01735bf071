/*
 * lab-service: a guest "service" that copies a reply page out through a shared
 * buffer (kvmharness lab memview and lab remap).
 *
 * Memory (guest-physical):
 *   0x18000-0x1BFFF  the guest's own page tables: GiB 0 mapped private (C-bit
 *                    set) except SHARED_BUF and, under SEV-ES, the GHCB page
 *   0x20000          REPLY_PAGE: the public page the service sends (private memory)
 *   0x21000          SECRET_PAGE: a page the service never sends (private memory)
 *   0x22000          never written (what the host sees: zeros)
 *   0x40000          SHARED_BUF: shared memory, the service's "network buffer"
 * The C-bit position is taken from the boot page tables the launch measured
 * (BOOT_PML4 entry 0 carries it under SEV and SEV-ES; zero without SEV), not
 * from CPUID, which the hypervisor answers.
 *
 * Service loop: for request 0, 1, 2: copy REPLY_PAGE (4 KiB, through the
 * private mapping) into SHARED_BUF, then announce it with REPORT(0x5E0,
 * request): an OUT, i.e. an exit the hypervisor sees.  Then DONE.
 * lab-service-es.S is this guest for SEV-ES (ucalls through the GHCB).
 */
#ifndef LAB_SEV_ES
#define GUEST_MODE_LONG64
#include "guest.h"
#define LAB_REPORT(key, value)  REPORT(key, value)
#define LAB_DONE                DONE
GUEST_ENTRY
#else
#define LAB_REPORT(key, value)  ES_REPORT(key, value)
#define LAB_DONE                ES_DONE
#endif

#define LAB_PML4     0x18000
#define LAB_PDPT     0x19000
#define LAB_PD       0x1A000
#define LAB_PT       0x1B000
#define REPLY_PAGE   0x20000
#define SECRET_PAGE  0x21000
#define SHARED_BUF   0x40000
#define GHCB_PAGE    0x15000
#define KEY_REPLY    0x5E0
#define REQUESTS     3

lab_main:
        /* R15 = the C-bit mask the launch used (bits 40-62 of the boot PML4[0]) */
        mov     BOOT_PML4, %rax
        movabs  $0x7FFFFF0000000000, %rdx
        and     %rdx, %rax
        mov     %rax, %r15

        /* zero the four table pages */
        cld
        mov     $LAB_PML4, %edi
        mov     $(4 * 512), %ecx
        xor     %eax, %eax
        rep stosq
        /* PT: the first 2 MiB in 4 KiB pages, private but for the shared ones */
        xor     %ecx, %ecx
1:      mov     %rcx, %rax
        shl     $12, %rax
        or      $3, %rax
        cmp     $(SHARED_BUF >> 12), %ecx
        je      2f
        cmp     $(GHCB_PAGE >> 12), %ecx
        je      2f
        or      %r15, %rax
2:      mov     %rax, LAB_PT(,%rcx,8)
        inc     %ecx
        cmp     $512, %ecx
        jne     1b
        /* PD: entry 0 -> PT, entries 1..511 -> 2 MiB private pages */
        mov     $(LAB_PT | 3), %eax
        or      %r15, %rax
        mov     %rax, LAB_PD
        mov     $1, %ecx
3:      mov     %rcx, %rax
        shl     $21, %rax
        or      $0x83, %rax
        or      %r15, %rax
        mov     %rax, LAB_PD(,%rcx,8)
        inc     %ecx
        cmp     $512, %ecx
        jne     3b
        mov     $(LAB_PD | 3), %eax
        or      %r15, %rax
        mov     %rax, LAB_PDPT
        mov     $(BOOT_PD3 | 3), %eax   /* GiB 3 (the MMIO window): the boot tables' */
        or      %r15, %rax
        mov     %rax, LAB_PDPT + 3 * 8
        mov     $(LAB_PDPT | 3), %eax
        or      %r15, %rax
        mov     %rax, LAB_PML4
        mov     $LAB_PML4, %eax
        mov     %rax, %cr3

        /* the pages' contents: 64 copies of a 64-byte line each */
        mov     $REPLY_PAGE, %edi
        lea     reply_line(%rip), %rbx
        call    fill_page
        mov     $SECRET_PAGE, %edi
        lea     secret_line(%rip), %rbx
        call    fill_page
        mov     $SHARED_BUF, %edi
        mov     $512, %ecx
        xor     %eax, %eax
        rep stosq

        /* the service: copy the reply page out, announce it */
        xor     %r13d, %r13d
serve:
        mov     $REPLY_PAGE, %esi
        mov     $SHARED_BUF, %edi
        mov     $512, %ecx
        rep movsq
        LAB_REPORT($KEY_REPLY, %r13)
        inc     %r13
        cmp     $REQUESTS, %r13
        jne     serve
        LAB_DONE

/* fill_page: RDI = page, RBX = a 64-byte line; clobbers RSI, RCX, RDX */
fill_page:
        mov     $64, %edx
1:      mov     %rbx, %rsi
        mov     $64, %ecx
        rep movsb
        dec     %edx
        jnz     1b
        ret

        .section .rodata
reply_line:
        .ascii  "GUEST SERVICE v1: public status page. All systems nominal.     \n"
secret_line:
        .ascii  "TOP-SECRET guest key: 6a09e667f3bcc908b2fb1366ea957d3e3adec1759\n"
        .text
