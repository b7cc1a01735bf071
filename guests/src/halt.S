/*
 * halt: a single HLT, for the VM lifecycle benchmark (create, run to the
 * first exit, destroy).
 */
#define GUEST_MODE_REAL
#include "guest.h"

GUEST_ENTRY
        hlt
        jmp     .
