/*
 * linux/types.h (asm-generic/int-ll64.h): the fixed-width integer types every
 * other declaration file uses.  Read first.
 */
typedef signed char __s8;
typedef unsigned char __u8;
typedef signed short __s16;
typedef unsigned short __u16;
typedef signed int __s32;
typedef unsigned int __u32;
typedef signed long long __s64;
typedef unsigned long long __u64;
