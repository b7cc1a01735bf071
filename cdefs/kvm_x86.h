/*
 * asm/kvm.h (arch/x86/include/uapi/asm/kvm.h): the x86 register, MSR, CPUID,
 * debug and nested-state structs.  Read after types.h and before kvm.h, whose
 * struct kvm_run embeds kvm_debug_exit_arch and kvm_sync_regs.
 *
 * Layout is natural C alignment, exactly as the kernel's; every size, offset
 * and constant here is compared with the installed kernel headers by
 * tests/test_cdefs_layout.py.  cffi's cdef only takes integer literals after
 * #define, so the kernel's "(1 << n)" expressions are written out.
 */

/* Exception vectors (asm/kvm.h). */
#define DE_VECTOR 0
#define DB_VECTOR 1
#define BP_VECTOR 3
#define OF_VECTOR 4
#define BR_VECTOR 5
#define UD_VECTOR 6
#define NM_VECTOR 7
#define DF_VECTOR 8
#define TS_VECTOR 10
#define NP_VECTOR 11
#define SS_VECTOR 12
#define GP_VECTOR 13
#define PF_VECTOR 14
#define MF_VECTOR 16
#define AC_VECTOR 17
#define MC_VECTOR 18
#define XM_VECTOR 19
#define VE_VECTOR 20

#define KVM_NR_INTERRUPTS 256

/* kvm_run.flags (x86) */
#define KVM_RUN_X86_SMM 0x1
#define KVM_RUN_X86_BUS_LOCK 0x2

/* for KVM_GET_REGS and KVM_SET_REGS */
struct kvm_regs {
	__u64 rax, rbx, rcx, rdx;
	__u64 rsi, rdi, rsp, rbp;
	__u64 r8,  r9,  r10, r11;
	__u64 r12, r13, r14, r15;
	__u64 rip, rflags;
};

/* for KVM_GET_LAPIC and KVM_SET_LAPIC */
#define KVM_APIC_REG_SIZE 0x400
struct kvm_lapic_state {
	char regs[1024];
};

struct kvm_segment {
	__u64 base;
	__u32 limit;
	__u16 selector;
	__u8  type;
	__u8  present, dpl, db, s, l, g, avl;
	__u8  unusable;
	__u8  padding;
};

struct kvm_dtable {
	__u64 base;
	__u16 limit;
	__u16 padding[3];
};

/* for KVM_GET_SREGS and KVM_SET_SREGS */
struct kvm_sregs {
	struct kvm_segment cs, ds, es, fs, gs, ss;
	struct kvm_segment tr, ldt;
	struct kvm_dtable gdt, idt;
	__u64 cr0, cr2, cr3, cr4, cr8;
	__u64 efer;
	__u64 apic_base;
	__u64 interrupt_bitmap[4];	/* (KVM_NR_INTERRUPTS + 63) / 64 */
};

/* for KVM_GET_FPU and KVM_SET_FPU */
struct kvm_fpu {
	__u8  fpr[8][16];
	__u16 fcw;
	__u16 fsw;
	__u8  ftwx;	/* in fxsave format */
	__u8  pad1;
	__u16 last_opcode;
	__u64 last_ip;
	__u64 last_dp;
	__u8  xmm[16][16];
	__u32 mxcsr;
	__u32 pad2;
};

struct kvm_msr_entry {
	__u32 index;
	__u32 reserved;
	__u64 data;
};

/* for KVM_GET_MSRS and KVM_SET_MSRS */
struct kvm_msrs {
	__u32 nmsrs;	/* number of msrs in entries */
	__u32 pad;
	struct kvm_msr_entry entries[];
};

/* for KVM_GET_MSR_INDEX_LIST */
struct kvm_msr_list {
	__u32 nmsrs;	/* number of msrs in entries */
	__u32 indices[];
};

/* for KVM_X86_SET_MSR_FILTER */
#define KVM_MSR_FILTER_MAX_BITMAP_SIZE 0x600
#define KVM_MSR_FILTER_READ 0x1
#define KVM_MSR_FILTER_WRITE 0x2
struct kvm_msr_filter_range {
	__u32 flags;
	__u32 nmsrs;	/* number of msrs in bitmap */
	__u32 base;	/* MSR index the bitmap starts at */
	__u8 *bitmap;	/* a 1 bit allows the operations in flags, 0 denies */
};

#define KVM_MSR_FILTER_MAX_RANGES 16
#define KVM_MSR_FILTER_DEFAULT_ALLOW 0x0
#define KVM_MSR_FILTER_DEFAULT_DENY 0x1
struct kvm_msr_filter {
	__u32 flags;
	struct kvm_msr_filter_range ranges[16];	/* KVM_MSR_FILTER_MAX_RANGES */
};

struct kvm_cpuid_entry2 {
	__u32 function;
	__u32 index;
	__u32 flags;
	__u32 eax;
	__u32 ebx;
	__u32 ecx;
	__u32 edx;
	__u32 padding[3];
};

/* The kernel's spelling (SIGNIFCANT) is the name. */
#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX 0x1
#define KVM_CPUID_FLAG_STATEFUL_FUNC 0x2
#define KVM_CPUID_FLAG_STATE_READ_NEXT 0x4

/* for KVM_SET_CPUID2 / KVM_GET_SUPPORTED_CPUID */
struct kvm_cpuid2 {
	__u32 nent;
	__u32 padding;
	struct kvm_cpuid_entry2 entries[];
};

/* kvm_run.debug.arch, for KVM_EXIT_DEBUG */
struct kvm_debug_exit_arch {
	__u32 exception;
	__u32 pad;
	__u64 pc;
	__u64 dr6;
	__u64 dr7;
};

#define KVM_GUESTDBG_USE_SW_BP 0x00010000
#define KVM_GUESTDBG_USE_HW_BP 0x00020000
#define KVM_GUESTDBG_INJECT_DB 0x00040000
#define KVM_GUESTDBG_INJECT_BP 0x00080000
#define KVM_GUESTDBG_BLOCKIRQ 0x00100000

/* for KVM_SET_GUEST_DEBUG */
struct kvm_guest_debug_arch {
	__u64 debugreg[8];
};

/* When set in flags, include corresponding fields on KVM_SET_VCPU_EVENTS */
#define KVM_VCPUEVENT_VALID_NMI_PENDING 0x00000001
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR 0x00000002
#define KVM_VCPUEVENT_VALID_SHADOW 0x00000004
#define KVM_VCPUEVENT_VALID_SMM 0x00000008
#define KVM_VCPUEVENT_VALID_PAYLOAD 0x00000010
#define KVM_VCPUEVENT_VALID_TRIPLE_FAULT 0x00000020

/* for KVM_GET/SET_VCPU_EVENTS (and kvm_sync_regs) */
struct kvm_vcpu_events {
	struct {
		__u8 injected;
		__u8 nr;
		__u8 has_error_code;
		__u8 pending;
		__u32 error_code;
	} exception;
	struct {
		__u8 injected;
		__u8 nr;
		__u8 soft;
		__u8 shadow;
	} interrupt;
	struct {
		__u8 injected;
		__u8 pending;
		__u8 masked;
		__u8 pad;
	} nmi;
	__u32 sipi_vector;
	__u32 flags;
	struct {
		__u8 smm;
		__u8 pending;
		__u8 smm_inside_nmi;
		__u8 latched_init;
	} smi;
	struct {
		__u8 pending;
	} triple_fault;
	__u8 reserved[26];
	__u8 exception_has_payload;
	__u64 exception_payload;
};

/* for KVM_GET/SET_DEBUGREGS */
struct kvm_debugregs {
	__u64 db[4];
	__u64 dr6;
	__u64 dr7;
	__u64 flags;
	__u64 reserved[9];
};

#define KVM_MAX_XCRS 16

struct kvm_xcr {
	__u32 xcr;
	__u32 reserved;
	__u64 value;
};

struct kvm_xcrs {
	__u32 nr_xcrs;
	__u32 flags;
	struct kvm_xcr xcrs[16];	/* KVM_MAX_XCRS */
	__u64 padding[16];
};

#define KVM_SYNC_X86_REGS 0x1
#define KVM_SYNC_X86_SREGS 0x2
#define KVM_SYNC_X86_EVENTS 0x4
#define KVM_SYNC_X86_VALID_FIELDS 0x7

/* kvm_sync_regs struct included by kvm_run struct */
struct kvm_sync_regs {
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_vcpu_events events;
};

/* KVM_CAP_DISABLE_QUIRKS(2) bits */
#define KVM_X86_QUIRK_LINT0_REENABLED 0x1
#define KVM_X86_QUIRK_CD_NW_CLEARED 0x2
#define KVM_X86_QUIRK_LAPIC_MMIO_HOLE 0x4
#define KVM_X86_QUIRK_OUT_7E_INC_RIP 0x8
#define KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT 0x10
#define KVM_X86_QUIRK_FIX_HYPERCALL_INSN 0x20
#define KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS 0x40
#define KVM_X86_QUIRK_SLOT_ZAP_ALL 0x80
#define KVM_X86_QUIRK_STUFF_FEATURE_MSRS 0x100
#define KVM_X86_QUIRK_IGNORE_GUEST_PAT 0x200

#define KVM_STATE_NESTED_FORMAT_VMX 0
#define KVM_STATE_NESTED_FORMAT_SVM 1

#define KVM_STATE_NESTED_GUEST_MODE 0x00000001
#define KVM_STATE_NESTED_RUN_PENDING 0x00000002
#define KVM_STATE_NESTED_EVMCS 0x00000004
#define KVM_STATE_NESTED_MTF_PENDING 0x00000008
#define KVM_STATE_NESTED_GIF_SET 0x00000100

#define KVM_STATE_NESTED_SMM_GUEST_MODE 0x00000001
#define KVM_STATE_NESTED_SMM_VMXON 0x00000002

#define KVM_STATE_NESTED_VMX_VMCS_SIZE 0x1000
#define KVM_STATE_NESTED_SVM_VMCB_SIZE 0x1000

/* device attributes of the system (/dev/kvm) fd */
#define KVM_X86_GRP_SYSTEM 0
#define KVM_X86_XCOMP_GUEST_SUPP 0

struct kvm_vmx_nested_state_data {
	__u8 vmcs12[4096];		/* KVM_STATE_NESTED_VMX_VMCS_SIZE */
	__u8 shadow_vmcs12[4096];
};

struct kvm_vmx_nested_state_hdr {
	__u64 vmxon_pa;
	__u64 vmcs12_pa;

	struct {
		__u16 flags;
	} smm;

	__u16 pad;

	__u32 flags;
	__u64 preemption_timer_deadline;
};

struct kvm_svm_nested_state_data {
	/* Save area only used if KVM_STATE_NESTED_RUN_PENDING.  */
	__u8 vmcb12[4096];		/* KVM_STATE_NESTED_SVM_VMCB_SIZE */
};

struct kvm_svm_nested_state_hdr {
	__u64 vmcb_pa;
};

/* for KVM_CAP_NESTED_STATE */
struct kvm_nested_state {
	__u16 flags;
	__u16 format;
	__u32 size;

	union {
		struct kvm_vmx_nested_state_hdr vmx;
		struct kvm_svm_nested_state_hdr svm;

		/* Pad the header to 128 bytes.  */
		__u8 pad[120];
	} hdr;

	/*
	 * The kernel declares "union { vmx[0]; svm[0]; } data" here (two
	 * zero-length arrays).  cffi sizes such an empty union as 1 byte, which
	 * would make the struct 136 bytes instead of 128 and change the
	 * KVM_{GET,SET}_NESTED_STATE ioctl numbers, so the payload is declared
	 * as a flexible byte array at the same offset: cast it to
	 * struct kvm_svm_nested_state_data * to use it.
	 */
	__u8 data[];
};

/* VM types for KVM_CREATE_VM (advertised by KVM_CAP_VM_TYPES) */
#define KVM_X86_DEFAULT_VM 0
#define KVM_X86_SW_PROTECTED_VM 1
#define KVM_X86_SEV_VM 2
#define KVM_X86_SEV_ES_VM 3
#define KVM_X86_SNP_VM 4
#define KVM_X86_TDX_VM 5

/* x86-specific KVM_EXIT_HYPERCALL flags */
#define KVM_EXIT_HYPERCALL_LONG_MODE 0x1
