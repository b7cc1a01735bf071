/*
 * hello: the smallest useful guest, in 16-bit real mode.
 * Entry: CS=0 IP=0x8000, DS=ES=SS=0, SP=0x7C00 (see manifest.toml).
 * Proves the console port and the DONE ucall work before anything else.
 */
#define GUEST_MODE_REAL
#include "guest.h"

GUEST_ENTRY
        /* DS=0, so the linked (absolute) address of the text is its offset. */
        PUTS("Hello from a 16-bit real-mode guest\n")
        DONE
