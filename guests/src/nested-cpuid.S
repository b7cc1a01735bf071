/*
 * nested-cpuid: a minimal hypervisor (L1) running its own guest (L2) with
 * VMRUN, on KVM's nested SVM.
 *
 * L1 checks CPUID for SVM (FAIL 0x51 without it), sets EFER.SVME and
 * VM_HSAVE_PA, builds a VMCB whose save area is its own flat 64-bit state
 * (ASID 1; intercepts VMRUN, CPUID, HLT, IOIO through the IOPM, SHUTDOWN,
 * #UD/#DF/#GP/#PF), and loops on VMRUN.  After each #VMEXIT it REPORTs the
 * exit code, EXITINFO1/2, next_rip, L2's RIP and EXITINTINFO under keys
 * (n << 8) | field (svm.h EXIT_FIELD_*), emulates the instruction, advances
 * L2's RIP (from next_rip where CPUID offers NRIPS, else by the instruction's
 * known length) and runs L2 again, until L2's HLT.  Then it checks what L2
 * saw and reports DONE.
 *
 * L2, in order (the #VMEXITs L1 sees):
 *   0  CPUID leaf 0            0x72   L1 executes CPUID itself, passes it on
 *   1  CPUID leaf L1_LEAF      0x72   L1 answers with its own constants
 *   2  OUT %al, $L1_PORT       0x7B   in L1's IOPM; L1 records AL
 *      OUT %al, $BENCH_PORT    -      not in L1's IOPM: KVM (L0) takes it to
 *                                     the host as a plain KVM_EXIT_IO
 *   3  VMMCALL                 0x81   L1 returns RAX + 1
 *   4  HLT                     0x78   L1 checks the results and is DONE
 *
 * Benchmark mode: when the host writes a count N to the u64 at
 * NESTED_PARAMS_PA + PARAM_BENCH_LOOPS before the run, L2 first executes N
 * CPUIDs of L1_LEAF, which L1 emulates without reporting or counting them;
 * the reported sequence is the same as without.
 *
 * Consistency-check mode: when the host writes a nonzero u64 at
 * NESTED_PARAMS_PA + PARAM_INVALID_FIRST, L1's first VMRUN has ASID 0, which
 * KVM refuses with VMEXIT_INVALID (exit code -1; L2 never runs): that is
 * reported as #VMEXIT 0, L1 sets ASID 1 and the sequence above follows as
 * #VMEXITs 1-5.  (Not combined with the benchmark mode.)
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "svm.h"

#define L1_PORT   0x7A          /* L1 intercepts OUTs here (its IOPM bit is set) */
#define L1_LEAF   0x4C310000    /* a CPUID leaf L1 answers itself */
#define KEY_L2_ENTRY 0xF003     /* where L2 starts (RIPs in the reports are relative to it) */

GUEST_ENTRY
        call    l1_enable_svm
        lea     l2_entry(%rip), %rdi
        call    l1_init_vmcb
        REPORT($KEY_L2_ENTRY, $l2_entry)
        orl     $(INTERCEPT_CPUID | INTERCEPT_HLT | INTERCEPT_IOIO_PROT | INTERCEPT_SHUTDOWN), VMCB(VMCB_INTERCEPT_W3)
        orl     $INTERCEPT_VMMCALL, VMCB(VMCB_INTERCEPT_W4)
        movl    $((1 << VEC_UD) | (1 << VEC_DF) | (1 << VEC_GP) | (1 << VEC_PF)), VMCB(VMCB_INTERCEPT_EXC)
        orb     $(1 << (L1_PORT % 8)), IOPM_PA + L1_PORT / 8   /* intercept port L1_PORT */
        cmpq    $0, NESTED_PARAMS_PA + PARAM_INVALID_FIRST
        je      l1_loop
        movl    $0, VMCB(VMCB_ASID)     /* KVM's VMRUN check: ASID 0 is VMEXIT_INVALID */

l1_loop:
        call    l1_run_l2
        mov     bench_seen(%rip), %rax  /* the first N exits are the benchmark's CPUIDs */
        cmp     NESTED_PARAMS_PA + PARAM_BENCH_LOOPS, %rax
        jae     1f
        incq    bench_seen(%rip)
        cmpq    $SVM_EXIT_CPUID, VMCB(VMCB_EXIT_CODE)
        je      on_cpuid
        FAIL(0x6A)                      /* the benchmark loop exits only for CPUID */
1:      call    l1_report_exit
        mov     VMCB(VMCB_EXIT_CODE), %rax
        cmp     $SVM_EXIT_CPUID, %rax
        je      on_cpuid
        cmp     $SVM_EXIT_IOIO, %rax
        je      on_ioio
        cmp     $SVM_EXIT_VMMCALL, %rax
        je      on_vmmcall
        cmp     $SVM_EXIT_HLT, %rax
        je      on_hlt
        cmp     $SVM_EXIT_ERR, %rax
        je      on_invalid
        FAIL(0x60)                      /* an exit L1 did not ask for */

on_invalid:                             /* VMRUN refused: L2 did not run */
        cmpl    $0, VMCB(VMCB_ASID)
        je      1f
        FAIL(0x6B)                      /* refused although L1 did not provoke it */
1:      movl    $1, VMCB(VMCB_ASID)
        jmp     l1_loop

on_cpuid:                               /* CPUID is 0F A2: 2 bytes */
        mov     VMCB(VMCB_RAX), %rax
        mov     l2_gprs + L2_RCX(%rip), %rcx
        cmp     $L1_LEAF, %eax
        je      1f
        cpuid                           /* any other leaf: what L1 itself sees */
        jmp     2f
1:      mov     $0x4C314C31, %eax       /* "1L1L" */
        mov     $0x11111111, %ebx
        mov     $0x22222222, %ecx
        mov     $0x33333333, %edx
2:      mov     %rax, VMCB(VMCB_RAX)    /* CPUID zero-extends into the 64-bit registers */
        mov     %rbx, l2_gprs + L2_RBX(%rip)
        mov     %rcx, l2_gprs + L2_RCX(%rip)
        mov     %rdx, l2_gprs + L2_RDX(%rip)
        mov     $2, %esi
        call    l1_skip
        jmp     l1_loop

on_ioio:                                /* OUT imm8, AL is E6 ib: 2 bytes */
        mov     VMCB(VMCB_EXIT_INFO_1), %rax
        shr     $IOIO_PORT_SHIFT, %rax
        EXPECT_EQ($L1_PORT, %rax, 0x61)
        movzbl  VMCB(VMCB_RAX), %eax
        mov     %rax, io_seen(%rip)
        mov     $2, %esi
        call    l1_skip
        jmp     l1_loop

on_vmmcall:                             /* 0F 01 D9: 3 bytes */
        incq    VMCB(VMCB_RAX)
        mov     $3, %esi
        call    l1_skip
        jmp     l1_loop

on_hlt:
        /* CPUID leaf 0 as L2 saw it = as L1 sees it */
        xor     %eax, %eax
        xor     %ecx, %ecx
        cpuid
        EXPECT_EQ(l2_seen + 0(%rip), %eax, 0x62)
        EXPECT_EQ(l2_seen + 4(%rip), %ebx, 0x63)
        EXPECT_EQ(l2_seen + 8(%rip), %ecx, 0x64)
        EXPECT_EQ(l2_seen + 12(%rip), %edx, 0x65)
        /* L1's own leaf */
        mov     $0x4C314C31, %eax
        EXPECT_EQ(l2_seen + 16(%rip), %eax, 0x66)
        mov     $0x33333333, %eax
        EXPECT_EQ(l2_seen + 28(%rip), %eax, 0x67)
        mov     $0x5A, %eax
        EXPECT_EQ(io_seen(%rip), %rax, 0x68)
        mov     $0x1235, %eax
        EXPECT_EQ(l2_seen + 32(%rip), %rax, 0x69)
        /* L2's RSP survived the exits, and its HLT is where the report said */
        mov     exit_count(%rip), %rax
        REPORT($KEY_EXITS, %rax)
        REPORT($KEY_NRIPS_USED, nrips_used(%rip))
        DONE

/* ---- L2 ------------------------------------------------------------------ */
l2_entry:
        mov     NESTED_PARAMS_PA + PARAM_BENCH_LOOPS, %r15
        test    %r15, %r15
        jz      2f
1:      mov     $L1_LEAF, %eax          /* benchmark: N intercepted CPUIDs */
        xor     %ecx, %ecx
        cpuid
        dec     %r15
        jnz     1b
2:      xor     %eax, %eax
        xor     %ecx, %ecx
        cpuid                           /* #VMEXIT 0: CPUID */
        mov     %eax, l2_seen + 0(%rip)
        mov     %ebx, l2_seen + 4(%rip)
        mov     %ecx, l2_seen + 8(%rip)
        mov     %edx, l2_seen + 12(%rip)
        mov     $L1_LEAF, %eax
        xor     %ecx, %ecx
        cpuid                           /* #VMEXIT 1: CPUID */
        mov     %eax, l2_seen + 16(%rip)
        mov     %ebx, l2_seen + 20(%rip)
        mov     %ecx, l2_seen + 24(%rip)
        mov     %edx, l2_seen + 28(%rip)
        mov     $0x5A, %al
        out     %al, $L1_PORT           /* #VMEXIT 2: IOIO (L1's IOPM) */
        mov     $0xA5, %al
        out     %al, $BENCH_PORT        /* not L1's: a KVM_EXIT_IO to the host */
        mov     $0x1234, %eax
        vmmcall                         /* #VMEXIT 3: VMMCALL */
        mov     %rax, l2_seen + 32(%rip)
        hlt                             /* #VMEXIT 4: HLT */
        FAIL(0x6F)                      /* L1 never resumes L2 after its HLT */

        SVM_L1_LIBRARY

        .data
        .balign 8
l2_seen:        .fill 5, 8, 0
io_seen:        .quad 0
bench_seen:     .quad 0
