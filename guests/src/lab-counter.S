/*
 * lab-counter: a loop counter in R12 across exits (kvmharness lab ciphertext).
 *
 * Phase 1: R12 = 0, 1, ..., 15, one exit each (REPORT(0x71C, 0): nothing in
 * the ucall registers depends on R12).  Phase 2: R12 walks the nibbles of an
 * 8-byte secret (low nibble first), one exit each.  R13 stays 0, so the
 * 16-byte VMSA block holding R12 and R13 (VMSA offset 0x360) depends on R12
 * alone: with deterministic, address-tweaked encryption its ciphertext repeats
 * exactly when R12 does.  A hypervisor that knows phase 1's code maps each
 * ciphertext to a counter value, then reads phase 2's nibbles off the VMSA.
 *
 * Reports: 0x71C = 0 at every tick, then key 0x71D = the number of ticks
 * (32), then DONE.  lab-counter-es.S is this guest for SEV-ES.
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

#define KEY_TICK   0x71C
#define KEY_TICKS  0x71D

lab_main:
        xor     %r13d, %r13d
        xor     %r14d, %r14d            /* ticks */
        xor     %r12d, %r12d
phase1:
        LAB_REPORT($KEY_TICK, $0)
        inc     %r14
        inc     %r12
        cmp     $16, %r12
        jne     phase1
        xor     %r15d, %r15d            /* nibble index 0..15 */
phase2:
        mov     %r15, %rax
        shr     $1, %rax
        lea     secret(%rip), %rdx
        movzbl  (%rdx,%rax), %r12d
        test    $1, %r15b
        jz      1f
        shr     $4, %r12d
1:      and     $0xF, %r12d
        LAB_REPORT($KEY_TICK, $0)
        inc     %r14
        inc     %r15
        cmp     $16, %r15
        jne     phase2
        xor     %r12d, %r12d
        LAB_REPORT($KEY_TICKS, %r14)
        LAB_DONE

        .section .rodata
secret:
        .ascii  "K3Y!s3v!"
        .text
