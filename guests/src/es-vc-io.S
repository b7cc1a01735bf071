/*
 * es-vc-io: IN/OUT and MMIO executed directly by an SEV-ES guest raise #VC.
 *
 * After es_init the guest points IDT vector 29 at its own recorder instead of
 * es_vc_handler: it stores the error code and the frame's RIP of each #VC,
 * moves RIP past the instruction (length in vc_skip) and returns.  Then, one
 * #VC each (n = 0..6):
 *   0. outb %al, $CONSOLE_PORT    (nothing may reach the console)
 *   1. inb $BENCH_PORT, %al       RAX = RAX_PATTERN before
 *   2. inl (%dx), %eax            RAX = RAX_PATTERN before (no zero-extension)
 *   3. rep outsb, RCX = 4, RSI = buf
 *   4. rep insb, RCX = 4, RDI = buf (buf holds 0xCC bytes)
 *   5. a 4-byte load from MMIO_GPA (unbacked; its 2 MiB page mapped shared)
 *   6. a 4-byte store to MMIO_GPA
 * Reports: key 0x100+n = the #VC error code (0x7B for 0-4, 0x400 for 5-6);
 * key 0x200+n = frame RIP - the instruction's address (0); key 0x301/0x302 =
 * RAX after the IN; key 0x303/0x304 = RCX after the string op (4), key
 * 0x313 = RSI - buf, 0x314 = RDI - buf (0), 0x324 = buf's first qword after
 * the INS; key 0x305 = R12 after the MMIO load (its old value, 0x5A5A5A5A);
 * key 0x3FF = the number of #VCs (7).  Then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#define ES_VC_CPUID es_cpuid_ghcb
#include "sev_es.h"

#define RAX_PATTERN     0x1122334455667788
#define MMIO_GPA        0x3FE00000      /* last 2 MiB page of GiB 0: no memory slot */
#define MMIO_PD_INDEX   511

/* VC_AT(insn, operands...): R14 = the instruction's address, vc_skip = its length */
#define VC_AT(...) \
        lea 1f(%rip), %r14 ; movq $(2f - 1f), vc_skip(%rip) ; 1: __VA_ARGS__ ; 2:
/* report the error code and the RIP offset of #VC number n */
#define VC_REPORT(n) \
        mov vc_err + 8 * n(%rip), %r8 ; ES_REPORT($(0x100 + (n)), %r8) ; \
        mov vc_rip + 8 * n(%rip), %r8 ; sub %r14, %r8 ; ES_REPORT($(0x200 + (n)), %r8)

GUEST_ENTRY
        call    es_init

        /* IDT gate 29 -> vc_record (same gate layout as es_init writes) */
        lea     vc_record(%rip), %rax
        write_idt_gate ES_IDT+16*X86_TRAP_VC, ES_IDT+16*X86_TRAP_VC+8

        /* the MMIO page is shared (C-bit clear), as a guest maps MMIO */
        mov     es_cbit(%rip), %rcx
        mov     $1, %eax
        shl     %cl, %rax
        not     %rax
        and     %rax, ES_PD0 + 8 * MMIO_PD_INDEX
        mov     %cr3, %rax
        mov     %rax, %cr3

        /* 0. OUT */
        mov     $'X', %al
        VC_AT(outb %al, $CONSOLE_PORT)
        VC_REPORT(0)

        /* 1. IN of one byte */
        movabs  $RAX_PATTERN, %rax
        VC_AT(inb $BENCH_PORT, %al)
        mov     %rax, %r9
        VC_REPORT(1)
        ES_REPORT($0x301, %r9)

        /* 2. IN of four bytes through DX */
        mov     $BENCH_PORT, %edx
        movabs  $RAX_PATTERN, %rax
        VC_AT(inl (%dx), %eax)
        mov     %rax, %r9
        VC_REPORT(2)
        ES_REPORT($0x302, %r9)

        /* 3. REP OUTSB */
        lea     buf(%rip), %rsi
        mov     $4, %ecx
        mov     $CONSOLE_PORT, %edx
        cld
        VC_AT(rep outsb)
        mov     %rcx, %r9
        lea     buf(%rip), %r10
        sub     %rsi, %r10
        neg     %r10
        VC_REPORT(3)
        ES_REPORT($0x303, %r9)
        ES_REPORT($0x313, %r10)

        /* 4. REP INSB */
        lea     buf(%rip), %rdi
        mov     $4, %ecx
        mov     $BENCH_PORT, %edx
        VC_AT(rep insb)
        mov     %rcx, %r9
        lea     buf(%rip), %r10
        sub     %rdi, %r10
        neg     %r10
        mov     buf(%rip), %r11
        VC_REPORT(4)
        ES_REPORT($0x304, %r9)
        ES_REPORT($0x314, %r10)
        ES_REPORT($0x324, %r11)

        /* 5. MMIO load */
        mov     $MMIO_GPA, %edi
        mov     $0x5A5A5A5A, %r12d
        VC_AT(movl (%rdi), %r12d)
        VC_REPORT(5)
        ES_REPORT($0x305, %r12)

        /* 6. MMIO store */
        VC_AT(movl $0x12345678, (%rdi))
        VC_REPORT(6)

        mov     vc_n(%rip), %r8
        ES_REPORT($0x3FF, %r8)
        ES_DONE

/* #VC recorder: frame = error code, RIP, CS, RFLAGS, RSP, SS */
vc_record:
        push    %rax
        push    %rbx
        push    %rcx
        mov     vc_n(%rip), %rax
        cmp     $8, %rax
        jae     1f
        lea     vc_err(%rip), %rbx
        mov     24(%rsp), %rcx          /* error code */
        mov     %rcx, (%rbx,%rax,8)
        lea     vc_rip(%rip), %rbx
        mov     32(%rsp), %rcx          /* RIP */
        mov     %rcx, (%rbx,%rax,8)
1:      incq    vc_n(%rip)
        mov     vc_skip(%rip), %rcx
        add     %rcx, 32(%rsp)
        pop     %rcx
        pop     %rbx
        pop     %rax
        add     $8, %rsp                /* the error code */
        iretq

        .section .data
        .balign 8
vc_n:           .quad 0
vc_skip:        .quad 0
vc_err:         .fill 8, 8, 0
vc_rip:         .fill 8, 8, 0
buf:            .fill 8, 1, 0xCC
