/*
 * hello64: hello, entered in 64-bit long mode at CPL0 (paging on, flat
 * segments, harness-built page tables).  Same console text, then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"

GUEST_ENTRY
        PUTS("Hello from a 64-bit long-mode guest\n")
        DONE
