/*
 * snp-attest: an SEV-SNP guest asks the firmware for its attestation report.
 *
 * After snp_init it makes eight pages shared with one PSC NAE event: the
 * input page (0x1A000, written by the host before the run: REPORT_DATA[64]
 * at 0, u32 VMPL at 0x40, u32 flags at 0x44, u32 certificate pages offered at
 * 0x48 (0: 4), u32 extra requests at 0x4C, u64 GUEST_FIELD_SELECT at 0x50),
 * the output page (0x1B000), the
 * request and response pages of the guest request (0x1C000, 0x1D000) and a
 * 4-page certificate buffer (0x1E000).  It takes VMPCK0 from the secrets page,
 * builds MSG_REPORT_REQ (REPORT_DATA and VMPL from the input page) in an SNP
 * guest message (snp_msg.h: header, AES-256-GCM, msg_seqno = last + 1) and
 * sends it through the GHCB: NAE 0x80000011, or with flags bit 0 the extended
 * request 0x80000012 (RAX = the certificate buffer, RBX = 4 pages).  The
 * response is checked (type MSG_REPORT_RSP, msg_seqno = request + 1, the tag)
 * and its plaintext MSG_REPORT_RSP written to the output page.
 *
 * Reports (keys 0x736e700000000400 | n):
 *   1 SW_EXIT_INFO_2 of the request (0: the firmware answered)
 *   2 the response's tag check (0: verified)   3 MSG_REPORT_RSP STATUS
 *   4 REPORT_SIZE   5 response msg_type   6 response msg_seqno
 *   7 the report's VMPL   8 REPORT_DATA[0:8]   9 MEASUREMENT[0:8]
 *   0xA extended request: RBX as KVM left it (the certificate pages)
 * then, per flag, requests the firmware must refuse, each one's SW_EXIT_INFO_2:
 *   bit 1 -> 0x11: a stale msg_seqno (the last request's again)
 *   bit 2 -> 0x12: a corrupted tag
 *   bit 3 -> 0x13: VMPCK0 wiped (an all-zero key), right msg_seqno
 *   bit 4 -> 0x14: after those, a good request again (0: the sequence resumes)
 *   bit 5 -> MSG_KEY_REQ (VCEK root, GUEST_FIELD_SELECT and VMPL from the input
 *            page): 0x16 SW_EXIT_INFO_2, 0x17 the tag check, 0x18 MSG_KEY_RSP
 *            STATUS, 0x19 / 0x1A the derived key's bytes 0-7 / 8-15 (the whole
 *            MSG_KEY_RSP at output page offset 0x800)
 * then the extra requests (a measurement: reports per second), the last one's
 * SW_EXIT_INFO_2 as 0x15, and DONE.
 */
#define GUEST_MODE_LONG64
#include "guest.h"
#include "snp.h"
#define MSG_WORK        0x17000
#include "snp_msg.h"

#define KEY(n)          (0x736e700000000400 | (n))
#define INPUT           0x1A000
#define OUTPUT          0x1B000
#define REQ             0x1C000
#define RESP            0x1D000
#define CERTS           0x1E000
#define CERT_PAGES      4
#define PAYLOAD         (MSG_WORK + 0x200)
#define SVM_VMGEXIT_GUEST_REQUEST       0x80000011
#define SVM_VMGEXIT_EXT_GUEST_REQUEST   0x80000012

GUEST_ENTRY
        SNP_START
        call    snp_init
        /* eight shared pages: one page-state change, then C=0 in the page table */
        SNP_PSC_GHCB(psc_desc)
        test    %rax, %rax
        jz      1f
        ES_FAIL(0x50)
1:      mov     es_cbit(%rip), %rcx
        mov     $(INPUT >> 12), %esi
2:      btr     %rcx, ES_PT0(,%rsi,8)
        inc     %esi
        cmp     $((CERTS >> 12) + CERT_PAGES), %esi
        jne     2b
        mov     %cr3, %rax
        mov     %rax, %cr3
        call    snp_sse_on
        mov     $(SNP_SECRETS_GPA + 0x20), %esi         /* VMPCK0 */
        call    msg_set_key

        mov     INPUT + 0x44, %eax
        mov     %eax, flags(%rip)
        mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        testl   $1, flags(%rip)
        jz      3f
        mov     $SVM_VMGEXIT_EXT_GUEST_REQUEST, %eax
3:      call    report_request
        mov     %rax, %r12
        ES_REPORT($KEY(1), %r12)
        testl   $1, flags(%rip)
        jz      3f
        mov     ext_rbx(%rip), %rax
        ES_REPORT($KEY(0xA), %rax)
3:      test    %r12, %r12
        jnz     9f
        mov     $RESP, %ebx
        cmpb    $SNP_MSG_REPORT_RSP, 0x34(%rbx)
        je      4f
        ES_FAIL(0x51)
4:      mov     $OUTPUT, %edi
        call    msg_open
        ES_REPORT($KEY(2), %rax)
        mov     OUTPUT, %eax
        ES_REPORT($KEY(3), %rax)
        mov     OUTPUT + 4, %eax
        ES_REPORT($KEY(4), %rax)
        movzbl  RESP + 0x34, %eax
        ES_REPORT($KEY(5), %rax)
        mov     RESP + 0x20, %rax
        ES_REPORT($KEY(6), %rax)
        mov     OUTPUT + 0x20 + 0x30, %eax
        ES_REPORT($KEY(7), %rax)
        mov     OUTPUT + 0x20 + 0x50, %rax
        ES_REPORT($KEY(8), %rax)
        mov     OUTPUT + 0x20 + 0x90, %rax
        ES_REPORT($KEY(9), %rax)

9:      testl   $2, flags(%rip)                 /* a stale sequence number */
        jz      5f
        subq    $2, msg_seq(%rip)
        mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        call    report_request
        addq    $2, msg_seq(%rip)
        ES_REPORT($KEY(0x11), %rax)
5:      testl   $4, flags(%rip)                 /* a corrupted tag */
        jz      6f
        movb    $1, corrupt(%rip)
        mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        call    report_request
        movb    $0, corrupt(%rip)
        ES_REPORT($KEY(0x12), %rax)
6:      testl   $16, flags(%rip)                /* the sequence goes on after refusals */
        jz      7f
        mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        call    report_request
        ES_REPORT($KEY(0x14), %rax)
7:      testl   $8, flags(%rip)                 /* VMPCK0 wiped */
        jz      8f
        lea     zero_key(%rip), %rsi
        call    msg_set_key
        mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        call    report_request
        ES_REPORT($KEY(0x13), %rax)
8:      testl   $32, flags(%rip)                /* a derived key */
        jz      12f
        movb    $1, key_req(%rip)
        mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        call    report_request
        movb    $0, key_req(%rip)
        mov     %rax, last_err(%rip)
        ES_REPORT($KEY(0x16), %rax)
        cmpq    $0, last_err(%rip)
        jne     12f
        mov     $RESP, %ebx
        mov     $(OUTPUT + 0x800), %edi
        call    msg_open
        ES_REPORT($KEY(0x17), %rax)
        mov     OUTPUT + 0x800, %eax
        ES_REPORT($KEY(0x18), %rax)
        mov     OUTPUT + 0x820, %rax
        ES_REPORT($KEY(0x19), %rax)
        mov     OUTPUT + 0x828, %rax
        ES_REPORT($KEY(0x1A), %rax)
12:     mov     INPUT + 0x4C, %eax             /* extra requests (msg_* clobber R8-R15) */
        mov     %eax, extra(%rip)
        test    %eax, %eax
        jz      10f
11:     mov     $SVM_VMGEXIT_GUEST_REQUEST, %eax
        call    report_request
        mov     %rax, last_err(%rip)
        mov     $RESP, %ebx
        mov     $OUTPUT, %edi
        call    msg_open
        decl    extra(%rip)
        jnz     11b
        mov     last_err(%rip), %rax
        ES_REPORT($KEY(0x15), %rax)
10:     ES_DONE

/* ---- report_request: EAX = the NAE exit code.  MSG_REPORT_REQ from the input page,
 * sealed with msg_seqno = msg_seq + 1; on SW_EXIT_INFO_2 = 0 msg_seq += 2.
 * Out: RAX = SW_EXIT_INFO_2 (ext_rbx = RBX from the GHCB). ---- */
report_request:
        push    %rax
        mov     $REQ, %edi                      /* header: zero, then the fields */
        mov     $(MSG_HDR_SIZE / 8), %ecx
        xor     %eax, %eax
        cld
        rep stosq
        mov     $REQ, %ebx
        mov     msg_seq(%rip), %rax
        inc     %rax
        mov     %rax, 0x20(%rbx)
        movb    $SNP_AEAD_AES_256_GCM, 0x30(%rbx)
        movb    $1, 0x31(%rbx)
        movw    $MSG_HDR_SIZE, 0x32(%rbx)
        movb    $SNP_MSG_REPORT_REQ, 0x34(%rbx)
        movb    $1, 0x35(%rbx)
        movw    $0x60, 0x36(%rbx)
        movb    $0, 0x3C(%rbx)
        mov     $PAYLOAD, %edi                  /* MSG_REPORT_REQ: REPORT_DATA, VMPL, zeros */
        mov     $12, %ecx
        xor     %eax, %eax
        rep stosq
        cmpb    $0, key_req(%rip)
        je      5f
        movb    $SNP_MSG_KEY_REQ, 0x34(%rbx)    /* MSG_KEY_REQ: VCEK root, fields, VMPL */
        movw    $0x20, 0x36(%rbx)
        mov     INPUT + 0x50, %rax
        mov     %rax, PAYLOAD + 8
        mov     INPUT + 0x40, %eax
        mov     %eax, PAYLOAD + 0x10
        jmp     6f
5:      mov     $INPUT, %esi
        mov     $PAYLOAD, %edi
        mov     $64, %ecx
        rep movsb
        mov     INPUT + 0x40, %eax
        mov     %eax, PAYLOAD + 0x40
6:      mov     $PAYLOAD, %esi
        call    msg_seal
        cmpb    $0, corrupt(%rip)
        je      1f
        xorb    $0x80, REQ + 3
1:      pop     %rdx
        push    %rdx
        GHCB_BEGIN
        pop     %rdx
        cmp     $SVM_VMGEXIT_EXT_GUEST_REQUEST, %edx
        jne     2f
        GHCB_SET_RAX($CERTS)
        mov     INPUT + 0x48, %eax
        test    %eax, %eax
        jnz     4f
        mov     $CERT_PAGES, %eax
4:      GHCB_SET_RBX(%rax)
2:      GHCB_SET_EXIT(%rdx, $REQ, $RESP)
        call    es_ghcb_exchange
        mov     GHCB_GPA + GHCB_OFF_RBX, %rax
        mov     %rax, ext_rbx(%rip)
        mov     GHCB_GPA + GHCB_OFF_SW_EXIT_INFO_2, %rax
        test    %rax, %rax
        jnz     3f
        addq    $2, msg_seq(%rip)
3:      ret

snp_on_vc:
        ES_FAIL(0x404)

        .section .data
        .balign 8
msg_seq:        .quad 0
ext_rbx:        .quad 0
flags:          .long 0
extra:          .long 0
last_err:       .quad 0
corrupt:        .byte 0
key_req:        .byte 0
        .balign 8
zero_key:       .fill 32, 1, 0
psc_desc:       /* 8 entries: 0x1A000 .. 0x21000 -> shared */
        .short  0, 7
        .long   0
        .set    gfn, INPUT >> 12
        .rept   8
        .quad   (SNP_PSC_OP_SHARED << 52) | (gfn << 12)
        .set    gfn, gfn + 1
        .endr
psc_desc_end:
