/*
 * spin: never exits, for the harness's timeout path (the host must stop the
 * vCPU after the manifest timeout and tear the VM down).
 */
#define GUEST_MODE_LONG64
#include "guest.h"

GUEST_ENTRY
        jmp     .
