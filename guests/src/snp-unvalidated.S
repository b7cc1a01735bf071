/*
 * snp-unvalidated: a private access to a page the guest never validated
 * (negative guest).  Page 0x19000 is private memory nobody PVALIDATEd: the
 * load raises #VC with error code 0x404 (page not validated) at the load's
 * RIP, before it reads anything.  snp.h's #VC handler reports the error code
 * (key 0x736e707663000000) and RIP (0x736e707663000001); snp_on_vc reports
 * the address of the load (key 0x736e700000000201) and ends with DONE.  If
 * the load completes instead, the guest FAILs with code 1.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

#define PAGE            0x19000

GUEST_ENTRY
        SNP_START
        call    snp_init
load:   mov     PAGE, %rax
        ES_FAIL(1)

snp_on_vc:
        lea     load(%rip), %rax
        ES_REPORT($0x736e700000000201, %rax)
        ES_DONE
