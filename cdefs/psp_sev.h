/*
 * linux/psp-sev.h (include/uapi/linux/psp-sev.h): the /dev/sev platform
 * management interface.  Every struct here is __attribute__((packed)) in the
 * kernel, so kvmharness/kvm/_ffi.py reads this file with cdef(packed=True):
 * sev_issue_cmd.data is at offset 4, sev_user_data_status.flags is an
 * unaligned u32 at offset 3.
 *
 * SEV_RET_* values are the firmware's status codes as listed in docs/facts.md#facts-9f: some kernel releases shipped wrong values after
 * SEV_RET_SECURE_DATA_INVALID, so these are not taken from whatever header is
 * installed.
 */

/* SEV platform commands (sev_issue_cmd.cmd) */
enum {
	SEV_FACTORY_RESET = 0,
	SEV_PLATFORM_STATUS = 1,
	SEV_PEK_GEN = 2,
	SEV_PEK_CSR = 3,
	SEV_PDH_GEN = 4,
	SEV_PDH_CERT_EXPORT = 5,
	SEV_PEK_CERT_IMPORT = 6,
	SEV_GET_ID = 7,		/* This command is deprecated, use SEV_GET_ID2 */
	SEV_GET_ID2 = 8,
	SNP_PLATFORM_STATUS = 9,
	SNP_COMMIT = 10,
	SNP_SET_CONFIG = 11,
	SNP_VLEK_LOAD = 12
};

/* SEV firmware status code (sev_issue_cmd.error, kvm_sev_cmd.error) */
typedef enum {
	/* Not a firmware code: the kernel could not call the firmware. */
	SEV_RET_NO_FW_CALL = -1,
	SEV_RET_SUCCESS = 0,
	SEV_RET_INVALID_PLATFORM_STATE = 0x0001,
	SEV_RET_INVALID_GUEST_STATE = 0x0002,
	SEV_RET_INAVLID_CONFIG = 0x0003,	/* the kernel's historic spelling */
	SEV_RET_INVALID_CONFIG = 0x0003,
	SEV_RET_INVALID_LEN = 0x0004,
	SEV_RET_ALREADY_OWNED = 0x0005,
	SEV_RET_INVALID_CERTIFICATE = 0x0006,
	SEV_RET_POLICY_FAILURE = 0x0007,
	SEV_RET_INACTIVE = 0x0008,
	SEV_RET_INVALID_ADDRESS = 0x0009,
	SEV_RET_BAD_SIGNATURE = 0x000A,
	SEV_RET_BAD_MEASUREMENT = 0x000B,
	SEV_RET_ASID_OWNED = 0x000C,
	SEV_RET_INVALID_ASID = 0x000D,
	SEV_RET_WBINVD_REQUIRED = 0x000E,
	SEV_RET_DFFLUSH_REQUIRED = 0x000F,
	SEV_RET_INVALID_GUEST = 0x0010,
	SEV_RET_INVALID_COMMAND = 0x0011,
	SEV_RET_ACTIVE = 0x0012,
	SEV_RET_HWSEV_RET_PLATFORM = 0x0013,
	SEV_RET_HWSEV_RET_UNSAFE = 0x0014,
	SEV_RET_UNSUPPORTED = 0x0015,
	SEV_RET_INVALID_PARAM = 0x0016,
	SEV_RET_RESOURCE_LIMIT = 0x0017,
	SEV_RET_SECURE_DATA_INVALID = 0x0018,
	SEV_RET_INVALID_PAGE_SIZE = 0x0019,
	SEV_RET_INVALID_PAGE_STATE = 0x001A,
	SEV_RET_INVALID_MDATA_ENTRY = 0x001B,
	SEV_RET_INVALID_PAGE_OWNER = 0x001C,
	SEV_RET_AEAD_OFLOW = 0x001D,
	SEV_RET_EXIT_RING_BUFFER = 0x001F,
	SEV_RET_RMP_INIT_REQUIRED = 0x0020,
	SEV_RET_BAD_SVN = 0x0021,
	SEV_RET_BAD_VERSION = 0x0022,
	SEV_RET_SHUTDOWN_REQUIRED = 0x0023,
	SEV_RET_UPDATE_FAILED = 0x0024,
	SEV_RET_RESTORE_REQUIRED = 0x0025,
	SEV_RET_RMP_INITIALIZATION_FAILED = 0x0026,
	SEV_RET_INVALID_KEY = 0x0027,
	SEV_RET_SHUTDOWN_INCOMPLETE = 0x0028
} sev_ret_code;

/*
 * Platform state (sev_user_data_status.state).  Kernel-internal enum
 * (include/linux/psp-sev.h), not in the UAPI header.
 */
enum sev_state {
	SEV_STATE_UNINIT = 0x0,
	SEV_STATE_INIT = 0x1,
	SEV_STATE_WORKING = 0x2
};

/* PLATFORM_STATUS command parameters */
struct sev_user_data_status {
	__u8 api_major;		/* Out */
	__u8 api_minor;		/* Out */
	__u8 state;		/* Out */
	__u32 flags;		/* Out */
	__u8 build;		/* Out */
	__u32 guest_count;	/* Out */
};

#define SEV_STATUS_FLAGS_CONFIG_ES 0x0100

/* PEK_CSR command parameters */
struct sev_user_data_pek_csr {
	__u64 address;		/* In */
	__u32 length;		/* In/Out */
};

/* PEK_CERT_IMPORT command parameters */
struct sev_user_data_pek_cert_import {
	__u64 pek_cert_address;	/* In */
	__u32 pek_cert_len;	/* In */
	__u64 oca_cert_address;	/* In */
	__u32 oca_cert_len;	/* In */
};

/* PDH_CERT_EXPORT command parameters */
struct sev_user_data_pdh_cert_export {
	__u64 pdh_cert_address;	/* In */
	__u32 pdh_cert_len;	/* In/Out */
	__u64 cert_chain_address;	/* In */
	__u32 cert_chain_len;	/* In/Out */
};

/* GET_ID command parameters (deprecated) */
struct sev_user_data_get_id {
	__u8 socket1[64];	/* Out */
	__u8 socket2[64];	/* Out */
};

/* GET_ID2 command parameters */
struct sev_user_data_get_id2 {
	__u64 address;		/* In */
	__u32 length;		/* In/Out */
};

/* SNP_PLATFORM_STATUS */
struct sev_user_data_snp_status {
	__u8 api_major;		/* Out */
	__u8 api_minor;		/* Out */
	__u8 state;		/* Out */
	__u8 is_rmp_initialized:1;	/* Out */
	__u8 rsvd:7;
	__u32 build_id;		/* Out */
	__u32 mask_chip_id:1;	/* Out */
	__u32 mask_chip_key:1;	/* Out */
	__u32 vlek_en:1;	/* Out */
	__u32 feature_info:1;	/* Out */
	__u32 rapl_dis:1;	/* Out */
	__u32 ciphertext_hiding_cap:1;	/* Out */
	__u32 ciphertext_hiding_en:1;	/* Out */
	__u32 rsvd1:25;
	__u32 guest_count;	/* Out */
	__u64 current_tcb_version;	/* Out */
	__u64 reported_tcb_version;	/* Out */
};

/* SNP_SET_CONFIG: system wide configuration value for SNP */
struct sev_user_data_snp_config {
	__u64 reported_tcb;	/* In */
	__u32 mask_chip_id:1;	/* In */
	__u32 mask_chip_key:1;	/* In */
	__u32 rsvd:30;		/* In */
	__u8 rsvd1[52];
};

/* SNP_VLEK_LOAD */
struct sev_user_data_snp_vlek_load {
	__u32 len;		/* In */
	__u8 vlek_wrapped_version;	/* In */
	__u8 rsvd[3];		/* In */
	__u64 vlek_wrapped_address;	/* In */
};

/* Wrapped VLEK data (opaque, from AMD KDS) */
struct sev_user_data_snp_wrapped_vlek_hashstick {
	__u8 data[432];		/* In */
};

/* SEV ioctl parameters (SEV_ISSUE_CMD) */
struct sev_issue_cmd {
	__u32 cmd;		/* In */
	__u64 data;		/* In */
	__u32 error;		/* Out */
};

#define SEV_IOC_TYPE 0x53	/* 'S' */
