/*
 * sev-hello: a plain SEV guest (issue 4 item 5).
 *
 * Long mode at CPL0 on the harness's boot tables (which already carry the
 * C-bit).  The guest:
 *   1. reads CPUID 0x8000001F: EAX bit 1 (SEV) must be set; the C-bit
 *      position is EBX[5:0]                                  -> key 1
 *   2. reads SEV_STATUS (MSR 0xC0010131), bit 0 must be set  -> key 2
 *   3. builds a 4 KiB page table for the first 2 MiB at SEV_PT: every page
 *      private (C=1) except SHARED_PAGE (C=0), hooks it into PD0[0], reloads CR3
 *   4. writes a 16-byte secret to PRIVATE_PAGE and a 16-byte message to
 *      SHARED_PAGE, reports key 5 = 1 (an exit: the host looks at both pages)
 *   5. reads the secret back and reports it (keys 3, 4); FAIL unless equal.
 * Then DONE.  The host should find ciphertext at PRIVATE_PAGE and the
 * plaintext message at SHARED_PAGE (tests/test_sim_sev.py).  Under SEV (not
 * SEV-ES) registers are not encrypted, so the plain OUT ucalls work.
 */
#define GUEST_MODE_LONG64
#include "guest.h"

#define SEV_PT          0x10000
#define SHARED_PAGE     0x16000
#define PRIVATE_PAGE    0x17000
#define MSR_SEV_STATUS  0xC0010131
#define SECRET0         0x2D7665732D706F74      /* "top-sev-" */
#define SECRET1         0x2174657263657321      /* "!secret!" */
#define SHARED0         0x6F6C6C65682D7665      /* "ev-hello" */
#define SHARED1         0x0A64657261687320      /* " shared\n" */

GUEST_ENTRY
        mov     $0x8000001F, %eax
        xor     %ecx, %ecx
        cpuid
        bt      $1, %eax
        jc      1f
        FAIL(1)
1:      and     $0x3F, %ebx
        mov     %rbx, %r12              /* the C-bit position */
        REPORT($1, %r12)
        mov     $MSR_SEV_STATUS, %ecx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %r13
        REPORT($2, %r13)
        bt      $0, %r13
        jc      2f
        FAIL(2)

2:      mov     %r12, %rcx
        mov     $1, %r8d
        shl     %cl, %r8                /* R8 = the C-bit mask */
        xor     %esi, %esi
3:      mov     %rsi, %rax
        shl     $12, %rax
        or      $0x3, %rax              /* P | RW */
        cmp     $(SHARED_PAGE >> 12), %esi
        je      4f
        or      %r8, %rax
4:      mov     %rax, SEV_PT(,%rsi,8)
        inc     %esi
        cmp     $512, %esi
        jne     3b
        mov     $(SEV_PT | 0x3), %eax
        or      %r8, %rax
        mov     %rax, BOOT_PD0          /* PD0[0]: the 4 KiB table instead of a 2 MiB page */
        mov     %cr3, %rax
        mov     %rax, %cr3

        movabs  $SECRET0, %rax
        mov     %rax, PRIVATE_PAGE
        movabs  $SECRET1, %rax
        mov     %rax, PRIVATE_PAGE + 8
        movabs  $SHARED0, %rax
        mov     %rax, SHARED_PAGE
        movabs  $SHARED1, %rax
        mov     %rax, SHARED_PAGE + 8
        REPORT($5, $1)

        mov     PRIVATE_PAGE, %r14
        mov     PRIVATE_PAGE + 8, %r15
        REPORT($3, %r14)
        REPORT($4, %r15)
        movabs  $SECRET0, %rax
        EXPECT_EQ(%rax, %r14, 3)
        movabs  $SECRET1, %rax
        EXPECT_EQ(%rax, %r15, 4)
        DONE
