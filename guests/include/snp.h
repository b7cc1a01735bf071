/*
 * SEV-SNP guest runtime, on top of the SEV-ES one (sev_es.h): PVALIDATE,
 * RMPADJUST, page-state changes (GHCB MSR protocol 0x014/0x015 and the PSC
 * NAE event 0x80000010), GHCB GPA registration (0x012/0x013), a #VC handler
 * that also reports "page not validated" (0x404), and the SNP launch's two
 * firmware pages.  Shared by guests/src/snp-*.S.
 *
 * Use (long64 guests only, 2 MiB of memory: the stack is the page below 2 MiB):
 *
 *     #define GUEST_MODE_LONG64
 *     #include "guest.h"
 *     #include "snp.h"
 *     GUEST_ENTRY
 *         SNP_START                 (validates the stack page; no memory access before)
 *         call snp_init
 *         ...
 *         ES_DONE
 *     snp_on_vc:                    (every guest defines it: where a #VC other than
 *         ...                        CPUID lands, after the handler reported it)
 *
 * Under SNP every private page must be validated by the guest (PVALIDATE)
 * before it is used: the launch validated only the pages it measured (the
 * boot tables and image, the secrets page at SNP_SECRETS_GPA and the CPUID
 * page at SNP_CPUID_GPA: kvmharness/snp/launch.py).  A private access to any
 * other page raises #VC with error code 0x404 (docs/facts.md: APM vol 2
 * §15.36.10).  The GHCB page must be shared (a page-state change) and
 * registered with the hypervisor before the first GHCB exchange.
 *
 * snp_init, in order:
 *   1. PVALIDATE the pages sev_es.h uses (ES_PML4 .. ES_IDT) and SNP_DATA_GPA.
 *   2. page-state change of GHCB_GPA to shared, GHCB MSR protocol 0x014
 *      (response 0x015 with error 0 in bits 63:32, else termination set 2 code 0x31).
 *   3. GHCB GPA registration (0x012, response 0x013 echoing the GFN, else
 *      termination set 2 code 0x32).
 *   4. es_init (SEV information, page tables with the C-bit, IDT, GHCB zeroed).
 *   5. IDT vector 29 -> snp_vc_handler.
 * A PVALIDATE that fails (RAX != 0) terminates with set 2 code 0x30.
 *
 * Report keys (ES_REPORT) the runtime itself uses:
 *   SNP_KEY_VC      the #VC error code of a #VC other than CPUID
 *   SNP_KEY_VC_RIP  its RIP
 * Labels 7790-7799 are used inside the macros.  Only C comments.
 */
#ifndef KVMHARNESS_SNP_H
#define KVMHARNESS_SNP_H

#define ES_VC_CPUID es_cpuid_ghcb
#include "sev_es.h"

/* PVALIDATE: RAX = linear address, RCX = size (0 = 4 KiB), RDX = 1 validate / 0 rescind;
 * RAX = return code, CF = 1 when the Validated bit already had that value.
 * RMPADJUST: RAX = linear address, RCX = size, RDX = attributes. */
#define PVALIDATE       .byte 0xF2, 0x0F, 0x01, 0xFF
#define RMPADJUST       .byte 0xF3, 0x0F, 0x01, 0xFE

/* The SNP launch's firmware pages (kvmharness/snp/launch.py) */
#define SNP_SECRETS_GPA 0xE000
#define SNP_CPUID_GPA   0xF000
/* Pages the runtime validates for guests to use */
#define SNP_DATA_GPA    0x17000
#define SNP_STACK_PAGE  0x1FF000

#define MSR_SEV_STATUS  0xC0010131
#define GHCB_MSR_REG_GPA_REQ    0x012
#define GHCB_MSR_REG_GPA_RESP   0x013
#define GHCB_MSR_PSC_REQ        0x014
#define GHCB_MSR_PSC_RESP       0x015
#define SNP_PSC_OP_PRIVATE      1
#define SNP_PSC_OP_SHARED       2
#define SVM_VMGEXIT_PSC         0x80000010
#define SVM_EXIT_NOT_VALIDATED  0x404

#define SNP_KEY_VC      0x736e707663000000  /* "snpvc" */
#define SNP_KEY_VC_RIP  0x736e707663000001

/* PVALIDATE one 4 KiB page at the constant address `addr` (validate = 1/0).
 * Out: RAX = return code, CF.  Clobbers RCX, RDX. */
#define SNP_PVALIDATE(addr, validate) \
        mov $(addr), %rax ; xor %ecx, %ecx ; mov $(validate), %edx ; PVALIDATE

/* Validate the stack page; the first thing an SNP guest does (no memory access before:
 * RSP is the top of memory, whose page the launch did not validate). */
#define SNP_START \
        SNP_PVALIDATE(SNP_STACK_PAGE, 1) ; test %eax, %eax ; jz 7790f ; \
        ES_TERMINATE(ES_TERM_SET_HARNESS, 0x30) ; 7790:

/* After GUEST_ENTRY, the start of an SNP guest whose body is a lab guest's (lab-*.S,
 * included after it, from lab_main): SNP_START, snp_init, then lab_main; a #VC it does not
 * handle fails with 0x404. */
#define SNP_LAB_START \
        SNP_START ; call snp_init ; jmp lab_main ; \
        snp_on_vc: ES_FAIL(0x404)

/* Register the GHCB at gpa (a page-aligned constant) through the GHCB MSR protocol
 * (GHCB_MSR_REG_GPA_REQ); a refusal terminates the guest with code fail. */
#define GHCB_MSR_REGISTER(gpa, fail) \
        mov $((gpa) | GHCB_MSR_REG_GPA_REQ), %eax ; xor %edx, %edx ; \
        mov $MSR_SEV_ES_GHCB, %ecx ; wrmsr ; VMGEXIT ; mov $MSR_SEV_ES_GHCB, %ecx ; rdmsr ; \
        cmp $((gpa) | GHCB_MSR_REG_GPA_RESP), %eax ; jne 7791f ; test %edx, %edx ; jz 7792f ; \
        7791: ES_TERMINATE(ES_TERM_SET_HARNESS, fail) ; 7792:

/* GHCB MSR protocol page-state change of the page `gfn` (a register) to `op`.
 * Out: RAX = the response's low half, RDX = its high half (0: done).  Clobbers RCX. */
.macro snp_psc_msr gfn, op
        mov     \gfn, %rax
        shl     $12, %rax
        mov     $\op, %rcx
        shl     $52, %rcx
        or      %rcx, %rax
        or      $GHCB_MSR_PSC_REQ, %rax
        ghcb_msr_call
.endm

/* GHCB page-state change of the descriptor at label `desc` (it ends at `desc`_end):
 * snp_psc_ghcb's result in RAX. */
#define SNP_PSC_GHCB(desc) \
        lea desc(%rip), %rsi ; mov $(desc##_end - desc), %ecx ; call snp_psc_ghcb

        .text
/* ---- snp_validate_range: PVALIDATE (validate) every 4 KiB page in [RSI, RDI).
 * Terminates (set 2 code 0x30) on a failure; a "no change" (CF) is fine.
 * Clobbers RAX, RCX, RDX, RSI. ---- */
snp_validate_range:
1:      cmp     %rdi, %rsi
        jae     2f
        mov     %rsi, %rax
        xor     %ecx, %ecx
        mov     $1, %edx
        PVALIDATE
        test    %eax, %eax
        jnz     snp_validate_failed
        add     $0x1000, %rsi
        jmp     1b
2:      ret
snp_validate_failed:
        ES_TERMINATE(ES_TERM_SET_HARNESS, 0x30)

/* ---- snp_init: see the header comment.  Clobbers every GPR but RSP. ---- */
snp_init:
        mov     $ES_PML4, %esi
        mov     $GHCB_GPA, %edi
        call    snp_validate_range
        mov     $SNP_DATA_GPA, %esi
        mov     $(SNP_DATA_GPA + 0x1000), %edi
        call    snp_validate_range
        /* the GHCB page: shared, then registered */
        mov     $(GHCB_GPA >> 12), %r8d
        snp_psc_msr %r8, SNP_PSC_OP_SHARED
        and     $0xFFF, %eax
        cmp     $GHCB_MSR_PSC_RESP, %eax
        jne     1f
        test    %edx, %edx
        jz      2f
1:      ES_TERMINATE(ES_TERM_SET_HARNESS, 0x31)
2:      GHCB_MSR_REGISTER(GHCB_GPA, 0x32)
        call    es_init
        lea     snp_vc_handler(%rip), %rax
        write_idt_gate ES_IDT+16*X86_TRAP_VC, ES_IDT+16*X86_TRAP_VC+8
        ret

/* ---- snp_psc_ghcb: one page-state change through the GHCB page (NAE 0x80000010).
 * In: RSI = pointer to the descriptor (header + entries), ECX = its length in bytes
 * (at most 0x7F0).  The descriptor is copied into the GHCB shared buffer, SW_SCRATCH
 * points at it.  Out: RAX = SW_EXIT_INFO_2 (0: done, else the PSC error), and the
 * descriptor as the hypervisor left it copied back to RSI.  Clobbers RCX, RDX, RDI. ---- */
snp_psc_ghcb:
        push    %rsi
        push    %rcx
        GHCB_BEGIN
        pop     %rcx
        push    %rcx
        mov     $(GHCB_GPA + GHCB_OFF_SHARED_BUFFER), %edi
        cld
        rep movsb
        GHCB_SET_SCRATCH($(GHCB_GPA + GHCB_OFF_SHARED_BUFFER))
        mov     $SVM_VMGEXIT_PSC, %eax
        GHCB_SET_EXIT(%rax, $0, $0)
        call    es_ghcb_exchange
        pop     %rcx
        pop     %rdi
        push    %rdi
        mov     $(GHCB_GPA + GHCB_OFF_SHARED_BUFFER), %esi
        rep movsb
        pop     %rsi
        mov     GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_2, %rax
        ret

/* ---- #VC handler: CPUID goes to sev_es.h's handler; any other #VC is reported
 * (SNP_KEY_VC = error code, SNP_KEY_VC_RIP), then control goes to the
 * guest's snp_on_vc with the frame still on the stack. ---- */
snp_vc_handler:
        cmpq    $SVM_EXIT_CPUID, (%rsp)
        je      es_vc_handler
        push    %rax
        push    %rbx
        push    %rcx
        mov     24(%rsp), %rax
        movabs  $SNP_KEY_VC, %rbx
        ES_REPORT(%rbx, %rax)
        mov     32(%rsp), %rax
        movabs  $SNP_KEY_VC_RIP, %rbx
        ES_REPORT(%rbx, %rax)
        pop     %rcx
        pop     %rbx
        pop     %rax
        jmp     snp_on_vc

#endif
