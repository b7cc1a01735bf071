/*
 * es-io: port IO and an MSR access through the GHCB page (SEV-ES).
 *
 * Every access is an explicit GHCB exchange (what a #VC handler does for
 * IN/OUT/RDMSR/WRMSR), in order:
 *   1. OUT of one byte 'A' to CONSOLE_PORT: SW_EXIT_CODE 0x7B, EXITINFO1 =
 *      port << 16 | size 8 | a64, RAX valid.
 *   2. a string OUT ("ES string OUT\n", 14 bytes) to CONSOLE_PORT through the
 *      GHCB shared buffer: EXITINFO1 with STR|REP|seg DS, EXITINFO2 = count,
 *      SW_SCRATCH = the shared buffer's GPA.
 *   3. IN of one byte from BENCH_PORT (the null device: reads 0) with RAX =
 *      0x1122334455667788 valid: KVM replaces only the low byte
 *      (complete_fast_pio_in), so RAX comes back 0x1122334455667700.
 *      REPORT key 0x7B01.
 *   4. IN of 4 bytes from BENCH_PORT, same RAX: KVM zero-extends, RAX = 0.
 *      REPORT key 0x7B04.
 *   5. WRMSR of MSR_TEST (0x40000F00, routed to userspace by the manifest's
 *      user_msrs) with 0xFEDCBA9876543210 (SW_EXIT_CODE 0x7C, EXITINFO1 = 1,
 *      RCX/RAX/RDX valid), then RDMSR (EXITINFO1 = 0, RCX valid): REPORT key
 *      0x7C00 = EDX:EAX read back.
 * Then DONE.  The console receives "AES string OUT\n".
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#define ES_VC_CPUID es_cpuid_ghcb
#include "sev_es.h"

#define MSR_TEST        0x40000F00
#define RAX_PATTERN     0x1122334455667788
#define MSR_PATTERN     0xFEDCBA9876543210

GUEST_ENTRY
        call    es_init

        /* 1. OUT 'A' to the console */
        GHCB_BEGIN
        GHCB_SET_RAX($'A')
        GHCB_SET_EXIT($SVM_EXIT_IOIO, $((CONSOLE_PORT << 16) | IOIO_SZ8 | IOIO_A64), $0)
        call    es_ghcb_exchange

        /* 2. string OUT through the shared buffer */
        lea     text(%rip), %rsi
        mov     $(GHCB_GPA + GHCB_OFF_SHARED_BUFFER), %edi
        mov     $(text_end - text), %ecx
        cld
        rep movsb
        GHCB_BEGIN
        GHCB_SET_SCRATCH($(GHCB_GPA + GHCB_OFF_SHARED_BUFFER))
        GHCB_SET_EXIT($SVM_EXIT_IOIO, $((CONSOLE_PORT << 16) | IOIO_STR | IOIO_REP | IOIO_SZ8 | IOIO_A64 | IOIO_SEG_DS), $(text_end - text))
        call    es_ghcb_exchange

        /* 3. IN of one byte: KVM keeps RAX[63:8] */
        GHCB_BEGIN
        movabs  $RAX_PATTERN, %rdx
        GHCB_SET_RAX(%rdx)
        GHCB_SET_EXIT($SVM_EXIT_IOIO, $((BENCH_PORT << 16) | IOIO_TYPE_IN | IOIO_SZ8 | IOIO_A64), $0)
        call    es_ghcb_exchange
        mov     GHCB_GPA + GHCB_OFF_RAX, %r8
        ES_REPORT($0x7B01, %r8)

        /* 4. IN of four bytes: zero-extended */
        GHCB_BEGIN
        movabs  $RAX_PATTERN, %rdx
        GHCB_SET_RAX(%rdx)
        GHCB_SET_EXIT($SVM_EXIT_IOIO, $((BENCH_PORT << 16) | IOIO_TYPE_IN | IOIO_SZ32 | IOIO_A64), $0)
        call    es_ghcb_exchange
        mov     GHCB_GPA + GHCB_OFF_RAX, %r8
        ES_REPORT($0x7B04, %r8)

        /* 5. WRMSR then RDMSR of MSR_TEST */
        GHCB_BEGIN
        GHCB_SET_RCX($MSR_TEST)
        movabs  $MSR_PATTERN, %rdx
        mov     %edx, %eax              /* EAX = low half, zero-extended */
        GHCB_SET_RAX(%rax)
        shr     $32, %rdx               /* RDX = high half */
        GHCB_SET_RDX(%rdx)
        GHCB_SET_EXIT($SVM_EXIT_MSR, $1, $0)
        call    es_ghcb_exchange
        GHCB_BEGIN
        GHCB_SET_RCX($MSR_TEST)
        GHCB_SET_EXIT($SVM_EXIT_MSR, $0, $0)
        call    es_ghcb_exchange
        mov     GHCB_GPA + GHCB_OFF_RAX, %eax
        mov     GHCB_GPA + GHCB_OFF_RDX, %edx
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %r8
        ES_REPORT($0x7C00, %r8)
        movabs  $MSR_PATTERN, %rax
        ES_EXPECT_EQ(%rax, %r8, 5)
        ES_DONE

        .section .rodata
text:   .ascii "ES string OUT\n"
text_end:
