/*
 * cpuid: executes CPUID at CPL0 for each (function, index) in the table
 * below and REPORTs all four registers, so the host can check that the guest
 * sees exactly the table it set with KVM_SET_CPUID2 (including leaf 0x8000001F,
 * which tests/test_guests.py overrides to see an override reach the guest).
 *
 * Report key = (function << 32) | (index << 8) | reg, reg 0..3 = EAX, EBX,
 * ECX, EDX.  CPUID at CPL0 is intercepted on every backend; at CPL3 it is
 * not on these machines, which is why this guest stays at CPL0.
 */
#define GUEST_MODE_LONG64
#include "guest.h"

/* One table entry: function, index (both 32-bit). */
#define LEAF(function, index)  .long (function), (index)

GUEST_ENTRY
        lea     leaves(%rip), %rsi
        lea     leaves_end(%rip), %rdi
next_leaf:
        cmp     %rdi, %rsi
        je      all_done
        mov     0(%rsi), %eax           /* function */
        mov     4(%rsi), %ecx           /* index (subleaf) */
        cpuid                           /* -> EAX, EBX, ECX, EDX */

        /* Keep the four results out of the ucall registers (AL, RBX, RCX). */
        mov     %eax, %r8d
        mov     %ebx, %r9d
        mov     %ecx, %r10d
        mov     %edx, %r11d

        /* Key base in R12: (function << 32) | (index << 8). */
        mov     0(%rsi), %r12d
        shl     $32, %r12
        mov     4(%rsi), %eax
        shl     $8, %rax
        or      %rax, %r12

        REPORT(%r12, %r8)               /* reg 0: EAX */
        inc     %r12
        REPORT(%r12, %r9)               /* reg 1: EBX */
        inc     %r12
        REPORT(%r12, %r10)              /* reg 2: ECX */
        inc     %r12
        REPORT(%r12, %r11)              /* reg 3: EDX */

        add     $8, %rsi
        jmp     next_leaf
all_done:
        DONE

        .section .rodata
        .balign 8
leaves:
        LEAF(0x00000000, 0)     /* max basic leaf, vendor */
        LEAF(0x00000001, 0)     /* family/model, features (ECX/EDX partly forced by KVM) */
        LEAF(0x00000007, 0)     /* structured extended features, subleaf 0 */
        LEAF(0x80000000, 0)     /* max extended leaf, vendor */
        LEAF(0x80000001, 0)     /* extended features (SVM bit is ECX[2]) */
        LEAF(0x80000008, 0)     /* address sizes */
        LEAF(0x8000000A, 0)     /* SVM revision, ASIDs, SVM features */
        LEAF(0x8000001F, 0)     /* SEV: C-bit, phys reduction, guests, min SEV ASID */
        LEAF(0x40000000, 0)     /* hypervisor vendor ("KVMKVMKVM") */
leaves_end:
