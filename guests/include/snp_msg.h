/*
 * SEV-SNP guest messages (the SNP firmware ABI's guest-request protocol) for
 * guests/src/snp-attest.S: AES-256-GCM with AES-NI, written for this harness.
 *
 * A message is a 0x60-byte header followed by the encrypted payload (the
 * kernel's struct snp_guest_msg_hdr, drivers/virt/coco/sev-guest/sev-guest.h):
 *   0x00 authtag[32] (the 16-byte GCM tag, then zeros)   0x20 u64 msg_seqno
 *   0x28 reserved[8]   0x30 u8 algo (1 = AES-256-GCM)   0x31 u8 hdr_version (1)
 *   0x32 u16 hdr_sz (0x60)   0x34 u8 msg_type   0x35 u8 msg_version (1)
 *   0x36 u16 msg_sz   0x38 u32 reserved   0x3C u8 msg_vmpck   0x3D reserved[35]
 * AES-256-GCM under VMPCK[msg_vmpck] (the secrets page), IV = the 8 bytes of
 * msg_seqno then 4 zero bytes, AAD = header bytes 0x30..0x5F (48 bytes).
 *
 * Data (16-byte aligned, private): MSG_WORK .. MSG_WORK + 0x200, see below.
 * Every function clobbers RAX, RCX, RDX, RSI, RDI, R8-R15 and XMM0-XMM4 unless
 * it says otherwise.  SSE must be on (snp_sse_on: CR4.OSFXSR/OSXMMEXCPT).
 */
#ifndef KVMHARNESS_SNP_MSG_H
#define KVMHARNESS_SNP_MSG_H

#ifndef MSG_WORK
#error "define MSG_WORK (a validated private page, 16-byte aligned) before snp_msg.h"
#endif

#define MSG_RK          (MSG_WORK + 0x000)   /* 15 AES-256 round keys */
#define MSG_H           (MSG_WORK + 0x100)   /* hash key: hi, lo (big-endian values) */
#define MSG_ACC         (MSG_WORK + 0x110)   /* GHASH accumulator: hi, lo */
#define MSG_J0          (MSG_WORK + 0x120)   /* pre-counter block J0 (bytes) */
#define MSG_CTR         (MSG_WORK + 0x130)   /* counter block (bytes) */
#define MSG_TMP         (MSG_WORK + 0x140)   /* one block of scratch */
#define MSG_TAG         (MSG_WORK + 0x150)   /* the tag just computed */

#define MSG_HDR_SIZE    0x60
#define MSG_AAD_OFF     0x30
#define MSG_AAD_LEN     48
#define SNP_MSG_KEY_REQ         3
#define SNP_MSG_REPORT_REQ      5
#define SNP_MSG_REPORT_RSP      6
#define SNP_AEAD_AES_256_GCM    1

/* ---- snp_sse_on: CR4.OSFXSR | OSXMMEXCPT (the boot state leaves CR0.EM clear).
 * Clobbers RAX. ---- */
snp_sse_on:
        mov     %cr4, %rax
        or      $0x600, %rax
        mov     %rax, %cr4
        ret

/* key expansion helpers: XMM1 = even key, XMM3 = odd key, XMM2 = AESKEYGENASSIST output */
.macro msg_rk_even rcon, slot
        aeskeygenassist $\rcon, %xmm3, %xmm2
        pshufd  $0xFF, %xmm2, %xmm2
        movdqa  %xmm1, %xmm4
        pslldq  $4, %xmm4
        pxor    %xmm4, %xmm1
        pslldq  $4, %xmm4
        pxor    %xmm4, %xmm1
        pslldq  $4, %xmm4
        pxor    %xmm4, %xmm1
        pxor    %xmm2, %xmm1
        movdqa  %xmm1, MSG_RK + 16 * \slot
.endm
.macro msg_rk_odd slot
        aeskeygenassist $0, %xmm1, %xmm2
        pshufd  $0xAA, %xmm2, %xmm2
        movdqa  %xmm3, %xmm4
        pslldq  $4, %xmm4
        pxor    %xmm4, %xmm3
        pslldq  $4, %xmm4
        pxor    %xmm4, %xmm3
        pslldq  $4, %xmm4
        pxor    %xmm4, %xmm3
        pxor    %xmm2, %xmm3
        movdqa  %xmm3, MSG_RK + 16 * \slot
.endm

/* ---- msg_set_key: RSI -> the 32-byte key.  Round keys, then H = E(K, 0). ---- */
msg_set_key:
        movdqu  (%rsi), %xmm1
        movdqu  16(%rsi), %xmm3
        movdqa  %xmm1, MSG_RK
        movdqa  %xmm3, MSG_RK + 16
        msg_rk_even 0x01, 2
        msg_rk_odd 3
        msg_rk_even 0x02, 4
        msg_rk_odd 5
        msg_rk_even 0x04, 6
        msg_rk_odd 7
        msg_rk_even 0x08, 8
        msg_rk_odd 9
        msg_rk_even 0x10, 10
        msg_rk_odd 11
        msg_rk_even 0x20, 12
        msg_rk_odd 13
        msg_rk_even 0x40, 14
        pxor    %xmm0, %xmm0
        call    msg_aes
        movdqa  %xmm0, MSG_TMP
        mov     MSG_TMP, %rax
        bswap   %rax
        mov     %rax, MSG_H
        mov     MSG_TMP + 8, %rax
        bswap   %rax
        mov     %rax, MSG_H + 8
        ret

/* ---- msg_aes: XMM0 = AES-256 encryption of XMM0.  Clobbers XMM1, RCX. ---- */
msg_aes:
        pxor    MSG_RK, %xmm0
        mov     $MSG_RK + 16, %ecx
1:      movdqa  (%rcx), %xmm1
        aesenc  %xmm1, %xmm0
        add     $16, %ecx
        cmp     $MSG_RK + 16 * 14, %ecx
        jne     1b
        movdqa  (%rcx), %xmm1
        aesenclast %xmm1, %xmm0
        ret

/* ---- msg_gmul: (R8 hi, R9 lo) := (R8, R9) * H in GF(2^128), NIST SP 800-38D
 * Algorithm 1 bit by bit.  Clobbers RAX, RCX, R10-R14. ---- */
msg_gmul:
        xor     %r10d, %r10d
        xor     %r11d, %r11d
        mov     MSG_H, %r12
        mov     MSG_H + 8, %r13
        movabs  $0xE100000000000000, %r14
        mov     $128, %ecx
1:      test    %r8, %r8
        jns     2f
        xor     %r12, %r10
        xor     %r13, %r11
2:      shld    $1, %r9, %r8
        shl     $1, %r9
        shrd    $1, %r12, %r13
        setc    %al
        shr     $1, %r12
        test    %al, %al
        jz      3f
        xor     %r14, %r12
3:      dec     %ecx
        jnz     1b
        mov     %r10, %r8
        mov     %r11, %r9
        ret

/* ---- msg_ghash: absorb RCX bytes at RSI into the accumulator (the last partial
 * block zero-padded).  Clobbers RAX, RCX, RDX, RSI, RDI, R8-R14. ---- */
msg_ghash:
        mov     %rcx, %rdx
1:      test    %rdx, %rdx
        jz      4f
        movq    $0, MSG_TMP
        movq    $0, MSG_TMP + 8
        mov     $16, %ecx
        cmp     %rcx, %rdx
        jae     2f
        mov     %rdx, %rcx
2:      sub     %rcx, %rdx
        mov     $MSG_TMP, %edi
        cld
        rep movsb
        mov     MSG_TMP, %r8
        bswap   %r8
        mov     MSG_TMP + 8, %r9
        bswap   %r9
        xor     MSG_ACC, %r8
        xor     MSG_ACC + 8, %r9
        push    %rdx
        push    %rsi
        call    msg_gmul
        pop     %rsi
        pop     %rdx
        mov     %r8, MSG_ACC
        mov     %r9, MSG_ACC + 8
        jmp     1b
4:      ret

/* ---- msg_ctr: XOR RCX bytes from RSI into RDI with the keystream from
 * inc32(J0) on (GCTR).  Clobbers RAX, RCX, RDX, RSI, RDI, XMM0, XMM1. ---- */
msg_ctr:
        movdqa  MSG_J0, %xmm0
        movdqa  %xmm0, MSG_CTR
        mov     %rcx, %rdx
1:      test    %rdx, %rdx
        jz      4f
        mov     MSG_CTR + 12, %eax
        bswap   %eax
        inc     %eax
        bswap   %eax
        mov     %eax, MSG_CTR + 12
        movdqa  MSG_CTR, %xmm0
        push    %rcx
        call    msg_aes
        pop     %rcx
        movdqa  %xmm0, MSG_TMP
        mov     $16, %ecx
        cmp     %rcx, %rdx
        jae     2f
        mov     %rdx, %rcx
2:      sub     %rcx, %rdx
        mov     $MSG_TMP, %eax
3:      mov     (%rax), %r8b
        xor     (%rsi), %r8b
        mov     %r8b, (%rdi)
        inc     %rax
        inc     %rsi
        inc     %rdi
        dec     %ecx
        jnz     3b
        jmp     1b
4:      ret

/* ---- msg_tag: MSG_TAG = GCM tag over AAD (RSI, 48 bytes) and ciphertext (RDI, RCX
 * bytes), J0 already set.  Clobbers everything listed at the top. ---- */
msg_tag:
        push    %rcx
        push    %rdi
        movq    $0, MSG_ACC
        movq    $0, MSG_ACC + 8
        mov     $MSG_AAD_LEN, %ecx
        call    msg_ghash
        pop     %rsi
        mov     (%rsp), %rcx
        call    msg_ghash
        pop     %rcx
        mov     $(MSG_AAD_LEN * 8), %r8d
        shl     $3, %rcx
        mov     %rcx, %r9
        xor     MSG_ACC, %r8
        xor     MSG_ACC + 8, %r9
        call    msg_gmul
        bswap   %r8
        bswap   %r9
        mov     %r8, MSG_TAG
        mov     %r9, MSG_TAG + 8
        movdqa  MSG_J0, %xmm0
        call    msg_aes
        pxor    MSG_TAG, %xmm0
        movdqa  %xmm0, MSG_TAG
        ret

/* ---- msg_set_iv: J0 = the 8 bytes of the header's msg_seqno (RBX -> header),
 * 4 zero bytes, then 0x00000001. ---- */
msg_set_iv:
        mov     0x20(%rbx), %rax
        mov     %rax, MSG_J0
        movl    $0, MSG_J0 + 8
        movl    $0x01000000, MSG_J0 + 12
        ret

/* ---- msg_seal: RBX -> a message whose header is filled; RSI -> the plaintext
 * payload (msg_sz bytes, from the header).  Writes the ciphertext after the header
 * and the tag into authtag.  Preserves RBX. ---- */
msg_seal:
        call    msg_set_iv
        movzwl  0x36(%rbx), %ecx
        lea     MSG_HDR_SIZE(%rbx), %rdi
        call    msg_ctr
        movzwl  0x36(%rbx), %ecx
        lea     MSG_AAD_OFF(%rbx), %rsi
        lea     MSG_HDR_SIZE(%rbx), %rdi
        call    msg_tag
        movdqa  MSG_TAG, %xmm0
        movdqu  %xmm0, (%rbx)
        movq    $0, 16(%rbx)
        movq    $0, 24(%rbx)
        ret

/* ---- msg_open: RBX -> a received message, RDI -> where its plaintext goes.
 * RAX = 0 when the tag verifies (then the plaintext is written), else 1.
 * Preserves RBX. ---- */
msg_open:
        push    %rdi
        call    msg_set_iv
        movzwl  0x36(%rbx), %ecx
        lea     MSG_AAD_OFF(%rbx), %rsi
        lea     MSG_HDR_SIZE(%rbx), %rdi
        call    msg_tag
        pop     %rdi
        mov     MSG_TAG, %rax
        xor     (%rbx), %rax
        mov     MSG_TAG + 8, %rdx
        xor     8(%rbx), %rdx
        or      %rdx, %rax
        jnz     1f
        movzwl  0x36(%rbx), %ecx
        lea     MSG_HDR_SIZE(%rbx), %rsi
        call    msg_ctr
        xor     %eax, %eax
        ret
1:      mov     $1, %eax
        ret

#endif
