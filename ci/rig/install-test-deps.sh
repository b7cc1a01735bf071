#!/usr/bin/env bash
# Install what the remote-rig tests and the SVM rig in a box need from the OS on a
# clean Debian/Ubuntu machine (apt only: their Python packages, paramiko and
# pyroute2, come with the project's [test] extra into the venv).  Idempotent: when
# everything is present it only checks (well under a second) and touches no apt.
#
#   ci/rig/install-test-deps.sh          # sshd + iproute2 (tests) and rig tools
#   ci/rig/install-test-deps.sh --tests  # only what tests/test_remote_* need
#   ci/rig/install-test-deps.sh --check  # exit 1 if anything is missing, install nothing
set -euo pipefail

want_rig=1 check=0
case "${1:-}" in
  --tests) want_rig=0 ;;
  --check) check=1 ;;
esac

# Debian packages, each with a file that proves it is installed.  The openssh-server
# postinst starts no daemon in a container without init; the tests start their own sshd.
# shellcheck source=ci/apt-missing.sh
. "$(cd "$(dirname "$0")/.." && pwd)/apt-missing.sh"
debs=(openssh-server=/usr/sbin/sshd openssh-client=/usr/bin/ssh-keygen iproute2=/usr/sbin/ip)
if [ "$want_rig" = 1 ]; then
  debs+=(qemu-system-x86=/usr/bin/qemu-system-x86_64 mmdebstrap=/usr/bin/mmdebstrap
         zstd=/usr/bin/zstd cpio=/usr/bin/cpio kmod=/usr/sbin/depmod
         debian-archive-keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
fi
if [ "$check" = 1 ]; then
  [ -z "$(missing_debs "${debs[@]}")" ]
  exit
fi
apt_install_missing install-test-deps "${debs[@]}"
