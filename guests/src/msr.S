/*
 * msr: WRMSR then RDMSR of the SEV-ES GHCB MSR (0xC0010130), which the
 * manifest's user_msrs routes to userspace through the MSR filter.  KVM
 * itself does not implement it for a non-SEV-ES guest (a plain RDMSR gives
 * #GP), so a correct read-back proves both exits reached the host and the
 * host completed the read with the value last written.
 *
 * Reports: key 0x130 twice, in order: PATTERN_A read back, then PATTERN_B.
 */
#define GUEST_MODE_LONG64
#include "guest.h"

#define MSR_SEV_ES_GHCB  0xC0010130
#define PATTERN_A        0xFEDCBA9876543210   /* both halves non-zero: EDX:EAX */
#define PATTERN_B        0x0123456789ABCDEF

GUEST_ENTRY
        /* WRMSR takes the value in EDX:EAX, RDMSR returns it there. */
        mov     $MSR_SEV_ES_GHCB, %ecx
        movabs  $PATTERN_A, %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr

        mov     $MSR_SEV_ES_GHCB, %ecx
        xor     %eax, %eax              /* make sure the values come from RDMSR */
        xor     %edx, %edx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax              /* RAX = the 64-bit value read */
        mov     %rax, %r12
        REPORT($0x130, %r12)
        movabs  $PATTERN_A, %rax
        EXPECT_EQ(%rax, %r12, 1)

        /* A second pattern: the host must track writes, not replay one value. */
        mov     $MSR_SEV_ES_GHCB, %ecx
        movabs  $PATTERN_B, %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr

        mov     $MSR_SEV_ES_GHCB, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %r12
        REPORT($0x130, %r12)
        movabs  $PATTERN_B, %rax
        EXPECT_EQ(%rax, %r12, 2)
        DONE
