/*
 * es-terminate: an SEV-ES guest asks to be terminated.
 *
 * After es_init (protocol negotiation, shared GHCB), one REPORT (key 1 = the
 * negotiated GHCB protocol version), then the GHCB MSR protocol termination
 * request (0x100) with reason set 1 (Linux guest-specific) and reason code 3
 * ("not running at VMPL0"): MSR value 0x31100.  KVM answers with
 * KVM_EXIT_SYSTEM_EVENT / KVM_SYSTEM_EVENT_SEV_TERM and data[0] = 0x31100,
 * which the harness reports as SevTermination(reason_set=1, reason_code=3).
 * The guest never runs again; the HLT after the request is never reached.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#define ES_VC_CPUID es_cpuid_msr
#include "sev_es.h"

#define REASON_SET   1
#define REASON_CODE  3

GUEST_ENTRY
        call    es_init
        mov     es_version(%rip), %r8
        ES_REPORT($1, %r8)
        ES_TERMINATE(REASON_SET, REASON_CODE)
