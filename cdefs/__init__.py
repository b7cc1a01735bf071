"""Kernel UAPI C declarations, one file per header, read by ``kvmharness.kvm._ffi``."""
