#!/usr/bin/env bash
# Everything kvmharness's tests need from the OS, on a clean Debian/Ubuntu machine.
# Idempotent: when all is present it only checks (well under a second).
#
#   gcc, binutils, cpp    the layout test compiles against the kernel headers; the
#                         guest-image test rebuilds the guests with GNU as; bench
#                         builds its C reference
#   linux-libc-dev        the kernel UAPI headers (linux/kvm.h, asm/kvm.h, psp-sev.h)
#   ci/rig/...            sshd + iproute2 for the remote-rig tests, QEMU + mmdebstrap
#                         for the SVM rig in a box
#
# Runs as root; as another user it re-runs itself under sudo.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ "$(id -u)" != 0 ]; then
  exec sudo -E bash "$0" "$@"
fi

# shellcheck source=ci/apt-missing.sh
. "$here/apt-missing.sh"
apt_install_missing install-deps gcc=/usr/bin/gcc binutils=/usr/bin/objcopy cpp=/usr/bin/cpp \
  linux-libc-dev=/usr/include/linux/kvm.h

if [ -f "$here/rig/install-test-deps.sh" ]; then
  bash "$here/rig/install-test-deps.sh"
fi
