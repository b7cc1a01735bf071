/*
 * es-cpuid-msr: SEV-ES CPUID through the GHCB MSR protocol only.
 *
 * es_init negotiates the protocol (SEV information request) and maps the
 * GHCB page shared (for the ucalls).  Then, for each leaf of the table, a
 * CPUID instruction raises #VC (error code 0x72); the #VC handler answers it
 * with four MSR-protocol CPUID requests (0x004), one register each, checking
 * each response's code (0x005) and register echo.  Every register is
 * REPORTed with cpuid.S's key scheme: (function << 32) | (index << 8) | reg,
 * reg 0..3 = EAX, EBX, ECX, EDX.  The protocol has no subleaf (KVM uses
 * ECX = 0), so every leaf here is index 0.  Then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#define ES_VC_CPUID es_cpuid_msr
#include "sev_es.h"

#define LEAF(function)  .long (function), 0

GUEST_ENTRY
        call    es_init
        lea     leaves(%rip), %rsi
        lea     leaves_end(%rip), %rdi
next_leaf:
        cmp     %rdi, %rsi
        je      all_done
        mov     0(%rsi), %eax
        mov     4(%rsi), %ecx
        cpuid                           /* #VC -> es_cpuid_msr */
        mov     %eax, %r8d
        mov     %ebx, %r9d
        mov     %ecx, %r10d
        mov     %edx, %r11d
        mov     0(%rsi), %r12d          /* key base: function << 32 | index << 8 */
        shl     $32, %r12
        mov     4(%rsi), %eax
        shl     $8, %rax
        or      %rax, %r12
        ES_REPORT(%r12, %r8)
        inc     %r12
        ES_REPORT(%r12, %r9)
        inc     %r12
        ES_REPORT(%r12, %r10)
        inc     %r12
        ES_REPORT(%r12, %r11)
        add     $8, %rsi
        jmp     next_leaf
all_done:
        ES_DONE

        .section .rodata
        .balign 8
leaves:
        LEAF(0x00000000)
        LEAF(0x00000001)
        LEAF(0x00000007)
        LEAF(0x80000000)
        LEAF(0x80000001)
        LEAF(0x80000008)
        LEAF(0x8000000A)
        LEAF(0x8000001F)
        LEAF(0x40000000)
leaves_end:
