#!/usr/bin/env bash
# What kvmharness needs from the OS on a clean Debian/Ubuntu machine; installs no
# Python package anywhere (the README's commands pip-install into .venv only, so a
# distribution python3 marked EXTERNALLY-MANAGED, PEP 668, is never touched).
# Idempotent: when all is present it only checks (well under a second, no sudo).
#
#   bash ci/install-deps.sh         the main job (kvmharness info / suite):
#     python3, python3-venv    `python3 -m venv` (Debian's and Ubuntu's python3 lack
#                              ensurepip without python3-venv); installed only when
#                              a venv cannot be made with the python3 on PATH
#     nothing else: the kvm backend is cffi in ABI mode (no compiler), the guest
#     images are prebuilt, the simulator's unicorn comes as a wheel into the venv
#   bash ci/install-deps.sh --test  also what the tests need:
#     gcc, binutils, cpp       the layout test compiles against the kernel headers; the
#                              guest-image test rebuilds the guests with GNU as; bench
#                              builds its C reference
#     libc6-dev                the C library's headers (gcc only recommends it, and
#                              recommends are not installed)
#     linux-libc-dev           the kernel UAPI headers (linux/kvm.h, asm/kvm.h, psp-sev.h)
#     ci/rig/install-test-deps.sh  sshd + iproute2 for the remote-rig tests, QEMU +
#                              mmdebstrap for the SVM rig in a box
#
# As root it installs with apt-get; as another user it checks first and re-runs
# itself under sudo only when something is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=ci/apt-missing.sh
. "$here/apt-missing.sh"

test_deps=0 py=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --test) test_deps=1 ;;
    --python) py="$2"; shift ;;   # set by the sudo re-run: the caller's python3
    *) echo "usage: ci/install-deps.sh [--test]" >&2; exit 2 ;;
  esac
  shift
done
# The python3 the README's next step (`python3 -m venv .venv`) will use: the caller's,
# even under sudo, whose secure_path may name another one.
py="${py:-$(command -v python3 || true)}"

# Can $py make a venv with pip in it?  (Debian/Ubuntu: needs python3-venv, whose
# ensurepip module and bundled pip wheel are what `python3 -m venv` installs pip with.)
venv_works() {
  [ -n "$py" ] && "$py" - <<'PY' 2>/dev/null
import ensurepip, venv
assert ensurepip.version()
PY
}

debs=()
[ -n "$py" ] || debs+=(python3)
venv_works || debs+=(python3-venv)
if [ "$test_deps" = 1 ]; then
  mapfile -t -O "${#debs[@]}" debs < <(missing_debs gcc=/usr/bin/gcc binutils=/usr/bin/objcopy \
    cpp=/usr/bin/cpp libc6-dev=/usr/include/errno.h linux-libc-dev=/usr/include/linux/kvm.h)
fi

if [ "$(id -u)" != 0 ]; then
  if [ "${#debs[@]}" -gt 0 ] || { [ "$test_deps" = 1 ] && ! bash "$here/rig/install-test-deps.sh" --check; }; then
    args=(--python "${py:-python3}")
    [ "$test_deps" = 1 ] && args+=(--test)
    exec sudo bash "$0" "${args[@]}"
  fi
  exit 0
fi

apt_install install-deps "${debs[@]}"
if [ -z "$py" ]; then py="$(command -v python3 || true)"; fi
if ! venv_works; then
  echo "install-deps: ${py:-python3} still cannot make a venv with pip (python3-venv installed);" \
       "is it the distribution's python3?" >&2
  exit 1
fi
if [ "$test_deps" = 1 ]; then
  bash "$here/rig/install-test-deps.sh"
fi
