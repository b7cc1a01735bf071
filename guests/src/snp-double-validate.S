/*
 * snp-double-validate: PVALIDATE's "no change" case (negative guest).
 *
 * Page 0x19000 was never validated (the launch did not measure it; it is
 * private, its guest_memfd page not yet assigned: the first PVALIDATE takes
 * KVM's #NPF, which assigns it, and is re-executed).  Reports RAX | CF << 8
 * of each PVALIDATE, keys 0x736e700000000100 | n:
 *   1 validate   -> 0      (done, Validated set)
 *   2 validate   -> 0x100  (RAX 0, CF 1: the bit already had that value)
 *   3 rescind    -> 0      (RDX = 0: Validated cleared)
 *   4 rescind    -> 0x100  (no change again)
 *   5 validate a 2 MiB page at 0x200000-aligned GPA 0 the RMP holds as 4 KiB
 *                -> 6      (FAIL_SIZEMISMATCH)
 * and of RMPADJUST on the same page (RDX = permissions << 8 | target VMPL):
 *   6 VMPL1 read+write               -> 0
 *   7 VMPL0 (not above the caller's) -> 2 (FAIL_PERMISSION)
 *   8 VMPL1 with reserved bit 5      -> 1 (FAIL_INPUT)
 * then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

#define KEY(n)          (0x736e700000000100 | (n))
#define PAGE            0x19000

/* RAX | CF << 8 into R9 */
#define RESULT \
        setc %cl ; movzbl %cl, %ecx ; shl $8, %ecx ; or %rax, %rcx ; mov %rcx, %r9

GUEST_ENTRY
        SNP_START
        call    snp_init
        SNP_PVALIDATE(PAGE, 1)
        RESULT
        ES_REPORT($KEY(1), %r9)
        SNP_PVALIDATE(PAGE, 1)
        RESULT
        ES_REPORT($KEY(2), %r9)
        SNP_PVALIDATE(PAGE, 0)
        RESULT
        ES_REPORT($KEY(3), %r9)
        SNP_PVALIDATE(PAGE, 0)
        RESULT
        ES_REPORT($KEY(4), %r9)
        xor     %eax, %eax
        mov     $1, %ecx                /* 2 MiB */
        mov     $1, %edx
        PVALIDATE
        RESULT
        ES_REPORT($KEY(5), %r9)
        mov     $PAGE, %eax
        xor     %ecx, %ecx
        mov     $((3 << 8) | 1), %edx
        RMPADJUST
        RESULT
        ES_REPORT($KEY(6), %r9)
        mov     $PAGE, %eax
        xor     %ecx, %ecx
        mov     $(1 << 8), %edx
        RMPADJUST
        RESULT
        ES_REPORT($KEY(7), %r9)
        mov     $PAGE, %eax
        xor     %ecx, %ecx
        mov     $((0x20 << 8) | 1), %edx
        RMPADJUST
        RESULT
        ES_REPORT($KEY(8), %r9)
        ES_DONE

snp_on_vc:
        ES_FAIL(0x404)
