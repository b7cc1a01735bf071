/*
 * kvmharness fast path: KVM_RUN in a loop in C, returning to Python only for the
 * exits Python must answer.
 *
 * A plain shared library: no Python headers, no CPython ABI, no kernel headers.
 * kvmharness/kvm/fastpath.py compiles it (cc -O2 -shared -fPIC) into a per-user
 * cache and loads it with cffi's ABI-mode dlopen, which releases the GIL around
 * every call.  Everything that depends on the kernel's struct kvm_run layout
 * (offsets, the KVM_RUN ioctl number) is passed in by Python, which takes it
 * from the cdefs the layout test pins to the kernel headers.  Only these
 * KVM_EXIT_* numbers and kvm_run union layouts are used, all stable Linux ABI:
 *
 *   KVM_EXIT_IO   (2): u8 direction, u8 size, u16 port, u32 count, u64 data_offset
 *   KVM_EXIT_MMIO (6): u64 phys_addr, u8 data[8], u32 len, u8 is_write
 *
 * Per port (OUTs) and per MMIO range (writes) Python sets a kind:
 *
 *   KH_PY     return to Python with the exit pending in kvm_run
 *   KH_SINK   count it (per slot) and re-enter the guest
 *   KH_POSTED append it to the ring and re-enter the guest; Python replays the
 *             ring, in order, before it handles the next exit it must answer
 *
 * kh_run returns  0  an exit awaits Python in kvm_run (every other exit kind,
 *                    IN, MMIO reads, a KH_PY port or range, or a write the ring
 *                    has no room for),
 *                 1  nothing pending: the exit budget was spent (so Python gets
 *                    to run its signal handlers) or the ring is nearly full,
 *                -1  KVM_RUN failed; errno in f->err (EINTR: a signal or
 *                    immediate_exit, i.e. a kick; the loop never retries it).
 * f->exits counts the exits handled here during the call; the ring holds
 * f->ring_records records in f->ring_used bytes.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#define KH_ABI 1

#define KH_PY 0
#define KH_SINK 1
#define KH_POSTED 2

#define KH_REC_IO_OUT 1
#define KH_REC_MMIO_WRITE 2

#define KH_EXIT_IO 2
#define KH_EXIT_MMIO 6
#define KH_IO_OUT 1

#define KH_MAX_MMIO 32
#define KH_MAX_SLOTS 256
#define KH_DEFAULT_BUDGET 65536u

struct kh_mmio_range {
    uint64_t start, end;  /* [start, end) */
    uint32_t kind, slot;
};

/* One ring record, followed by len bytes of data padded to 8. */
struct kh_rec {
    uint8_t kind, slot;
    uint16_t port;
    uint32_t len, size, count;
    uint64_t addr, rip;
};

struct kh_fast {
    /* set once by Python */
    int32_t fd;
    uint32_t off_exit_reason;
    uint32_t off_union;
    uint32_t off_rip;      /* 0: no RIP in the records; else offset of s.regs.regs.rip */
    uint64_t run_request;  /* the KVM_RUN ioctl number */
    uint8_t *run;          /* the vCPU's mmap'd struct kvm_run */
    uint64_t run_size;
    uint8_t *ring;
    uint32_t ring_size;
    uint32_t budget;       /* exits handled here before returning 1 (0: the default) */
    /* per Machine.run, from the device bus */
    uint32_t n_mmio;
    uint32_t reserved;
    struct kh_mmio_range mmio[KH_MAX_MMIO];
    uint8_t port_kind[65536];
    uint8_t port_slot[65536];
    uint64_t sunk[KH_MAX_SLOTS];
    /* the last call */
    uint64_t exits;
    uint64_t sunk_total;
    uint32_t ring_used;
    uint32_t ring_records;
    int32_t err;
    volatile int32_t in_run;  /* 1 while kh_run executes (read by another thread) */
};

int kh_abi(void) { return KH_ABI; }
uint64_t kh_sizeof(void) { return sizeof(struct kh_fast); }

static int post(struct kh_fast *f, uint8_t kind, uint8_t slot, uint16_t port, uint32_t len, uint32_t size,
                uint32_t count, uint64_t addr, const uint8_t *data) {
    uint32_t need = (uint32_t)sizeof(struct kh_rec) + ((len + 7u) & ~7u);
    if (need > f->ring_size - f->ring_used) return 0;
    struct kh_rec rec = { kind, slot, port, len, size, count, addr, 0 };
    if (f->off_rip) memcpy(&rec.rip, f->run + f->off_rip, 8);
    uint8_t *p = f->ring + f->ring_used;
    memcpy(p, &rec, sizeof rec);
    memcpy(p + sizeof rec, data, len);
    f->ring_used += need;
    f->ring_records++;
    return 1;
}

int kh_run(struct kh_fast *f) {
    uint8_t *run = f->run;
    const uint8_t *u = run + f->off_union;
    const uint32_t budget = f->budget ? f->budget : KH_DEFAULT_BUDGET;
    /* room for the largest record (a page of string IO) before re-entering */
    const uint32_t low_water = f->ring_size > 4096u + 64u ? f->ring_size - 4096u - 64u : 0;
    int rc = 0;
    f->exits = 0;
    f->sunk_total = 0;
    f->ring_used = 0;
    f->ring_records = 0;
    f->err = 0;
    f->in_run = 1;
    for (;;) {
        if (ioctl(f->fd, f->run_request, (void *)0) < 0) { /* KVM_RUN refuses a non-zero argument */
            f->err = errno;
            rc = -1;
            break;
        }
        uint32_t reason;
        memcpy(&reason, run + f->off_exit_reason, 4);
        if (reason == KH_EXIT_IO) {
            if (u[0] != KH_IO_OUT) break;
            uint16_t port;
            memcpy(&port, u + 2, 2);
            uint8_t kind = f->port_kind[port];
            if (kind == KH_SINK) {
                f->sunk[f->port_slot[port]]++;
                f->sunk_total++;
            } else if (kind == KH_POSTED) {
                uint32_t size = u[1], count;
                uint64_t off;
                memcpy(&count, u + 4, 4);
                memcpy(&off, u + 8, 8);
                uint64_t len = (uint64_t)size * count;
                if (len > 4096u || off > f->run_size || len > f->run_size - off) break;
                if (!post(f, KH_REC_IO_OUT, f->port_slot[port], port, (uint32_t)len, size, count, 0, run + off))
                    break;
            } else {
                break;
            }
        } else if (reason == KH_EXIT_MMIO) {
            if (!u[20]) break; /* a read: Python answers it */
            uint64_t addr;
            uint32_t len;
            memcpy(&addr, u, 8);
            memcpy(&len, u + 16, 4);
            if (len > 8) break;
            const struct kh_mmio_range *r = 0;
            for (uint32_t i = 0; i < f->n_mmio && i < KH_MAX_MMIO; i++) {
                if (addr >= f->mmio[i].start && addr < f->mmio[i].end && len <= f->mmio[i].end - addr) {
                    r = &f->mmio[i];
                    break;
                }
            }
            if (!r || r->kind == KH_PY) break;
            if (r->kind == KH_SINK) {
                f->sunk[r->slot % KH_MAX_SLOTS]++;
                f->sunk_total++;
            } else if (!post(f, KH_REC_MMIO_WRITE, (uint8_t)r->slot, 0, len, len, 1, addr, u + 8)) {
                break;
            }
        } else {
            break;
        }
        f->exits++;
        if (f->exits >= budget || f->ring_used > low_water) {
            rc = 1;
            break;
        }
    }
    f->in_run = 0;
    return rc;
}
