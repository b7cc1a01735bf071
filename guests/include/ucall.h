/*
 * The guest <-> host contract, declared once.
 *
 * Guest assembly includes this file (guests are .S files run through the C
 * preprocessor); kvmharness/protocol.py parses the same #define lines, and
 * tests/test_guest_images.py assembles a probe to prove both read the same values.
 * Only `#define NAME 0xNUMBER` / `#define NAME NUMBER` lines are part of the
 * contract: keep them on one line each.
 */
#ifndef KVMHARNESS_UCALL_H
#define KVMHARNESS_UCALL_H

/* Ports.  A guest runs with no devices but these (and any a test adds). */
#define CONSOLE_PORT     0xE9   /* out %al: one byte of text to the host console */
#define UCALL_PORT       0xEB   /* out %al with AL = UCALL_* op, arguments in registers */
#define BENCH_PORT       0x80   /* the benchmark's null device */

/* Result protocol ("ucall"): AL = op; RBX, RCX = arguments. */
#define UCALL_REPORT     1      /* report a value: RBX = key, RCX = value */
#define UCALL_DONE       2      /* the guest finished successfully */
#define UCALL_FAIL       3      /* assertion failed: RBX = code, RCX = source line */
#define UCALL_EXCEPTION  4      /* harness default handler: RBX = vector, RCX = fault RIP */

/* Guest-physical memory map (both entry modes). */
#define GUEST_LOAD_ADDR  0x8000      /* the flat image is loaded and entered here */
#define BOOT_PML4        0x1000      /* long mode: harness-built page tables ... */
#define BOOT_PDPT        0x2000
#define BOOT_PD0         0x3000      /* identity map of GiB 0, 2 MiB pages */
#define BOOT_PD3         0x4000      /* identity map of GiB 3 (MMIO window), 2 MiB pages */
#define BOOT_GDT         0x5000      /* GDT: 0x08 code64, 0x10 data, 0x18 code32, 0x20 data16/code16 */
#define BOOT_IDT         0x6000      /* 256 x 16-byte gates; vectors 0-31 -> default handlers */
#define BOOT_STUBS       0x7000      /* default exception handlers, 16 bytes each */
#define KERNEL_CS        0x08
#define KERNEL_DS        0x10
#define MMIO_TEST_ADDR   0xD0000000  /* unbacked: every access is an MMIO exit */

#endif
