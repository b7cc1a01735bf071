/*
 * The C reference for `kvmharness bench`: the same ioctls the harness issues,
 * with no Python in the loop, so the ratio measures the harness's own cost.
 *
 *   bench_ref ioloop IMAGE          run the ioloop guest (real mode) to HLT,
 *                                   counting BENCH_PORT exits
 *   bench_ref lifecycle IMAGE N     N x (create VM, disable the hypercall quirk,
 *                                   4 MiB slot, vCPU + kvm_run mmap, load the
 *                                   image, set sregs/regs, KVM_RUN to HLT, close)
 *
 * Prints one JSON object (seconds, and user/sys CPU seconds of this process).  Built by
 * kvmharness/bench.py with gcc at run time.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_X86_QUIRK_FIX_HYPERCALL_INSN
#define KVM_X86_QUIRK_FIX_HYPERCALL_INSN (1 << 5)
#endif
#ifndef KVM_CAP_DISABLE_QUIRKS2
#define KVM_CAP_DISABLE_QUIRKS2 213
#endif
#define LOAD_ADDR 0x8000
#define BENCH_PORT 0x80

static void die(const char *what) { fprintf(stderr, "bench_ref: %s: %s\n", what, strerror(errno)); exit(1); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_user(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6;
}

static double cpu_sys(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

struct vm { int vm, vcpu; void *mem; size_t memsz; struct kvm_run *run; size_t runsz; };

static void vm_open(int kvm, struct vm *v, size_t memsz, const void *img, size_t imgsz) {
    v->vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (v->vm < 0) die("KVM_CREATE_VM");
    if (ioctl(v->vm, KVM_CHECK_EXTENSION, KVM_CAP_DISABLE_QUIRKS2) & KVM_X86_QUIRK_FIX_HYPERCALL_INSN) {
        struct kvm_enable_cap cap = { .cap = KVM_CAP_DISABLE_QUIRKS2 };
        cap.args[0] = KVM_X86_QUIRK_FIX_HYPERCALL_INSN;
        if (ioctl(v->vm, KVM_ENABLE_CAP, &cap) < 0) die("KVM_ENABLE_CAP");
    }
    v->memsz = memsz;
    v->mem = mmap(NULL, memsz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v->mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = memsz,
                                             .userspace_addr = (unsigned long)v->mem };
    if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
    v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0) die("KVM_CREATE_VCPU");
    v->runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v->run = mmap(NULL, v->runsz, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (v->run == MAP_FAILED) die("mmap kvm_run");
    memcpy((char *)v->mem + LOAD_ADDR, img, imgsz);
    /* the harness builds the whole real-mode kvm_sregs itself and sets it; so do we */
    struct kvm_sregs s;
    memset(&s, 0, sizeof s);
    struct kvm_segment seg = { .base = 0, .limit = 0xffff, .selector = 0, .type = 3, .present = 1, .s = 1 };
    s.ds = s.es = s.fs = s.gs = s.ss = seg;
    seg.type = 11;
    s.cs = seg;
    s.tr = (struct kvm_segment){ .limit = 0xffff, .type = 11, .present = 1 };
    s.ldt = (struct kvm_segment){ .limit = 0xffff, .type = 2, .present = 1 };
    s.gdt.limit = 0xffff;
    s.idt.limit = 0x3ff;
    s.cr0 = 0x10;
    s.apic_base = 0xfee00900;
    if (ioctl(v->vcpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = LOAD_ADDR, .rsp = 0x7c00, .rflags = 2 };
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

static void vm_close(struct vm *v) {
    munmap(v->run, v->runsz);
    close(v->vcpu);
    close(v->vm);
    munmap(v->mem, v->memsz);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: bench_ref ioloop|lifecycle IMAGE [N]\n"); return 2; }
    static char img[65536];
    FILE *f = fopen(argv[2], "rb");
    if (!f) die(argv[2]);
    size_t imgsz = fread(img, 1, sizeof img, f);
    fclose(f);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    if (!strcmp(argv[1], "ioloop")) {
        struct vm v;
        vm_open(kvm, &v, 2 << 20, img, imgsz);
        long exits = 0, port_exits = 0;
        double u0 = cpu_user(), t0 = now();
        for (;;) {
            if (ioctl(v.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            exits++;
            if (v.run->exit_reason == KVM_EXIT_IO && v.run->io.port == BENCH_PORT) { port_exits++; continue; }
            if (v.run->exit_reason == KVM_EXIT_HLT) break;
            fprintf(stderr, "bench_ref: unexpected exit %u\n", v.run->exit_reason);
            return 1;
        }
        double t = now() - t0, u = cpu_user() - u0;
        printf("{\"exits\": %ld, \"port_exits\": %ld, \"seconds\": %.6f, \"user_seconds\": %.6f}\n",
               exits, port_exits, t, u);
        vm_close(&v);
    } else if (!strcmp(argv[1], "lifecycle")) {
        int n = argc > 3 ? atoi(argv[3]) : 200;
        double u0 = cpu_user(), s0 = cpu_sys(), t0 = now();
        for (int i = 0; i < n; i++) {
            struct vm v;
            vm_open(kvm, &v, 4 << 20, img, imgsz);
            if (ioctl(v.vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
            if (v.run->exit_reason != KVM_EXIT_HLT) { fprintf(stderr, "bench_ref: exit %u, not HLT\n", v.run->exit_reason); return 1; }
            vm_close(&v);
        }
        double t = now() - t0, u = cpu_user() - u0, sy = cpu_sys() - s0;
        printf("{\"count\": %d, \"seconds\": %.6f, \"user_seconds\": %.6f, \"sys_seconds\": %.6f}\n",
               n, t, u, sy);
    } else {
        fprintf(stderr, "bench_ref: unknown mode %s\n", argv[1]);
        return 2;
    }
    return 0;
}
