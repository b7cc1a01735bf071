/*
 * The body of the snp-ap guests (guests/src/snp-ap.S and snp-ap-novmsa.S; snp-ap.S says
 * what it does), included right after their GUEST_ENTRY, with guest.h and snp.h before.
 * SNP_AP_VMSA_ATTRS (RMPADJUST's RDX for the AP's VMSA page) may be defined first.
 * Only C comments.
 */
#ifndef KVMHARNESS_SNP_AP_H
#define KVMHARNESS_SNP_AP_H

#define KEY(n)                  (0x736e706100000000 | (n))
#define AP_VMSA                 0x19000     /* not 2 MiB aligned (KVM refuses those) */
#define AP_GHCB                 0x1A000
#define AP_STACK                0x1B000
#define AP_FLAG                 SNP_DATA_GPA
#define AP_APIC_ID              1
#define SVM_VMGEXIT_AP_CREATION 0x80000013
#define SVM_VMGEXIT_AP_CREATE   1
#ifndef SNP_AP_VMSA_ATTRS
#define SNP_AP_VMSA_ATTRS       0x10101     /* VMSA bit | read (perms << 8) | target VMPL 1 */
#endif
#define SPIN_LIMIT              0x2000000
#define AP_EFER                 0x1D01      /* SVME | NXE | LMA | LME | SCE */
#define SEG_CODE64              0xA9B       /* VMCB attrib: G L P S type 0xB */
#define SEG_DATA                0xC93       /* G DB P S type 3 */

/* VMSA offsets (struct sev_es_save_area) */
#define V_ES 0x00
#define V_CS 0x10
#define V_SS 0x20
#define V_DS 0x30
#define V_FS 0x40
#define V_GS 0x50
#define V_GDTR 0x60
#define V_LDTR 0x70
#define V_IDTR 0x80
#define V_TR 0x90
#define V_EFER 0xD0
#define V_CR4 0x148
#define V_CR3 0x150
#define V_CR0 0x158
#define V_DR7 0x160
#define V_DR6 0x168
#define V_RFLAGS 0x170
#define V_RIP 0x178
#define V_G_PAT 0x268
#define V_RSP 0x1D8
#define V_SEV_FEATURES 0x3B0
#define V_XCR0 0x3E8

/* one segment record: selector from `sreg`, attrib, limit 4 GiB, base 0 */
#define VMSA_SEG(off, sreg, attrib) \
        mov sreg, %ax ; movw %ax, AP_VMSA + off ; movw $(attrib), AP_VMSA + off + 2 ; \
        movl $0xFFFFFFFF, AP_VMSA + off + 4

#define AP_MARK(byte, mask)     orb $(mask), AP_GHCB + GHCB_OFF_VALID_BITMAP + byte

        SNP_START
        call    snp_init

        /* the AP's VMSA and stack pages: private and validated */
        SNP_PVALIDATE(AP_VMSA, 1)
        test    %eax, %eax
        jnz     snp_validate_failed
        SNP_PVALIDATE(AP_STACK, 1)
        test    %eax, %eax
        jnz     snp_validate_failed
        /* the AP's GHCB page: shared, mapped C=0 */
        mov     $(AP_GHCB >> 12), %r8d
        snp_psc_msr %r8, SNP_PSC_OP_SHARED
        test    %edx, %edx
        jz      1f
        ES_TERMINATE(ES_TERM_SET_HARNESS, 0x31)
1:      mov     es_cbit(%rip), %rcx
        btr     %rcx, ES_PT0 + 8 * (AP_GHCB >> 12)
        mov     %cr3, %rax
        mov     %rax, %cr3
        movq    $0, AP_FLAG

        /* SEV_FEATURES as Linux derives them: SEV_STATUS >> 2 */
        mov     $MSR_SEV_STATUS, %ecx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        shr     $2, %rax
        mov     %rax, %r12

        /* the AP's VMSA */
        mov     $AP_VMSA, %edi
        xor     %eax, %eax
        mov     $512, %ecx
        cld
        rep stosq
        VMSA_SEG(V_CS, %cs, SEG_CODE64)
        VMSA_SEG(V_SS, %ss, SEG_DATA)
        VMSA_SEG(V_DS, %ds, SEG_DATA)
        VMSA_SEG(V_ES, %es, SEG_DATA)
        VMSA_SEG(V_FS, %fs, SEG_DATA)
        VMSA_SEG(V_GS, %gs, SEG_DATA)
        sgdt    dtr_buf(%rip)
        movzwl  dtr_buf(%rip), %eax
        mov     %eax, AP_VMSA + V_GDTR + 4
        mov     dtr_buf + 2(%rip), %rax
        mov     %rax, AP_VMSA + V_GDTR + 8
        sidt    dtr_buf(%rip)
        movzwl  dtr_buf(%rip), %eax
        mov     %eax, AP_VMSA + V_IDTR + 4
        mov     dtr_buf + 2(%rip), %rax
        mov     %rax, AP_VMSA + V_IDTR + 8
        movw    $0x82, AP_VMSA + V_LDTR + 2
        movl    $0xFFFF, AP_VMSA + V_LDTR + 4
        movw    $0x8B, AP_VMSA + V_TR + 2
        movl    $0xFFFF, AP_VMSA + V_TR + 4
        movq    $AP_EFER, AP_VMSA + V_EFER
        mov     %cr0, %rax
        mov     %rax, AP_VMSA + V_CR0
        mov     %cr3, %rax
        mov     %rax, AP_VMSA + V_CR3
        mov     %cr4, %rax
        mov     %rax, AP_VMSA + V_CR4
        movq    $0x400, AP_VMSA + V_DR7
        mov     $0xFFFF0FF0, %eax
        mov     %rax, AP_VMSA + V_DR6
        movq    $2, AP_VMSA + V_RFLAGS
        lea     ap_entry(%rip), %rax
        mov     %rax, AP_VMSA + V_RIP
        movq    $(AP_STACK + 0x1000), AP_VMSA + V_RSP
        movabs  $0x0007040600070406, %rax
        mov     %rax, AP_VMSA + V_G_PAT
        mov     %r12, AP_VMSA + V_SEV_FEATURES
        movq    $1, AP_VMSA + V_XCR0

        /* RMPADJUST: the page becomes a VMSA (from VMPL0) */
        mov     $AP_VMSA, %eax
        xor     %ecx, %ecx
        mov     $SNP_AP_VMSA_ATTRS, %edx
        RMPADJUST
        ES_REPORT($KEY(1), %rax)

        /* AP_CREATE through the GHCB */
        GHCB_BEGIN
        GHCB_SET_RAX(%r12)
        mov     $SVM_VMGEXIT_AP_CREATION, %eax
        movabs  $((AP_APIC_ID << 32) | SVM_VMGEXIT_AP_CREATE), %rdx
        GHCB_SET_EXIT(%rax, %rdx, $AP_VMSA)
        mov     $MSR_SEV_ES_GHCB, %ecx
        mov     $GHCB_GPA, %eax
        xor     %edx, %edx
        wrmsr
        VMGEXIT
        mov     GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_1, %rax
        mov     GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_2, %r13
        ES_REPORT($KEY(2), %rax)
        ES_REPORT($KEY(3), %r13)

        /* wait for the AP */
        mov     $SPIN_LIMIT, %ecx
2:      cmpq    $0, AP_FLAG
        jne     3f
        dec     %rcx
        jnz     2b
3:      mov     AP_FLAG, %rax
        ES_REPORT($KEY(4), %rax)
        ES_DONE

/* ---- the AP: 64-bit, from the VMSA above ---- */
ap_entry:
        movabs  $((1 << 32) | (1 << 30) | GHCB_MSR_CPUID_REQ), %rax
        ghcb_msr_call
        and     $0xFFF, %eax
        cmp     $GHCB_MSR_CPUID_RESP, %eax
        je      1f
        ES_TERMINATE(ES_TERM_SET_HARNESS, 0x40)
1:      shr     $24, %edx
        mov     %edx, %r12d
        /* this vCPU's GHCB */
        GHCB_MSR_REGISTER(AP_GHCB, 0x41)
        /* report the APIC ID: a GHCB IOIO OUT to UCALL_PORT through AP_GHCB */
        movq    $0, AP_GHCB + GHCB_OFF_VALID_BITMAP
        movq    $0, AP_GHCB + GHCB_OFF_VALID_BITMAP + 8
        movw    es_version(%rip), %ax
        movw    %ax, AP_GHCB + GHCB_OFF_PROTOCOL_VERSION
        movl    $0, AP_GHCB + GHCB_OFF_GHCB_USAGE
        movq    $UCALL_REPORT, AP_GHCB + GHCB_OFF_RAX
        AP_MARK(VB_RAX_BYTE, VB_RAX_MASK)
        movabs  $KEY(0x10), %rax
        mov     %rax, AP_GHCB + GHCB_OFF_RBX
        AP_MARK(VB_RBX_BYTE, VB_RBX_MASK)
        mov     %r12, AP_GHCB + GHCB_OFF_RCX
        AP_MARK(VB_RCX_BYTE, VB_RCX_MASK)
        movq    $SVM_EXIT_IOIO, AP_GHCB + GHCB_OFF_SW_EXIT_CODE
        movq    $((UCALL_PORT << 16) | IOIO_SZ8 | IOIO_A64), AP_GHCB + GHCB_OFF_SW_EXIT_INFO_1
        movq    $0, AP_GHCB + GHCB_OFF_SW_EXIT_INFO_2
        AP_MARK(VB_SW_BYTE, VB_SW_EXIT_CODE_MASK | VB_SW_EXIT_INFO_1_MASK | VB_SW_EXIT_INFO_2_MASK)
        mov     $MSR_SEV_ES_GHCB, %ecx
        mov     $AP_GHCB, %eax
        xor     %edx, %edx
        wrmsr
        VMGEXIT
        cmpl    $0, AP_GHCB + GHCB_OFF_SW_EXIT_INFO_1
        je      3f
        ES_TERMINATE(ES_TERM_SET_HARNESS, 0x42)
3:      or      $0x100, %r12
        mov     %r12, AP_FLAG
4:      hlt
        jmp     4b

snp_on_vc:
        ES_FAIL(0x404)

        .section .data
        .balign 8
dtr_buf:        .quad 0, 0

#endif
