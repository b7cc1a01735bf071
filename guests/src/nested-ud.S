/*
 * nested-ud: exception intercepts and event injection on KVM's nested SVM.
 *
 * L1 (the SVM set-up of svm.h's SVM_L1_LIBRARY) intercepts #UD, #NP, #GP,
 * #DF, #PF, VMMCALL and HLT for its L2, gives L2 its own IDT (vector 0x20:
 * a handler; vector 0x21: an interrupt gate marked not present) and reports
 * every #VMEXIT under keys (n << 8) | field (svm.h EXIT_FIELD_*), then clears
 * EVENTINJ.  L2, in order:
 *   0  UD2                       0x46 (#UD)  L1 skips it (2 bytes)
 *   1  MOV (non-canonical), RAX  0x4D (#GP)  EXITINFO1 = error code 0; skipped (3)
 *   2  VMMCALL, RAX = 0x20       0x81        L1 skips it and injects external
 *                                            interrupt 0x20 (EVENTINJ) on VMRUN
 *   3  VMMCALL in the handler    0x81        RIP = the handler: the injected
 *                                            interrupt was delivered through L2's IDT
 *   4  VMMCALL, RAX = 0x21       0x81        L1 injects 0x21, whose gate is not present
 *   5  (delivery of 0x21)        0x4B (#NP)  EXITINFO1 = #NP's error code (IDT
 *                                            bit, selector 0x21 * 8), EXITINTINFO =
 *                                            the interrupt being delivered; L1
 *                                            drops it and resumes L2 where it was
 *   6  HLT                       0x78        L1 checks L2's progress: DONE
 * An intercepted exception is never delivered to L2: L2 reaches its HLT.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "svm.h"

#define KEY_L2_ENTRY 0xF003
#define L2_IDT_VECTORS 0x22          /* gates 0 .. 0x21 */
#define GATE_INT_PRESENT 0x8E        /* P, DPL0, 64-bit interrupt gate */
#define GATE_INT_ABSENT  0x0E        /* the same gate with P clear */

GUEST_ENTRY
        call    l1_enable_svm
        lea     l2_entry(%rip), %rdi
        call    l1_init_vmcb
        REPORT($KEY_L2_ENTRY, $l2_entry)
        orl     $(INTERCEPT_HLT | INTERCEPT_SHUTDOWN), VMCB(VMCB_INTERCEPT_W3)
        orl     $INTERCEPT_VMMCALL, VMCB(VMCB_INTERCEPT_W4)
        movl    $((1 << VEC_UD) | (1 << VEC_DF) | (1 << VEC_NP) | (1 << VEC_GP) | (1 << VEC_PF)), VMCB(VMCB_INTERCEPT_EXC)
        /* L2's IDT: gates 0x20 (present) and 0x21 (not present) lead to l2_isr */
        lea     l2_isr(%rip), %rax
        lea     l2_idt + 0x20 * 16(%rip), %rdi
        movb    $GATE_INT_PRESENT, %dl
        call    set_gate
        lea     l2_idt + 0x21 * 16(%rip), %rdi
        movb    $GATE_INT_ABSENT, %dl
        call    set_gate
        lea     l2_idt(%rip), %rax
        mov     %rax, VMCB(VMCB_IDTR + SEG_BASE)
        movl    $(L2_IDT_VECTORS * 16 - 1), VMCB(VMCB_IDTR + SEG_LIMIT)

l1_loop:
        call    l1_run_l2
        call    l1_report_exit
        movl    $0, VMCB(VMCB_EVENT_INJ)       /* nothing injected unless L1 says so again */
        mov     VMCB(VMCB_EXIT_CODE), %rax
        mov     $2, %esi                /* UD2 is 0F 0B */
        cmp     $SVM_EXIT_UD, %rax
        je      skip_fault
        mov     $3, %esi                /* mov (%rbx), %rax is 48 8B 03 */
        cmp     $SVM_EXIT_GP, %rax
        je      skip_fault
        cmp     $SVM_EXIT_VMMCALL, %rax
        je      on_vmmcall
        cmp     $SVM_EXIT_NP, %rax
        je      l1_loop                 /* drop the event; L2 goes on where it was */
        cmp     $SVM_EXIT_HLT, %rax
        je      on_hlt
        FAIL(0x70)                      /* an exit L1 did not ask for */
skip_fault:                             /* an exception intercept saves no next RIP */
        call    l1_skip_len
        jmp     l1_loop
on_vmmcall:                             /* 0F 01 D9: 3 bytes */
        mov     $3, %esi
        mov     VMCB(VMCB_RAX), %rax
        cmp     $0x20, %rax
        jb      skip
        cmp     $0x21, %rax
        ja      skip
        or      $(EVTINJ_VALID | EVTINJ_TYPE_INTR), %eax
        mov     %eax, VMCB(VMCB_EVENT_INJ)     /* L2 asked for this interrupt */
skip:
        call    l1_skip
        jmp     l1_loop

on_hlt:
        mov     $2, %eax
        EXPECT_EQ(l2_progress(%rip), %rax, 0x71)   /* L2 ran on after both faults */
        mov     $1, %eax
        EXPECT_EQ(l2_irqs(%rip), %rax, 0x72)       /* vector 0x20 was handled once, 0x21 never */
        mov     exit_count(%rip), %rax
        REPORT($KEY_EXITS, %rax)
        REPORT($KEY_NRIPS_USED, nrips_used(%rip))
        DONE

/* set_gate: RDI = the 16-byte gate, RAX = handler, DL = type/attributes */
set_gate:
        mov     %ax, (%rdi)
        movw    $KERNEL_CS, 2(%rdi)
        movb    $0, 4(%rdi)
        mov     %dl, 5(%rdi)
        mov     %rax, %rcx
        shr     $16, %rcx
        mov     %cx, 6(%rdi)
        shr     $16, %rcx
        mov     %ecx, 8(%rdi)
        movl    $0, 12(%rdi)
        ret

/* ---- L2 ------------------------------------------------------------------ */
l2_entry:
        ud2                             /* #VMEXIT 0: #UD */
        movq    $1, l2_progress(%rip)
        movabs  $0x8000000000000000, %rbx
        mov     (%rbx), %rax            /* #VMEXIT 1: #GP (non-canonical address) */
        movq    $2, l2_progress(%rip)
        mov     $0x20, %eax
        vmmcall                         /* #VMEXIT 2: please inject interrupt 0x20 */
        mov     $0x21, %eax             /* (#VMEXIT 3 came from l2_isr before this) */
        vmmcall                         /* #VMEXIT 4: please inject interrupt 0x21 */
        hlt                             /* (#VMEXIT 5: #NP delivering it) #VMEXIT 6: HLT */
        FAIL(0x7F)

l2_isr:
        incq    l2_irqs(%rip)
        xor     %eax, %eax
        vmmcall                         /* #VMEXIT 3: from the handler */
        iretq

        SVM_L1_LIBRARY

        .data
        .balign 16
l2_idt:         .fill L2_IDT_VECTORS * 2, 8, 0
l2_progress:    .quad 0
l2_irqs:        .quad 0
