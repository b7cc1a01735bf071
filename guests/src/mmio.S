/*
 * mmio: a write and a read of every size (1, 2, 4, 8 bytes) to the unbacked
 * MMIO_TEST_ADDR window, where the host's test device behaves like RAM
 * (reads return the bytes last written, initially zero).  Each access is one
 * KVM_EXIT_MMIO; a read must be completed by the host before the guest sees
 * the value.
 *
 * Layout inside the window (naturally aligned, not overlapping):
 *   +0 byte, +2 word, +4 dword, +8 qword.
 * Reports: key = access size, value = what the read returned.
 * FAIL codes: 1 the qword was not zero before any write; 2/3/4/5 the read of
 * size 1/2/4/8 differs from what was written.
 */
#define GUEST_MODE_LONG64
#include "guest.h"

GUEST_ENTRY
        /* The address must be in a register: as a 32-bit absolute
         * displacement, 0xD0000000 would be sign-extended to
         * 0xFFFFFFFFD0000000 in 64-bit mode. */
        mov     $MMIO_TEST_ADDR, %edi   /* zero-extends into RDI */

        /* Before any write the device reads as zero. */
        mov     8(%rdi), %r12
        EXPECT_EQ($0, %r12, 1)

        movb    $0xA5, 0(%rdi)
        movzbl  0(%rdi), %r12d
        REPORT($1, %r12)
        EXPECT_EQ($0xA5, %r12, 2)

        movw    $0xBEEF, 2(%rdi)
        movzwl  2(%rdi), %r12d
        REPORT($2, %r12)
        EXPECT_EQ($0xBEEF, %r12, 3)

        movl    $0xCAFEF00D, 4(%rdi)
        movl    4(%rdi), %r12d
        REPORT($4, %r12)
        mov     $0xCAFEF00D, %eax
        EXPECT_EQ(%rax, %r12, 4)

        /* No 64-bit immediate store exists: go through a register. */
        movabs  $0x1122334455667788, %rax
        movq    %rax, 8(%rdi)
        movq    8(%rdi), %r12
        REPORT($8, %r12)
        movabs  $0x1122334455667788, %rax
        EXPECT_EQ(%rax, %r12, 5)
        DONE
