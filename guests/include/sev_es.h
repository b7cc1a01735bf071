/*
 * SEV-ES guest runtime: GHCB MSR protocol, GHCB page exchange, page tables
 * with the C-bit, an IDT whose #VC handler (vector 29) answers CPUID, and
 * ucalls through the GHCB.  Shared by guests/src/es-*.S.
 *
 * Use (long64 guests only), after guest.h:
 *
 *     #define GUEST_MODE_LONG64
 *     #include "guest.h"
 *     #define ES_VC_CPUID es_cpuid_ghcb     (or es_cpuid_msr: how #VC answers CPUID)
 *     #include "sev_es.h"
 *     GUEST_ENTRY
 *         call es_init
 *         ES_REPORT($1, %rax)
 *         ES_DONE
 *
 * Why: under SEV-ES the hypervisor cannot see or change the guest's
 * registers.  An intercepted instruction (CPUID, IN/OUT, RDMSR/WRMSR) raises
 * #VC in the guest instead of exiting, and the guest asks the hypervisor
 * through the GHCB (docs/facts.md#facts-4, #facts-5, #facts-6b).  So guest.h's REPORT/DONE/FAIL (plain
 * OUT to UCALL_PORT) would raise #VC: use ES_REPORT/ES_DONE/ES_FAIL, which do
 * the same ucall as a GHCB IOIO OUT exchange with RAX (op), RBX and RCX
 * marked valid.  KVM copies valid GHCB registers into its register cache, so
 * the host sees the usual IoOut exit on UCALL_PORT and reads RBX/RCX there.
 *
 * es_init, in order:
 *   1. SEV information (GHCB MSR protocol 0x002): checks the response code,
 *      negotiates the protocol version (this runtime speaks 1..2), takes the
 *      C-bit position from bits 31:24.  Failure: termination request, reason
 *      set 0 code 1 (protocol range not supported).
 *   2. page tables at ES_PML4..ES_PT0: GiB 0 identity-mapped, the C-bit set on
 *      every entry (private memory) except the GHCB page's 4 KiB PTE (shared).
 *      The current mapping's data accesses must be private already (the
 *      harness's boot tables with the C-bit, or no encryption model).  Any
 *      C-bit from 32 to 63 works; a simulator whose MMU has fewer physical
 *      address bits must report one its MMU ignores (52-58), see
 *      tests/test_sev_es_guests.py.
 *   3. an IDT at ES_IDT: vector 29 -> es_vc_handler, every other vector -> a
 *      stub that ucalls UCALL_EXCEPTION (RBX = vector, 32 for vectors >= 32;
 *      RCX = faulting RIP) through the GHCB.
 *   4. the GHCB page zeroed.  It does NOT register the GHCB GPA (MSR protocol
 *      0x012): that is SNP-only and KVM terminates a non-SNP guest sending it.
 *
 * Termination reasons this runtime sends (GHCB MSR protocol 0x100):
 *   set 0 code 1   the hypervisor's protocol range excludes 1..2, or a bad SEV
 *                  information response
 *   set 1 code 4   a CPUID MSR-protocol response with the wrong code/register
 *   set 2 (kvmharness-defined) a GHCB exchange failed: code 0x80|err when
 *                  SW_EXIT_INFO_1 = 2 (err = GHCB error code, docs/facts.md#facts-4c),
 *                  0x40|vector when KVM asked for an exception (1), 0xFF
 *                  otherwise, 0x7F when KVM did not return RAX-RDX valid
 *
 * Register use: es_init preserves nothing but RSP; ES_REPORT/ES_FAIL set
 * RBX/RCX and clobber AL like REPORT/FAIL; es_cpuid_* return EAX..EDX;
 * es_ghcb_exchange clobbers RAX, RCX, RDX.  Labels 7780-7789 are used inside
 * the macros.  Only C comments: a line starting with '#' is a directive.
 */
#ifndef KVMHARNESS_SEV_ES_H
#define KVMHARNESS_SEV_ES_H

#ifndef GUEST_MODE_LONG64
#error "sev_es.h is for long64 guests"
#endif
#ifndef ES_VC_CPUID
#error "define ES_VC_CPUID (es_cpuid_msr or es_cpuid_ghcb) before including sev_es.h"
#endif

/* Guest-physical layout (above the image, which must end below 0x10000). */
#define ES_PML4          0x10000
#define ES_PDPT          0x11000
#define ES_PD0           0x12000
#define ES_PT0           0x13000     /* 4 KiB pages for the first 2 MiB */
#define ES_IDT           0x14000     /* 256 x 16-byte gates */
#define GHCB_GPA         0x15000     /* the shared GHCB page */

#define MSR_SEV_ES_GHCB  0xC0010130

/* VMGEXIT = rep vmmcall (docs/facts.md#facts-7) */
#define VMGEXIT          .byte 0xF3, 0x0F, 0x01, 0xD9

/* Write the 64-bit interrupt gate for the handler whose address is in %rax to \lo and \hi
 * (offset 15:0, selector, 0x8E00, offset 31:16, offset 63:32).  Clobbers %rax, %rcx, %rdx. */
/* One GHCB MSR protocol round trip: the request in RAX written to the GHCB MSR,
 * VMGEXIT, the response read back into EDX:EAX.  Clobbers RCX. */
.macro ghcb_msr_call
        mov     %rax, %rdx
        shr     $32, %rdx
        mov     $MSR_SEV_ES_GHCB, %ecx
        wrmsr
        VMGEXIT
        mov     $MSR_SEV_ES_GHCB, %ecx
        rdmsr
.endm

.macro write_idt_gate lo, hi
        mov     %rax, %rdx
        and     $0xFFFF, %edx
        or      $(KERNEL_CS << 16), %edx
        mov     %rax, %rcx
        shr     $16, %rcx
        and     $0xFFFF, %ecx
        shl     $48, %rcx
        or      %rcx, %rdx
        mov     $0x8E00, %ecx
        shl     $32, %rcx
        or      %rcx, %rdx
        mov     %rdx, \lo
        shr     $32, %rax
        mov     %rax, \hi
.endm

/* GHCB MSR protocol codes (docs/facts.md#facts-5) */
#define GHCB_MSR_SEV_INFO_REQ   0x002
#define GHCB_MSR_SEV_INFO_RESP  0x001
#define GHCB_MSR_CPUID_REQ      0x004
#define GHCB_MSR_CPUID_RESP     0x005
#define GHCB_MSR_TERM_REQ       0x100
#define ES_PROTOCOL_MIN         1
#define ES_PROTOCOL_MAX         2
#define ES_TERM_SET_HARNESS     2

/* GHCB page offsets (docs/facts.md#facts-4, #facts-4a) */
#define GHCB_OFF_RAX            0x1F8
#define GHCB_OFF_RCX            0x308
#define GHCB_OFF_RDX            0x310
#define GHCB_OFF_RBX            0x318
#define GHCB_OFF_SW_EXIT_CODE   0x390
#define GHCB_OFF_SW_EXIT_INFO_1 0x398
#define GHCB_OFF_SW_EXIT_INFO_2 0x3A0
#define GHCB_OFF_SW_SCRATCH     0x3A8
#define GHCB_OFF_XCR0           0x3E8
#define GHCB_OFF_VALID_BITMAP   0x3F0
#define GHCB_OFF_SHARED_BUFFER  0x800
#define GHCB_OFF_PROTOCOL_VERSION 0xFFA
#define GHCB_OFF_GHCB_USAGE     0xFFC

/* Valid-bitmap byte (within the bitmap) and bit mask of each field: bit index
 * = offset / 8, so byte = index / 8, mask = 1 << (index % 8). */
#define VB_RAX_BYTE             7
#define VB_RAX_MASK             0x80
#define VB_RCX_BYTE             12
#define VB_RCX_MASK             0x02
#define VB_RDX_BYTE             12
#define VB_RDX_MASK             0x04
#define VB_RBX_BYTE             12
#define VB_RBX_MASK             0x08
#define VB_SW_BYTE              14
#define VB_SW_EXIT_CODE_MASK    0x04
#define VB_SW_EXIT_INFO_1_MASK  0x08
#define VB_SW_EXIT_INFO_2_MASK  0x10
#define VB_SW_SCRATCH_MASK      0x20
#define VB_XCR0_BYTE            15
#define VB_XCR0_MASK            0x20

/* SW_EXIT_CODEs and IOIO EXITINFO1 bits (docs/facts.md#facts-1h, #facts-6) */
#define SVM_EXIT_CPUID          0x72
#define SVM_EXIT_IOIO           0x7B
#define SVM_EXIT_MSR            0x7C
#define IOIO_TYPE_IN            0x1
#define IOIO_STR                0x4
#define IOIO_REP                0x8
#define IOIO_SZ8                0x10
#define IOIO_SZ16               0x20
#define IOIO_SZ32               0x40
#define IOIO_A64                0x200
#define IOIO_SEG_DS             0xC00

#define X86_TRAP_VC             29
/* vectors that push an error code: 8, 10-14, 17, 21, 29, 30 */
#define ERROR_CODE_VECTOR_MASK  0x60227D00

/* ---- GHCB field helpers (src: a register or an immediate below 2^31) ---- */
#define GHCB_MARK(byte, mask)   orb $(mask), GHCB_GPA + GHCB_OFF_VALID_BITMAP + byte
#define GHCB_SET_RAX(src)       movq src, GHCB_GPA + GHCB_OFF_RAX ; GHCB_MARK(VB_RAX_BYTE, VB_RAX_MASK)
#define GHCB_SET_RBX(src)       movq src, GHCB_GPA + GHCB_OFF_RBX ; GHCB_MARK(VB_RBX_BYTE, VB_RBX_MASK)
#define GHCB_SET_RCX(src)       movq src, GHCB_GPA + GHCB_OFF_RCX ; GHCB_MARK(VB_RCX_BYTE, VB_RCX_MASK)
#define GHCB_SET_RDX(src)       movq src, GHCB_GPA + GHCB_OFF_RDX ; GHCB_MARK(VB_RDX_BYTE, VB_RDX_MASK)
#define GHCB_SET_XCR0(src)      movq src, GHCB_GPA + GHCB_OFF_XCR0 ; GHCB_MARK(VB_XCR0_BYTE, VB_XCR0_MASK)
#define GHCB_SET_SCRATCH(src)   movq src, GHCB_GPA + GHCB_OFF_SW_SCRATCH ; GHCB_MARK(VB_SW_BYTE, VB_SW_SCRATCH_MASK)
/* SW_EXIT_CODE, SW_EXIT_INFO_1, SW_EXIT_INFO_2, all marked valid */
#define GHCB_SET_EXIT(code, info1, info2) \
        movq code, GHCB_GPA + GHCB_OFF_SW_EXIT_CODE ; \
        movq info1, GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_1 ; \
        movq info2, GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_2 ; \
        GHCB_MARK(VB_SW_BYTE, VB_SW_EXIT_CODE_MASK | VB_SW_EXIT_INFO_1_MASK | VB_SW_EXIT_INFO_2_MASK)

/* Start a request: empty valid bitmap, protocol version, usage 0.  Clobbers AX. */
#define GHCB_BEGIN \
        movq $0, GHCB_GPA + GHCB_OFF_VALID_BITMAP ; \
        movq $0, GHCB_GPA + GHCB_OFF_VALID_BITMAP + 8 ; \
        movw es_version(%rip), %ax ; movw %ax, GHCB_GPA + GHCB_OFF_PROTOCOL_VERSION ; \
        movl $0, GHCB_GPA + GHCB_OFF_GHCB_USAGE

/* ---- ucalls through the GHCB (see the header comment) ---- */
#define ES_HALT \
        7780: hlt ; jmp 7780b
#define ES_UCALL(op) \
        movb $(op), %al ; call es_ucall
#define ES_REPORT(key, value) \
        mov value, %rcx ; mov key, %rbx ; ES_UCALL(UCALL_REPORT)
#define ES_DONE \
        ES_UCALL(UCALL_DONE) ; ES_HALT
#define ES_FAIL(code) \
        mov $(code), %rbx ; mov $__LINE__, %rcx ; ES_UCALL(UCALL_FAIL) ; ES_HALT
#define ES_EXPECT_EQ(expected, actual, code) \
        cmp expected, actual ; je 7781f ; ES_FAIL(code) ; 7781:

/* GHCB MSR protocol termination request; does not return. */
#define ES_TERMINATE(set, code) \
        mov $((((code) & 0xFF) << 16) | (((set) & 0xF) << 12) | GHCB_MSR_TERM_REQ), %eax ; \
        xor %edx, %edx ; mov $MSR_SEV_ES_GHCB, %ecx ; wrmsr ; VMGEXIT ; ES_HALT

        .section .data
        .balign 8
es_cbit:        .quad 0         /* C-bit position from the SEV information response */
es_version:     .quad 0         /* negotiated GHCB protocol version */

        .text
/* ---- es_init: see the header comment.  Clobbers every GPR but RSP. ---- */
es_init:
        /* 1. SEV information request: MSR protocol, registers only */
        mov     $MSR_SEV_ES_GHCB, %ecx
        mov     $GHCB_MSR_SEV_INFO_REQ, %eax
        xor     %edx, %edx
        wrmsr
        VMGEXIT
        mov     $MSR_SEV_ES_GHCB, %ecx
        rdmsr                           /* EDX = max:min versions, EAX[31:24] = C-bit */
        mov     %eax, %esi
        and     $0xFFF, %esi
        cmp     $GHCB_MSR_SEV_INFO_RESP, %esi
        jne     es_init_bad_protocol
        mov     %edx, %esi
        shr     $16, %esi               /* hypervisor's maximum */
        mov     %edx, %edi
        and     $0xFFFF, %edi           /* hypervisor's minimum */
        cmp     $ES_PROTOCOL_MAX, %esi
        jbe     1f
        mov     $ES_PROTOCOL_MAX, %esi  /* negotiated = min(hv max, ours) */
1:      cmp     %edi, %esi
        jb      es_init_bad_protocol    /* below the hypervisor's minimum */
        cmp     $ES_PROTOCOL_MIN, %esi
        jb      es_init_bad_protocol
        mov     %rsi, es_version(%rip)
        shr     $24, %eax
        and     $0x3F, %eax
        cmp     $32, %eax               /* a C-bit below 32 would overlap the RAM addresses */
        jb      es_init_bad_protocol
        mov     %rax, es_cbit(%rip)

        /* 2. page tables: zero all four, then fill */
        mov     $ES_PML4, %edi
        mov     $(4 * 512), %ecx
        xor     %eax, %eax
        cld
        rep stosq
        mov     es_cbit(%rip), %rcx
        mov     $1, %r8d
        shl     %cl, %r8                /* R8 = the C-bit mask */
        xor     %esi, %esi              /* PT0: 4 KiB pages, shared only at GHCB_GPA */
2:      mov     %rsi, %rax
        shl     $12, %rax
        or      $0x3, %rax              /* P | RW */
        cmp     $(GHCB_GPA >> 12), %esi
        je      3f
        or      %r8, %rax
3:      mov     %rax, ES_PT0(,%rsi,8)
        inc     %esi
        cmp     $512, %esi
        jne     2b
        mov     $(ES_PT0 | 0x3), %eax   /* PD0[0] -> PT0, PD0[1..511]: 2 MiB pages */
        or      %r8, %rax
        mov     %rax, ES_PD0
        mov     $1, %esi
4:      mov     %rsi, %rax
        shl     $21, %rax
        or      $0x83, %rax             /* P | RW | PS */
        or      %r8, %rax
        mov     %rax, ES_PD0(,%rsi,8)
        inc     %esi
        cmp     $512, %esi
        jne     4b
        mov     $(ES_PD0 | 0x3), %eax
        or      %r8, %rax
        mov     %rax, ES_PDPT
        mov     $(ES_PDPT | 0x3), %eax
        or      %r8, %rax
        mov     %rax, ES_PML4
        mov     $ES_PML4, %eax
        mov     %rax, %cr3              /* not intercepted; flushes the TLB */

        /* 3. IDT: vector 29 -> es_vc_handler, others -> es_exc_stubs */
        mov     $ES_IDT, %edi
        xor     %esi, %esi
5:      cmp     $X86_TRAP_VC, %esi
        jne     6f
        lea     es_vc_handler(%rip), %rax
        jmp     8f
6:      mov     %rsi, %rax
        cmp     $32, %esi
        jb      7f
        mov     $32, %eax               /* vectors >= 32 share stub 32 */
7:      shl     $3, %rax
        lea     es_exc_stubs(%rip), %rdx
        add     %rdx, %rax
8:      write_idt_gate (%rdi), 8(%rdi)
        add     $16, %rdi
        inc     %esi
        cmp     $256, %esi
        jne     5b
        sub     $16, %rsp
        movw    $(256 * 16 - 1), (%rsp)
        movq    $ES_IDT, 2(%rsp)
        lidt    (%rsp)
        add     $16, %rsp

        /* 4. the GHCB page, now shared: zero it */
        mov     $GHCB_GPA, %edi
        mov     $512, %ecx
        xor     %eax, %eax
        rep stosq
        ret

es_init_bad_protocol:
        ES_TERMINATE(0, 1)

/* ---- es_ghcb_exchange: GHCB MSR := GHCB_GPA, VMGEXIT, check SW_EXIT_INFO_1.
 * Clobbers RAX, RCX, RDX.  Terminates (set 2) when the hypervisor reports an
 * error or an exception. ---- */
es_ghcb_exchange:
        mov     $MSR_SEV_ES_GHCB, %ecx
        mov     $GHCB_GPA, %eax
        xor     %edx, %edx
        wrmsr
        VMGEXIT
        mov     GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_1, %eax
        test    %eax, %eax
        jnz     es_ghcb_failed
        ret
es_ghcb_failed:
        mov     GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_2, %rdx
        cmp     $2, %eax
        jne     1f
        and     $0x7F, %edx
        or      $0x80, %edx
        jmp     3f
1:      cmp     $1, %eax
        jne     2f
        and     $0x3F, %edx
        or      $0x40, %edx
        jmp     3f
2:      mov     $0xFF, %edx
3:      shl     $16, %edx
        or      $((ES_TERM_SET_HARNESS << 12) | GHCB_MSR_TERM_REQ), %edx
        mov     %edx, %eax
        xor     %edx, %edx
        mov     $MSR_SEV_ES_GHCB, %ecx
        wrmsr
        VMGEXIT
        ES_HALT

/* ---- es_ucall: AL = op, RBX/RCX = arguments; a GHCB IOIO OUT of one byte
 * to UCALL_PORT with RAX, RBX, RCX valid.  Preserves every register. ---- */
es_ucall:
        push    %rax
        push    %rcx
        push    %rdx
        movzbl  %al, %edx
        GHCB_BEGIN
        GHCB_SET_RAX(%rdx)
        GHCB_SET_RBX(%rbx)
        GHCB_SET_RCX(%rcx)
        GHCB_SET_EXIT($SVM_EXIT_IOIO, $((UCALL_PORT << 16) | IOIO_SZ8 | IOIO_A64), $0)
        call    es_ghcb_exchange
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

/* ---- es_cpuid_msr: CPUID through the MSR protocol, one request per register.
 * In: EAX = function (the protocol has no subleaf: ECX is ignored, KVM uses 0).
 * Out: EAX, EBX, ECX, EDX (zero-extended).  Terminates (set 1 code 4) on a bad
 * response. ---- */
es_cpuid_msr:
        push    %rsi
        push    %rdi
        push    %r9
        mov     %eax, %esi              /* function */
        xor     %edi, %edi              /* register 0..3 */
1:      mov     %rsi, %rax
        shl     $32, %rax
        mov     %rdi, %rdx
        shl     $30, %rdx
        or      %rdx, %rax
        or      $GHCB_MSR_CPUID_REQ, %rax
        ghcb_msr_call                   /* EDX = the value, EAX = code | register echo */
        mov     %eax, %r9d
        and     $0xFFF, %r9d
        cmp     $GHCB_MSR_CPUID_RESP, %r9d
        jne     es_cpuid_msr_bad
        mov     %eax, %r9d
        shr     $30, %r9d
        cmp     %edi, %r9d
        jne     es_cpuid_msr_bad
        push    %rdx
        inc     %edi
        cmp     $4, %edi
        jne     1b
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        pop     %r9
        pop     %rdi
        pop     %rsi
        ret
es_cpuid_msr_bad:
        ES_TERMINATE(1, 4)

/* ---- es_cpuid_ghcb: CPUID through the GHCB page (SW_EXIT_CODE 0x72, RAX and
 * RCX valid; XCR0 too for leaf 0xD).  In: EAX = function, ECX = index.
 * Out: EAX, EBX, ECX, EDX. ---- */
es_cpuid_ghcb:
        push    %rsi
        push    %rdi
        mov     %eax, %esi
        mov     %ecx, %edi
        GHCB_BEGIN
        GHCB_SET_RAX(%rsi)
        GHCB_SET_RCX(%rdi)
        cmp     $0xD, %esi
        jne     1f
        GHCB_SET_XCR0($1)               /* x87 only: the harness leaves CR4.OSXSAVE clear */
1:      GHCB_SET_EXIT($SVM_EXIT_CPUID, $0, $0)
        call    es_ghcb_exchange
        movzbl  GHCB_GPA + GHCB_OFF_VALID_BITMAP + VB_RAX_BYTE, %eax
        and     $VB_RAX_MASK, %eax
        jz      es_cpuid_ghcb_bad
        movzbl  GHCB_GPA + GHCB_OFF_VALID_BITMAP + VB_RBX_BYTE, %eax
        and     $(VB_RBX_MASK | VB_RCX_MASK | VB_RDX_MASK), %eax
        cmp     $(VB_RBX_MASK | VB_RCX_MASK | VB_RDX_MASK), %eax
        jne     es_cpuid_ghcb_bad
        mov     GHCB_GPA + GHCB_OFF_RAX, %eax
        mov     GHCB_GPA + GHCB_OFF_RBX, %ebx
        mov     GHCB_GPA + GHCB_OFF_RCX, %ecx
        mov     GHCB_GPA + GHCB_OFF_RDX, %edx
        pop     %rdi
        pop     %rsi
        ret
es_cpuid_ghcb_bad:
        ES_TERMINATE(ES_TERM_SET_HARNESS, 0x7F)

/* ---- #VC handler: frame = error code (the exit code), RIP, CS, RFLAGS, RSP, SS.
 * CPUID (0x72) is answered by ES_VC_CPUID and skipped (2 bytes); any other
 * #VC is reported as an exception (RBX = 29, RCX = RIP). ---- */
es_vc_handler:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        cmpq    $SVM_EXIT_CPUID, 32(%rsp)
        jne     1f
        mov     24(%rsp), %rax          /* the guest's EAX (function) */
        mov     8(%rsp), %rcx           /* the guest's ECX (index) */
        call    ES_VC_CPUID
        mov     %rax, 24(%rsp)
        mov     %rbx, 16(%rsp)
        mov     %rcx, 8(%rsp)
        mov     %rdx, 0(%rsp)
        addq    $2, 40(%rsp)            /* CPUID is 0F A2 */
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        add     $8, %rsp                /* the error code */
        iretq
1:      mov     40(%rsp), %rcx
        mov     $X86_TRAP_VC, %ebx
        ES_UCALL(UCALL_EXCEPTION)
        ES_HALT

/* ---- exception stubs: 8 bytes each, stub N pushes N (32 = "vector >= 32") ---- */
        .balign 8
es_exc_stubs:
        .set    es_vec, 0
        .rept   33
        .balign 8
        push    $es_vec
        jmp     es_exception
        .set    es_vec, es_vec + 1
        .endr
es_exception:
        pop     %rbx                    /* vector */
        mov     $ERROR_CODE_VECTOR_MASK, %eax
        cmp     $32, %ebx
        jae     1f
        bt      %ebx, %eax
        jnc     1f
        add     $8, %rsp                /* drop the error code */
1:      mov     (%rsp), %rcx            /* faulting RIP */
        ES_UCALL(UCALL_EXCEPTION)
        ES_HALT

#endif
