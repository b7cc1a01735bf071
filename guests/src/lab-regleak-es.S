/*
 * lab-regleak-es: lab-regleak.S for SEV-ES guests (CPUID through #VC and the
 * GHCB page, ucalls through the GHCB).  See lab-regleak.S.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#define ES_VC_CPUID es_cpuid_ghcb
#include "sev_es.h"
#define LAB_SEV_ES

GUEST_ENTRY
        call    es_init
        jmp     lab_main
#include "lab-regleak.S"
