/*
 * snp-lab-cpuid: lab-cpuid.S's question under SEV-SNP (kvmharness lab lying-hv --mode sev-snp).
 *
 * An SNP guest takes its CPUID values from the CPUID page the firmware checked at
 * SNP_LAUNCH_UPDATE (at SNP_CPUID_GPA), not from the hypervisor's answer.  After
 * SNP_START and snp_init (snp.h) it reads, from that page, leaf 0x8000001F (EAX: SEV
 * features, EBX[5:0]: the C-bit), leaf 0x80000001 EDX (bit 27: RDTSCP) and leaf 7 EBX
 * (bit 16: AVX512F).  It accepts the feature bits (it picks its code paths from them)
 * and checks the C-bit against the measured boot page tables and against the SEV
 * information response (es_cbit), as lab-cpuid.S does.  A leaf missing from the page
 * reads as 0.
 *
 * Reports: 1 = page 0x8000001F EAX, 2 = its EBX, 3 = page 0x80000001 EDX, 4 = the
 * C-bit of the boot page tables, 6 = the SEV information C-bit, 7 = 1 if the guest
 * takes the RDTSCP path, 8 = page leaf 7 EBX, 9 = 1 if the guest takes the AVX512F
 * path, 5 = verdict bits (1 page C-bit differs from the page tables, 2 the page hides
 * SEV, 4 the SEV information C-bit differs from the page tables).  Then DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"

GUEST_ENTRY
        SNP_LAB_START

/* RSI = the CPUID page's entry for leaf EDI (subleaf 0), or 0 */
page_leaf:
        mov     SNP_CPUID_GPA, %ecx
        cmp     $64, %ecx
        jbe     1f
        mov     $64, %ecx
1:      mov     $SNP_CPUID_GPA + 16, %esi
2:      test    %ecx, %ecx
        jz      4f
        cmp     %edi, (%rsi)
        jne     3f
        cmpl    $0, 4(%rsi)
        je      5f
3:      add     $48, %rsi
        dec     %ecx
        jmp     2b
4:      xor     %esi, %esi
5:      ret

/* EAX = dword at offset EDX of leaf EDI's page entry, 0 without one */
page_reg:
        push    %rdx
        call    page_leaf
        pop     %rdx
        xor     %eax, %eax
        test    %rsi, %rsi
        jz      1f
        mov     (%rsi,%rdx), %eax
1:      ret

lab_main:
        MEASURED_C_BIT_R14
        mov     $0x8000001F, %edi
        mov     $24, %edx
        call    page_reg
        mov     %eax, %r8d              /* EAX */
        mov     $0x8000001F, %edi
        mov     $28, %edx
        call    page_reg
        mov     %eax, %r9d              /* EBX */
        mov     $0x80000001, %edi
        mov     $36, %edx
        call    page_reg
        mov     %eax, %r10d             /* EDX */
        mov     $7, %edi
        mov     $28, %edx
        call    page_reg
        mov     %eax, %r12d             /* EBX */
        ES_REPORT($1, %r8)
        ES_REPORT($2, %r9)
        ES_REPORT($3, %r10)
        ES_REPORT($4, %r14)
        ES_REPORT($8, %r12)

        xor     %r11d, %r11d            /* verdict */
        mov     %r9, %rax
        and     $0x3F, %eax
        cmp     %r14, %rax
        je      2f
        or      $1, %r11
2:      test    $2, %r8d
        jnz     3f
        or      $2, %r11
3:      mov     es_cbit(%rip), %rax
        ES_REPORT($6, %rax)
        mov     es_cbit(%rip), %rax
        cmp     %r14, %rax
        je      4f
        or      $4, %r11
4:      xor     %eax, %eax
        bt      $27, %r10d
        adc     $0, %eax
        ES_REPORT($7, %rax)
        xor     %eax, %eax
        bt      $16, %r12d
        adc     $0, %eax
        ES_REPORT($9, %rax)
        ES_REPORT($5, %r11)
        ES_DONE
