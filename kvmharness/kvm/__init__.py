"""The Linux KVM backend: /dev/kvm through cffi (``_ffi`` is the only module that touches cffi)."""
