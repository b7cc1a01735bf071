#!/usr/bin/env bash
# Install what the remote-rig tests and the SVM rig in a box need on a clean
# Debian 12 machine.  Idempotent: when everything is present it only checks
# (well under a second) and touches neither apt nor pip.
#
#   ci/rig/install-test-deps.sh          # sshd + iproute2 (tests) and rig tools
#   ci/rig/install-test-deps.sh --tests  # only what tests/test_remote_* need
set -euo pipefail

want_rig=1
[ "${1:-}" = "--tests" ] && want_rig=0

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
apt_install_missing install-test-deps "${debs[@]}"

# Python packages used by the remote code and its tests (also in pyproject).
py="${PYTHON:-python3}"
# wheel: `rig run` builds the project's wheel with `pip wheel --no-build-isolation`
# (2 s, offline) when setuptools and wheel are importable, else pip fetches them.
if ! "$py" -c 'import paramiko, pyroute2, wheel' 2>/dev/null; then
  echo "install-test-deps: pip install paramiko pyroute2 wheel" >&2
  "$py" -m pip install -q 'paramiko>=3.0' 'pyroute2>=0.7' wheel
fi
