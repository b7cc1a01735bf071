/*
 * es-cpuid-ghcb: SEV-ES CPUID through the full GHCB page.
 *
 * es_init negotiates the GHCB protocol version with the SEV information
 * request (MSR protocol 0x002) and maps its GHCB page shared; it does not
 * send the GHCB GPA registration request (SNP-only: KVM terminates a
 * non-SEV-SNP guest that sends it).  Each CPUID raises #VC; the handler
 * writes RAX (function) and RCX (index) into the GHCB, marks them and
 * SW_EXIT_CODE 0x72 / SW_EXIT_INFO_1 / SW_EXIT_INFO_2 valid, sets the
 * negotiated protocol_version, points the GHCB MSR at the page and executes
 * VMGEXIT (F3 0F 01 D9); it checks SW_EXIT_INFO_1 = 0 and that RAX..RDX came
 * back valid.  Reports every register with cpuid.S's keys
 * ((function << 32) | (index << 8) | reg), then the negotiated version
 * (key 0x6863620000000000, "hcb" << 40), then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#define ES_VC_CPUID es_cpuid_ghcb
#include "sev_es.h"

#define LEAF(function, index)  .long (function), (index)
#define KEY_VERSION 0x6863620000000000

GUEST_ENTRY
        call    es_init
        lea     leaves(%rip), %rsi
        lea     leaves_end(%rip), %rdi
next_leaf:
        cmp     %rdi, %rsi
        je      all_done
        mov     0(%rsi), %eax
        mov     4(%rsi), %ecx
        cpuid                           /* #VC -> es_cpuid_ghcb */
        mov     %eax, %r8d
        mov     %ebx, %r9d
        mov     %ecx, %r10d
        mov     %edx, %r11d
        mov     0(%rsi), %r12d
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
        mov     es_version(%rip), %r8
        movabs  $KEY_VERSION, %r12
        ES_REPORT(%r12, %r8)
        ES_DONE

        .section .rodata
        .balign 8
leaves:
        LEAF(0x00000000, 0)
        LEAF(0x00000001, 0)
        LEAF(0x00000007, 0)
        LEAF(0x80000000, 0)
        LEAF(0x80000001, 0)
        LEAF(0x80000008, 0)
        LEAF(0x8000000A, 0)
        LEAF(0x8000001F, 0)
        LEAF(0x40000000, 0)
leaves_end:
