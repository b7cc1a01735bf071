/*
 * fail: FAIL(7) on purpose, so the host's handling of a guest assertion
 * (code and source line) can be tested.  The line reported is the line of
 * the FAIL below in this file.
 */
#define GUEST_MODE_LONG64
#include "guest.h"

GUEST_ENTRY
        FAIL(7)
