/*
 * Assembler macros for guest images, built on the ucall contract (ucall.h).
 *
 * A guest source declares its entry mode, includes this file, then opens its
 * code with GUEST_ENTRY so that _start is the image's first byte:
 *
 *     #define GUEST_MODE_LONG64          (or GUEST_MODE_REAL)
 *     #include "guest.h"
 *     GUEST_ENTRY
 *         PUTS("hi\n")
 *         DONE
 *
 * The mode must match the manifest entry (tests/test_guest_images.py checks).
 * Sources go through the C preprocessor, so use C comments only: a line that
 * starts with '#' is a preprocessor directive.
 *
 * Register use.  Every macro clobbers AL (the ucall op).  REPORT and FAIL set
 * RBX/RCX (EBX/ECX in real mode: a real-mode guest reports 32-bit values);
 * PUTS also uses RSI, RCX and DX.  Flags are clobbered by EXPECT_EQ only.
 * Labels 7770-7779 are used inside the macros; guests should not use them.
 */
#ifndef KVMHARNESS_GUEST_H
#define KVMHARNESS_GUEST_H

#include "ucall.h"

#if defined(GUEST_MODE_REAL) + defined(GUEST_MODE_LONG64) != 1
#error "define exactly one of GUEST_MODE_REAL or GUEST_MODE_LONG64 before including guest.h"
#endif

/* Register names by mode: REPORT/FAIL arguments, and rep outsb's pointer and
 * count (16-bit address size in real mode, so SI/CX there). */
#ifdef GUEST_MODE_REAL
        .code16
#define G_BX  %ebx
#define G_CX  %ecx
#define G_SI  %si
#define G_CNT %cx
#else
        .code64
#define G_BX  %rbx
#define G_CX  %rcx
#define G_SI  %rsi
#define G_CNT %rcx
#endif

/* The entry point: flat.ld places .text.entry first, at GUEST_LOAD_ADDR. */
#define GUEST_ENTRY \
        .section .text.entry, "ax" ; .globl _start ; _start:

/* Stop for good.  The host ends the run at DONE/FAIL, so this is only reached
 * if it did not; a HLT exit is then the visible symptom, never a runaway. */
#define HALT_FOREVER \
        7770: hlt ; jmp 7770b

/* One ucall: AL = op, arguments already in RBX/RCX. */
#define UCALL(op) \
        movb $(op), %al ; outb %al, $UCALL_PORT

/* REPORT(key, value): both are operands ("$0x130", "%rax", "(%rdi)").
 * The value is moved to RCX first, so the value may be %rbx but the key must
 * not be %rcx. */
#define REPORT(key, value) \
        mov value, G_CX ; mov key, G_BX ; UCALL(UCALL_REPORT)

/* Success; does not return. */
#define DONE \
        UCALL(UCALL_DONE) ; HALT_FOREVER

/* Assertion failure: RBX = code, RCX = the source line of the FAIL.
 * Does not return. */
#define FAIL(code) \
        mov $(code), G_BX ; mov $__LINE__, G_CX ; UCALL(UCALL_FAIL) ; HALT_FOREVER

/* FAIL(code) unless the operands are equal (cmp expected, actual). */
#define EXPECT_EQ(expected, actual, code) \
        cmp expected, actual ; je 7771f ; FAIL(code) ; 7771:

/* One byte of console text. */
#define PUTC(ch) \
        movb $(ch), %al ; outb %al, $CONSOLE_PORT

/* A string literal to the console: the text goes to .rodata and one
 * rep outsb sends it (one port exit per byte). */
#define PUTS(str) \
        .pushsection .rodata ; 7772: .ascii str ; 7773: .popsection ; \
        mov $7772b, G_SI ; mov $(7773b - 7772b), G_CNT ; \
        mov $CONSOLE_PORT, %dx ; cld ; rep outsb

/* R14 = the C-bit position of the page tables the harness built and the launch measured
 * (the top set bit of BOOT_PML4[0] in bits 40-62), 0 without SEV.  Long mode; clobbers RAX,
 * RDX.  The lab guests check CPUID's C-bit against it. */
#define MEASURED_C_BIT_R14 \
        mov BOOT_PML4, %rax ; movabs $0x7FFFFF0000000000, %rdx ; and %rdx, %rax ; \
        xor %r14d, %r14d ; test %rax, %rax ; jz 7793f ; bsr %rax, %r14 ; 7793:

#endif
