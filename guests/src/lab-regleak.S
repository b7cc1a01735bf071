/*
 * lab-regleak: a secret held in registers across a CPUID exit (kvmharness lab
 * regleak).  R12..R14 hold secret values; CPUID 0x8000001F is executed (an
 * intercept: KVM answers it in the kernel, with the guest's registers in hand);
 * then a REPORT (an OUT: a userspace exit) announces the CPUID result while the
 * secrets are still live; the guest checks that they survived and ends.
 *
 * Under SVM and SEV the hypervisor reads R12..R14 at either exit: KVM keeps the
 * non-RAX GPRs in software (vcpu->arch.regs) and RAX/RSP/RIP in the VMCB save
 * area, all plaintext.  Under SEV-ES (lab-regleak-es.S includes this file with
 * LAB_SEV_ES defined) CPUID raises #VC and the guest's handler puts only RAX
 * (the function) and RCX (the index) into the GHCB; the registers themselves sit
 * in the encrypted VMSA.
 *
 * Reports: key 1 = CPUID 0x8000001F EBX, key 2 = R12 after the exits (the
 * guest's own check), then DONE.  FAIL(1) if a secret register changed.
 */
#ifndef LAB_SEV_ES
#define GUEST_MODE_LONG64
#include "guest.h"
#define LAB_REPORT(key, value)  REPORT(key, value)
#define LAB_DONE                DONE
#define LAB_FAIL(code)          FAIL(code)
GUEST_ENTRY
#else
#define LAB_REPORT(key, value)  ES_REPORT(key, value)
#define LAB_DONE                ES_DONE
#define LAB_FAIL(code)          ES_FAIL(code)
#endif

#define SECRET_R12 0x5EC2E7C0FFEE1234
#define SECRET_R13 0x70D0F00DCAFE5678
#define SECRET_R14 0x1A55B00B5EEDBEEF

lab_main:
        movabs  $SECRET_R12, %r12
        movabs  $SECRET_R13, %r13
        movabs  $SECRET_R14, %r14
        mov     $0x8000001F, %eax
        xor     %ecx, %ecx
        cpuid                           /* the CPUID exit (#VC under SEV-ES) */
        mov     %ebx, %r8d
        LAB_REPORT($1, %r8)             /* a userspace exit with the secrets live */
        movabs  $SECRET_R12, %rax
        cmp     %rax, %r12
        jne     changed
        movabs  $SECRET_R13, %rax
        cmp     %rax, %r13
        jne     changed
        movabs  $SECRET_R14, %rax
        cmp     %rax, %r14
        jne     changed
        LAB_REPORT($2, %r12)
        LAB_DONE
changed:
        LAB_FAIL(1)
