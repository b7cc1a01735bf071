/*
 * AMD SVM for guests that are hypervisors themselves (the nested-* guests).
 *
 * Numbers from docs/facts.md: #facts-1 (VMCB control area), #facts-2 (save
 * area), #facts-6 (exit codes) and #facts-10a (MSRs); the VMCB settings
 * that KVM's nested VMRUN accepts are those measured in the SVM rig
 * (docs/facts.md#rig-nested-svm).  Only `#define NAME VALUE` lines and the
 * assembler macros at the end: include it after guest.h, from .S files.
 *
 * Register use of the L1 library (SVM_L1_LIBRARY): every routine may clobber
 * every GPR but RSP; L1 keeps its state in memory.  That is the SVM
 * convention anyway: VMRUN and #VMEXIT load only RAX, RSP and RIP (and the
 * segment/control state), so after l1_run_l2 returns the other GPRs would
 * hold L2's values -- l1_run_l2 parks them in l2_gprs instead.
 */
#ifndef KVMHARNESS_SVM_H
#define KVMHARNESS_SVM_H

/* MSRs and CPUID */
#define MSR_EFER            0xC0000080
#define EFER_SVME           0x1000        /* bit 12 */
#define MSR_VM_HSAVE_PA     0xC0010117
#define CPUID_EXT_FEATURES  0x80000001
#define EXT_ECX_SVM         0x4           /* CPUID 0x80000001 ECX bit 2 */
#define CPUID_SVM_FEATURES  0x8000000A
#define SVM_EDX_NP          0x1           /* EDX bit 0: nested paging */
#define SVM_EDX_NRIPS       0x8           /* EDX bit 3: next RIP saved on #VMEXIT */

/* VMCB control area (byte offsets) */
#define VMCB_INTERCEPT_CR   0x000
#define VMCB_INTERCEPT_DR   0x004
#define VMCB_INTERCEPT_EXC  0x008         /* bit n = exception vector n */
#define VMCB_INTERCEPT_W3   0x00C
#define VMCB_INTERCEPT_W4   0x010
#define VMCB_INTERCEPT_W5   0x014
#define VMCB_IOPM_BASE      0x040
#define VMCB_MSRPM_BASE     0x048
#define VMCB_TSC_OFFSET     0x050
#define VMCB_ASID           0x058
#define VMCB_TLB_CTL        0x05C
#define VMCB_INT_CTL        0x060
#define VMCB_INT_VECTOR     0x064
#define VMCB_INT_STATE      0x068
#define VMCB_EXIT_CODE      0x070
#define VMCB_EXIT_INFO_1    0x078
#define VMCB_EXIT_INFO_2    0x080
#define VMCB_EXIT_INT_INFO  0x088
#define VMCB_EXIT_INT_ERR   0x08C
#define VMCB_NESTED_CTL     0x090
#define VMCB_EVENT_INJ      0x0A8
#define VMCB_EVENT_INJ_ERR  0x0AC
#define VMCB_NESTED_CR3     0x0B0
#define VMCB_CLEAN          0x0C0
#define VMCB_NEXT_RIP       0x0C8
#define VMCB_INSN_LEN       0x0D0

/* VMCB save area (0x400 + the save-area offset) */
#define VMCB_SAVE           0x400
#define VMCB_ES             0x400
#define VMCB_CS             0x410
#define VMCB_SS             0x420
#define VMCB_DS             0x430
#define VMCB_FS             0x440
#define VMCB_GS             0x450
#define VMCB_GDTR           0x460
#define VMCB_LDTR           0x470
#define VMCB_IDTR           0x480
#define VMCB_TR             0x490
#define VMCB_CPL            0x4CB
#define VMCB_EFER           0x4D0
#define VMCB_CR4            0x548
#define VMCB_CR3            0x550
#define VMCB_CR0            0x558
#define VMCB_DR7            0x560
#define VMCB_DR6            0x568
#define VMCB_RFLAGS         0x570
#define VMCB_RIP            0x578
#define VMCB_RSP            0x5D8
#define VMCB_RAX            0x5F8
#define VMCB_CR2            0x640
#define VMCB_G_PAT          0x668
/* a segment record: selector u16, attrib u16, limit u32, base u64 */
#define SEG_SELECTOR        0
#define SEG_ATTRIB          2
#define SEG_LIMIT           4
#define SEG_BASE            8

/* Segment attributes (compressed descriptor bits 8-15 and 20-23) */
#define ATTR_CODE64         0xA9B         /* P S code R A, L, G */
#define ATTR_DATA           0xC93         /* P S data W A, D/B, G */

/* Intercept bits: word 3 (VMCB 0x00C) */
#define INTERCEPT_INTR      (1 << 0)
#define INTERCEPT_VINTR     (1 << 4)
#define INTERCEPT_CPUID     (1 << 18)
#define INTERCEPT_HLT       (1 << 24)
#define INTERCEPT_IOIO_PROT (1 << 27)
#define INTERCEPT_MSR_PROT  (1 << 28)
#define INTERCEPT_SHUTDOWN  (1 << 31)
/* word 4 (VMCB 0x010) */
#define INTERCEPT_VMRUN     (1 << 0)      /* KVM: VMRUN without it is VMEXIT_INVALID */
#define INTERCEPT_VMMCALL   (1 << 1)

/* Exception vectors (for VMCB_INTERCEPT_EXC) */
#define VEC_UD              6
#define VEC_DF              8
#define VEC_NP              11
#define VEC_GP              13
#define VEC_PF              14

/* Exit codes (docs/facts.md#facts-6) */
#define SVM_EXIT_EXCP_BASE  0x40
#define SVM_EXIT_UD         0x46
#define SVM_EXIT_NP         0x4B
#define SVM_EXIT_GP         0x4D
#define SVM_EXIT_PF         0x4E
#define SVM_EXIT_INTR       0x60
#define SVM_EXIT_CPUID      0x72
#define SVM_EXIT_HLT        0x78
#define SVM_EXIT_IOIO       0x7B
#define SVM_EXIT_SHUTDOWN   0x7F
#define SVM_EXIT_VMRUN      0x80
#define SVM_EXIT_VMMCALL    0x81
#define SVM_EXIT_ERR        -1            /* VMEXIT_INVALID */

/* EVENTINJ / EXITINTINFO (docs/facts.md#facts-1f) */
#define EVTINJ_VALID        0x80000000
#define EVTINJ_TYPE_INTR    (0 << 8)
#define EVTINJ_TYPE_EXEPT   (3 << 8)

/* IOIO EXITINFO1 (docs/facts.md#facts-1h) */
#define IOIO_TYPE_IN        0x1
#define IOIO_SIZE8          0x10
#define IOIO_PORT_SHIFT     16

/* DR6/DR7/PAT values a fresh guest starts with */
#define DR6_INIT            0xFFFF0FF0
#define DR7_INIT            0x400
#define PAT_DEFAULT         0x0007040600070406

/*
 * Where the nested guests keep their SVM structures (all inside the 4 MiB the
 * manifest gives them; GiB 0 is identity-mapped by the harness).
 */
#define HSAVE_PA            0x100000      /* host save area (VM_HSAVE_PA) */
#define VMCB_PA             0x101000      /* L2's VMCB */
#define IOPM_PA             0x104000      /* I/O permission map, 12 KiB */
#define L2_STACK_TOP        0x300000
/* Parameters the host may write into guest RAM before the run (zero = off) */
#define NESTED_PARAMS_PA    0x107000
#define PARAM_BENCH_LOOPS   0             /* u64: L2 first runs this many unreported CPUIDs */
#define PARAM_INVALID_FIRST 8             /* u64: nonzero = the first VMRUN has ASID 0 */

/*
 * Report keys: after the n-th #VMEXIT (n from 0) L1 reports
 * key (n << 8) | field for each field below, in this order.
 */
#define EXIT_FIELD_CODE     0
#define EXIT_FIELD_INFO1    1
#define EXIT_FIELD_INFO2    2
#define EXIT_FIELD_NEXT_RIP 3
#define EXIT_FIELD_RIP      4             /* L2's RIP in the VMCB save area */
#define EXIT_FIELD_INT_INFO 5             /* EXITINTINFO (+ its error code in bits 63:32) */
#define EXIT_FIELD_EVENTINJ 6             /* EVENTINJ as L1 finds it after the exit */
#define EXIT_FIELDS         7
/* Keys outside the per-exit range (n < 0xF0 exits) */
#define KEY_SVM_FEATURES    0xF000        /* CPUID 0x8000000A EDX as L1 sees it */
#define KEY_NRIPS_USED      0xF001        /* 1 if L1 took RIPs from next_rip */
#define KEY_EXITS           0xF002        /* #VMEXITs seen in all */

/* Absolute memory operands for the VMCB fields (AT&T: no $ = memory) */
#define VMCB(field)         (VMCB_PA + (field))

/*
 * SVM_L1_LIBRARY: emits the routines every nested guest's L1 uses.
 *
 *   l1_enable_svm      FAIL(0x51) unless CPUID offers SVM; sets EFER.SVME and
 *                      VM_HSAVE_PA; stores CPUID 0x8000000A EDX in
 *                      svm_features and reports it (KEY_SVM_FEATURES)
 *   l1_init_vmcb       zeroes VMCB and IOPM; L2's save area = L1's current
 *                      state (segments, GDTR/IDTR, CR0/3/4, EFER incl. SVME),
 *                      RIP = %rdi, RSP = L2_STACK_TOP, RFLAGS = 2; ASID 1,
 *                      IOPM base; the VMRUN intercept.  The caller adds its
 *                      own intercepts afterwards.
 *   l1_run_l2          L2's GPRs from l2_gprs, VMRUN, GPRs back to l2_gprs
 *   l1_report_exit     the EXIT_FIELDS reports of #VMEXIT number exit_count,
 *                      then exit_count += 1 (EXITINTINFO is reported as its
 *                      64 bits: the error code is in the upper half)
 *   l1_skip            after an instruction intercept: L2's RIP = next_rip
 *                      when CPUID offers NRIPS, else RIP += %rsi (the
 *                      instruction's length, which L1 must know without NRIPS)
 *   l1_skip_len        L2's RIP += %rsi: after an exception intercept, for
 *                      which the CPU saves no next RIP even with NRIPS
 * Data: l2_gprs (RBX RCX RDX RSI RDI RBP R8-R15, 8 bytes each at
 * L2_RBX..L2_R15), exit_count, svm_features, nrips_used.
 */
#define L2_RBX 0
#define L2_RCX 8
#define L2_RDX 16
#define L2_RSI 24
#define L2_RDI 32
#define L2_RBP 40

        .macro SVM_L1_LIBRARY
        .text
l1_enable_svm:
        mov     $CPUID_EXT_FEATURES, %eax
        xor     %ecx, %ecx
        cpuid
        test    $EXT_ECX_SVM, %ecx
        jnz     1f
        FAIL(0x51)                      /* SVM not offered by CPUID */
1:      mov     $CPUID_SVM_FEATURES, %eax
        xor     %ecx, %ecx
        cpuid
        mov     %edx, svm_features(%rip)
        mov     %edx, %edx
        REPORT($KEY_SVM_FEATURES, %rdx)
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_SVME, %eax
        wrmsr
        mov     $MSR_VM_HSAVE_PA, %ecx
        mov     $HSAVE_PA, %eax
        xor     %edx, %edx
        wrmsr
        ret

l1_init_vmcb:
        push    %rdi
        mov     $VMCB_PA, %rdi          /* zero the VMCB page */
        mov     $512, %ecx
        xor     %eax, %eax
        cld
        rep stosq
        mov     $IOPM_PA, %rdi          /* zero the 12 KiB IOPM: no port intercepted */
        mov     $(3 * 512), %ecx
        rep stosq
        pop     %rdi
        mov     $VMCB_PA, %rbx
        /* save area: flat CPL0 64-bit segments like L1's own */
        .irp    seg, VMCB_ES, VMCB_SS, VMCB_DS, VMCB_FS, VMCB_GS
        movw    $KERNEL_DS, \seg + SEG_SELECTOR(%rbx)
        movw    $ATTR_DATA, \seg + SEG_ATTRIB(%rbx)
        movl    $0xFFFFFFFF, \seg + SEG_LIMIT(%rbx)
        .endr
        movw    $KERNEL_CS, VMCB_CS + SEG_SELECTOR(%rbx)
        movw    $ATTR_CODE64, VMCB_CS + SEG_ATTRIB(%rbx)
        movl    $0xFFFFFFFF, VMCB_CS + SEG_LIMIT(%rbx)
        sub     $16, %rsp               /* GDTR/IDTR: limit u16 + base u64 */
        sgdt    (%rsp)
        movzwl  (%rsp), %eax
        mov     %eax, VMCB_GDTR + SEG_LIMIT(%rbx)
        mov     2(%rsp), %rax
        mov     %rax, VMCB_GDTR + SEG_BASE(%rbx)
        sidt    (%rsp)
        movzwl  (%rsp), %eax
        mov     %eax, VMCB_IDTR + SEG_LIMIT(%rbx)
        mov     2(%rsp), %rax
        mov     %rax, VMCB_IDTR + SEG_BASE(%rbx)
        add     $16, %rsp
        movb    $0, VMCB_CPL(%rbx)
        mov     $MSR_EFER, %ecx         /* EFER includes SVME: KVM rejects L2 EFER without it */
        rdmsr
        mov     %eax, VMCB_EFER(%rbx)
        mov     %edx, VMCB_EFER + 4(%rbx)
        mov     %cr0, %rax
        mov     %rax, VMCB_CR0(%rbx)
        mov     %cr3, %rax
        mov     %rax, VMCB_CR3(%rbx)
        mov     %cr4, %rax
        mov     %rax, VMCB_CR4(%rbx)
        movq    $DR7_INIT, VMCB_DR7(%rbx)
        mov     $DR6_INIT, %eax
        mov     %rax, VMCB_DR6(%rbx)
        movq    $2, VMCB_RFLAGS(%rbx)
        mov     %rdi, VMCB_RIP(%rbx)
        movq    $L2_STACK_TOP, VMCB_RSP(%rbx)
        movabs  $PAT_DEFAULT, %rax
        mov     %rax, VMCB_G_PAT(%rbx)
        /* control area */
        movl    $INTERCEPT_VMRUN, VMCB_INTERCEPT_W4(%rbx)
        movl    $1, VMCB_ASID(%rbx)
        movq    $IOPM_PA, VMCB_IOPM_BASE(%rbx)
        ret

l1_run_l2:
        mov     l2_gprs + 0(%rip), %rbx
        mov     l2_gprs + 8(%rip), %rcx
        mov     l2_gprs + 16(%rip), %rdx
        mov     l2_gprs + 24(%rip), %rsi
        mov     l2_gprs + 32(%rip), %rdi
        mov     l2_gprs + 40(%rip), %rbp
        mov     l2_gprs + 48(%rip), %r8
        mov     l2_gprs + 56(%rip), %r9
        mov     l2_gprs + 64(%rip), %r10
        mov     l2_gprs + 72(%rip), %r11
        mov     l2_gprs + 80(%rip), %r12
        mov     l2_gprs + 88(%rip), %r13
        mov     l2_gprs + 96(%rip), %r14
        mov     l2_gprs + 104(%rip), %r15
        mov     $VMCB_PA, %rax
        vmrun   %rax
        /* #VMEXIT: RAX, RSP, RIP are L1's again; the rest is L2's */
        mov     %rbx, l2_gprs + 0(%rip)
        mov     %rcx, l2_gprs + 8(%rip)
        mov     %rdx, l2_gprs + 16(%rip)
        mov     %rsi, l2_gprs + 24(%rip)
        mov     %rdi, l2_gprs + 32(%rip)
        mov     %rbp, l2_gprs + 40(%rip)
        mov     %r8, l2_gprs + 48(%rip)
        mov     %r9, l2_gprs + 56(%rip)
        mov     %r10, l2_gprs + 64(%rip)
        mov     %r11, l2_gprs + 72(%rip)
        mov     %r12, l2_gprs + 80(%rip)
        mov     %r13, l2_gprs + 88(%rip)
        mov     %r14, l2_gprs + 96(%rip)
        mov     %r15, l2_gprs + 104(%rip)
        ret

l1_report_exit:
        mov     exit_count(%rip), %r12
        shl     $8, %r12
        REPORT(%r12, VMCB(VMCB_EXIT_CODE))
        inc     %r12
        REPORT(%r12, VMCB(VMCB_EXIT_INFO_1))
        inc     %r12
        REPORT(%r12, VMCB(VMCB_EXIT_INFO_2))
        inc     %r12
        REPORT(%r12, VMCB(VMCB_NEXT_RIP))
        inc     %r12
        REPORT(%r12, VMCB(VMCB_RIP))
        inc     %r12
        mov     VMCB(VMCB_EXIT_INT_INFO), %r13
        REPORT(%r12, %r13)
        inc     %r12
        mov     VMCB(VMCB_EVENT_INJ), %r13
        REPORT(%r12, %r13)
        incq    exit_count(%rip)
        ret

l1_skip:
        testl   $SVM_EDX_NRIPS, svm_features(%rip)
        jz      1f
        mov     VMCB(VMCB_NEXT_RIP), %rax
        movq    $1, nrips_used(%rip)
        jmp     2f
1:      mov     VMCB(VMCB_RIP), %rax
        add     %rsi, %rax
2:      mov     %rax, VMCB(VMCB_RIP)
        ret

l1_skip_len:
        add     %rsi, VMCB(VMCB_RIP)
        ret

        .data
        .balign 8
l2_gprs:        .fill 14, 8, 0
exit_count:     .quad 0
nrips_used:     .quad 0
svm_features:   .long 0, 0
        .text
        .endm

#endif
