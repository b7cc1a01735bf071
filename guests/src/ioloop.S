/*
 * ioloop: the exit-rate benchmark guest.  200000 OUTs to BENCH_PORT (each one
 * a KVM_EXIT_IO the host must handle), then HLT.  Real mode, so the loop is
 * just three emulated instructions per exit; the counter is 32-bit (ECX)
 * because 200000 does not fit in 16 bits.
 */
#define GUEST_MODE_REAL
#include "guest.h"

#define ITERATIONS 200000

GUEST_ENTRY
        mov     $ITERATIONS, %ecx
        xor     %al, %al
1:      outb    %al, $BENCH_PORT
        dec     %ecx
        jnz     1b
        hlt
        /* Not reached if the host stops at the HLT exit. */
        jmp     .
