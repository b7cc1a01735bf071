/*
 * fault: a deliberate triple fault.  With an IDT limit of 0 no vector can be
 * delivered: #UD -> #GP (vector outside the IDT) -> #DF -> shutdown, which KVM
 * reports as KVM_EXIT_SHUTDOWN.  The harness's default handlers are bypassed
 * on purpose (they would turn the #UD into a UCALL_EXCEPTION).
 */
#define GUEST_MODE_LONG64
#include "guest.h"

GUEST_ENTRY
        lidt    empty_idt(%rip)
        ud2
        /* Not reached: ud2 always faults.  Reaching this line would mean the
         * instruction completed, which FAIL reports with this line number. */
        FAIL(1)

        .section .rodata
        .balign 8
empty_idt:
        .word   0               /* limit 0: every vector is out of bounds */
        .quad   0               /* base */
