/*
 * lab-cpuid: what a guest believes of CPUID, and what it can check
 * (kvmharness lab lying-hv).
 *
 * The guest reads CPUID 0x8000001F (EAX: SEV feature bits, EBX[5:0]: the C-bit
 * position) and CPUID 0x80000001 (EDX bit 27: RDTSCP), all answered by the
 * hypervisor (under SEV-ES through the GHCB).  It *accepts* the feature leaf: it
 * picks its timestamp code path from EDX bit 27.  (Leaves 1 and 7 are not used:
 * some hosts' KVM forces bits there whatever the table says.)  It *checks* leaf 0x8000001F against a source the
 * hypervisor cannot change after launch: the boot page tables, whose C-bit the
 * guest owner's measurement covers (BOOT_PML4 entry 0; zero without SEV).
 * Under SEV-ES it also compares the C-bit of the GHCB MSR protocol's SEV
 * information response (a second hypervisor answer).
 *
 * Reports: 1 = CPUID 0x8000001F EAX, 2 = its EBX, 3 = CPUID 0x80000001 EDX, 4 = the
 * C-bit position in the boot page tables (0: none, not an SEV launch),
 * 6 = the SEV information C-bit (SEV-ES only), 7 = 1 if the guest takes the
 * RDTSCP path, 5 = verdict bits: 1 CPUID C-bit differs from the page tables,
 * 2 CPUID hides SEV although the guest runs encrypted, 4 the SEV information
 * C-bit differs from the page tables.  Then DONE.
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

lab_main:
        MEASURED_C_BIT_R14
        mov     $0x8000001F, %eax
        xor     %ecx, %ecx
        cpuid
        mov     %eax, %r8d
        mov     %ebx, %r9d
        mov     $0x80000001, %eax
        xor     %ecx, %ecx
        cpuid
        mov     %edx, %r10d
        LAB_REPORT($1, %r8)
        LAB_REPORT($2, %r9)
        LAB_REPORT($3, %r10)
        LAB_REPORT($4, %r14)

        xor     %r11d, %r11d            /* verdict */
        test    %r14, %r14
        jz      checked                 /* not an SEV launch: nothing to check against */
        mov     %r9, %rax
        and     $0x3F, %eax
        cmp     %r14, %rax
        je      2f
        or      $1, %r11
2:      test    $2, %r8d
        jnz     3f
        or      $2, %r11
3:
#ifdef LAB_SEV_ES
        mov     es_cbit(%rip), %rax
        LAB_REPORT($6, %rax)
        mov     es_cbit(%rip), %rax
        cmp     %r14, %rax
        je      checked
        or      $4, %r11
#endif
checked:
        xor     %eax, %eax
        bt      $27, %r10d
        jnc     4f
        mov     $1, %eax
4:      LAB_REPORT($7, %rax)
        LAB_REPORT($5, %r11)
        LAB_DONE
