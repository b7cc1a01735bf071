/*
 * The KVM SEV command interface (KVM_MEMORY_ENCRYPT_OP).  In kernel 6.1
 * these live in linux/kvm.h; newer kernels moved them to asm/kvm.h and made
 * the padding explicit (pad0, pad1, ...), which is the form declared here.
 * Natural C alignment (not packed!): struct kvm_sev_cmd has 4 bytes of padding
 * after id, so data sits at offset 8 and the struct is 24 bytes.
 *
 * KVM_MEMORY_ENCRYPT_OP is encoded as _IOWR(KVMIO, 0xba, unsigned long) but
 * takes a pointer to struct kvm_sev_cmd; see kvmharness/kvm/_ffi.py.
 */

/* Secure Encrypted Virtualization command (kvm_sev_cmd.id) */
enum sev_cmd_id {
	/* Guest initialization commands */
	KVM_SEV_INIT = 0,
	KVM_SEV_ES_INIT = 1,
	/* Guest launch commands */
	KVM_SEV_LAUNCH_START = 2,
	KVM_SEV_LAUNCH_UPDATE_DATA = 3,
	KVM_SEV_LAUNCH_UPDATE_VMSA = 4,
	KVM_SEV_LAUNCH_SECRET = 5,
	KVM_SEV_LAUNCH_MEASURE = 6,
	KVM_SEV_LAUNCH_FINISH = 7,
	/* Guest migration commands (outgoing) */
	KVM_SEV_SEND_START = 8,
	KVM_SEV_SEND_UPDATE_DATA = 9,
	KVM_SEV_SEND_UPDATE_VMSA = 10,
	KVM_SEV_SEND_FINISH = 11,
	/* Guest migration commands (incoming) */
	KVM_SEV_RECEIVE_START = 12,
	KVM_SEV_RECEIVE_UPDATE_DATA = 13,
	KVM_SEV_RECEIVE_UPDATE_VMSA = 14,
	KVM_SEV_RECEIVE_FINISH = 15,
	/* Guest status and debug commands */
	KVM_SEV_GUEST_STATUS = 16,
	KVM_SEV_DBG_DECRYPT = 17,
	KVM_SEV_DBG_ENCRYPT = 18,
	/* Guest certificates commands */
	KVM_SEV_CERT_EXPORT = 19,
	/* Attestation report */
	KVM_SEV_GET_ATTESTATION_REPORT = 20,
	/* Guest Migration Extension */
	KVM_SEV_SEND_CANCEL = 21,
	/* 6.10: improved init for the KVM_X86_SEV_VM / SEV_ES_VM / SNP_VM types */
	KVM_SEV_INIT2 = 22,
	/* SNP-specific commands (6.11) */
	KVM_SEV_SNP_LAUNCH_START = 100,
	KVM_SEV_SNP_LAUNCH_UPDATE = 101,
	KVM_SEV_SNP_LAUNCH_FINISH = 102,
	KVM_SEV_SNP_ENABLE_REQ_CERTS = 103
};

struct kvm_sev_cmd {
	__u32 id;
	__u32 pad0;
	__u64 data;
	__u32 error;
	__u32 sev_fd;
};

/* for KVM_SEV_INIT2 */
struct kvm_sev_init {
	__u64 vmsa_features;
	__u32 flags;
	__u16 ghcb_version;
	__u16 pad1;
	__u32 pad2[8];
};

struct kvm_sev_launch_start {
	__u32 handle;
	__u32 policy;
	__u64 dh_uaddr;
	__u32 dh_len;
	__u32 pad0;
	__u64 session_uaddr;
	__u32 session_len;
	__u32 pad1;
};

struct kvm_sev_launch_update_data {
	__u64 uaddr;
	__u32 len;
	__u32 pad0;
};

struct kvm_sev_launch_secret {
	__u64 hdr_uaddr;
	__u32 hdr_len;
	__u32 pad0;
	__u64 guest_uaddr;
	__u32 guest_len;
	__u32 pad1;
	__u64 trans_uaddr;
	__u32 trans_len;
	__u32 pad2;
};

struct kvm_sev_launch_measure {
	__u64 uaddr;
	__u32 len;
	__u32 pad0;
};

struct kvm_sev_guest_status {
	__u32 handle;
	__u32 policy;
	__u32 state;
};

struct kvm_sev_dbg {
	__u64 src_uaddr;
	__u64 dst_uaddr;
	__u32 len;
	__u32 pad0;
};

struct kvm_sev_attestation_report {
	__u8 mnonce[16];
	__u64 uaddr;
	__u32 len;
	__u32 pad0;
};

struct kvm_sev_send_start {
	__u32 policy;
	__u32 pad0;
	__u64 pdh_cert_uaddr;
	__u32 pdh_cert_len;
	__u32 pad1;
	__u64 plat_certs_uaddr;
	__u32 plat_certs_len;
	__u32 pad2;
	__u64 amd_certs_uaddr;
	__u32 amd_certs_len;
	__u32 pad3;
	__u64 session_uaddr;
	__u32 session_len;
	__u32 pad4;
};

struct kvm_sev_send_update_data {
	__u64 hdr_uaddr;
	__u32 hdr_len;
	__u32 pad0;
	__u64 guest_uaddr;
	__u32 guest_len;
	__u32 pad1;
	__u64 trans_uaddr;
	__u32 trans_len;
	__u32 pad2;
};

struct kvm_sev_receive_start {
	__u32 handle;
	__u32 policy;
	__u64 pdh_uaddr;
	__u32 pdh_len;
	__u32 pad0;
	__u64 session_uaddr;
	__u32 session_len;
	__u32 pad1;
};

struct kvm_sev_receive_update_data {
	__u64 hdr_uaddr;
	__u32 hdr_len;
	__u32 pad0;
	__u64 guest_uaddr;
	__u32 guest_len;
	__u32 pad1;
	__u64 trans_uaddr;
	__u32 trans_len;
	__u32 pad2;
};

struct kvm_sev_snp_launch_start {
	__u64 policy;
	__u8 gosvw[16];
	__u16 flags;
	__u8 pad0[6];
	__u64 pad1[4];
};

/* kvm_sev_snp_launch_update.type; kept in sync with firmware values */
#define KVM_SEV_PAGE_TYPE_INVALID 0x0
#define KVM_SEV_SNP_PAGE_TYPE_NORMAL 0x1
#define KVM_SEV_SNP_PAGE_TYPE_ZERO 0x3
#define KVM_SEV_SNP_PAGE_TYPE_UNMEASURED 0x4
#define KVM_SEV_SNP_PAGE_TYPE_SECRETS 0x5
#define KVM_SEV_SNP_PAGE_TYPE_CPUID 0x6

struct kvm_sev_snp_launch_update {
	__u64 gfn_start;
	__u64 uaddr;
	__u64 len;
	__u8 type;
	__u8 pad0;
	__u16 flags;
	__u32 pad1;
	__u64 pad2[4];
};

#define KVM_SEV_SNP_ID_BLOCK_SIZE 96
#define KVM_SEV_SNP_ID_AUTH_SIZE 4096
#define KVM_SEV_SNP_FINISH_DATA_SIZE 32

struct kvm_sev_snp_launch_finish {
	__u64 id_block_uaddr;
	__u64 id_auth_uaddr;
	__u8 id_block_en;
	__u8 auth_key_en;
	__u8 vcek_disabled;
	__u8 host_data[32];	/* KVM_SEV_SNP_FINISH_DATA_SIZE */
	__u8 pad0[3];
	__u16 flags;
	__u64 pad1[4];
};

/* SEV device attributes of the system (/dev/kvm) fd */
#define KVM_X86_GRP_SEV 1
#define KVM_X86_SEV_VMSA_FEATURES 0
#define KVM_X86_SNP_POLICY_BITS 1
#define KVM_X86_SEV_SNP_REQ_CERTS 2
