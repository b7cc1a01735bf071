#!/usr/bin/env bash
# The README's set-up on a fresh Debian 12 (bookworm): builds a minbase root with
# mmdebstrap (python3 -- the distribution's own, marked EXTERNALLY-MANAGED --,
# ca-certificates and sudo; no python3-venv, no pip), puts a clean clone of this
# repo in it and runs the README's main-job command there, timed:
#   1. as a user with sudo rights (ci/install-deps.sh re-runs itself under sudo and
#      apt-installs python3-venv), without /dev/kvm: every guest on the simulator;
#   2. as root in a second fresh clone, with this host's /dev/kvm bound in.
# Then checks that nothing was pip-installed outside the venvs.
#   --test      also run the README's test command as root (slow; KVMHARNESS_RIG_TESTS=0
#               unless already set, since the rig needs QEMU inside the chroot, and
#               KVMHARNESS_FRESH_DEBIAN=0: no fresh root inside the fresh root)
#   --worktree  copy the work tree as it is (tracked and untracked files, not .venv)
#               instead of cloning HEAD
#   --keep      keep the root (printed) instead of removing it
# Needs root and mmdebstrap (ci/rig/install-test-deps.sh installs it).  About 1.5 min
# here, most of it the mmdebstrap.  Exit 0 passed, 77 skipped (no Debian mirror), else
# failed.  tests/test_rig_scripts.py runs it (a clone of HEAD) inside the test run.
#
# The site's network set-up is carried in, not packages: /etc/resolv.conf, the local
# CAs from /usr/local/share/ca-certificates, and the proxy / PIP_INDEX_URL / PIP_CERT
# variables of this environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$here/rig/common.sh"

run_tests=0 worktree=0 keep=0
for a in "$@"; do
  case "$a" in
    --test) run_tests=1 ;;
    --worktree) worktree=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: ci/check-fresh-debian.sh [--test] [--worktree] [--keep]" >&2; exit 2 ;;
  esac
done
say() { printf '%s fresh-debian: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, chroot, mounts)"
command -v mmdebstrap >/dev/null || die "mmdebstrap missing: run ci/rig/install-test-deps.sh"

# The README's commands, taken from it (the first sh block line with each).
readme_cmd() { python3 - "$repo/README.md" "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
lines = [l.strip() for b in re.findall(r"```sh\n(.*?)```", text, re.S) for l in b.splitlines()]
print(next(l for l in lines if sys.argv[2] in l))
PY
}
main_cmd="$(readme_cmd 'kvmharness suite')"
test_cmd="$(readme_cmd 'pytest')"

work="$(mktemp -d /tmp/kvmharness-fresh.XXXXXX)"
root="$work/root"
mounts=()
cleanup() {
  local i m
  # what the tests mounted inside (ip netns binds /run/netns), deepest first, then ours
  while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
    awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r)
  for (( i=${#mounts[@]}-1; i>=0; i-- )); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  if [ "$keep" = 1 ]; then say "kept $root"; else rm -rf "$work"; fi
}
trap cleanup EXIT
bind() {  # bind SRC DEST-inside-root
  [ -d "$1" ] && mkdir -p "$root$2" || { [ -e "$root$2" ] || touch "$root$2"; }
  mount --bind "$1" "$root$2"
  mounts+=("$root$2")
}

t0=$(date +%s)
say "mmdebstrap bookworm minbase + python3, ca-certificates, sudo from $(rig_mirror)"
if ! mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates,sudo \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$root" "$(rig_mirror)"; then
  say "SKIPPED: mmdebstrap could not build a bookworm root (no Debian mirror reachable?)"
  exit 77
fi
say "root built in $(( $(date +%s) - t0 )) s"
managed=("$root"/usr/lib/python3*/EXTERNALLY-MANAGED)
[ -f "${managed[0]}" ] || die "the root's python3 is not marked EXTERNALLY-MANAGED"
[ ! -e "$root/usr/lib/python3/dist-packages/pip" ] || die "the root already has pip"
say "python3 $(chroot "$root" python3 -c 'import sys; print(sys.version.split()[0])'), ${managed[0]#"$root"}"

# The site's network, as this machine has it.
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '127.0.1.1 %s\n' "$(hostname)" >> "$root/etc/hosts"  # sudo looks its host name up
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
bind "$root" /     # the root a mount point, as on a machine (sshd's netns tests remount / rslave)
bind /proc /proc
bind /sys /sys
bind /dev/pts /dev/pts
envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 CI=true)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_CERT \
         PIP_DEFAULT_TIMEOUT; do
  [ -n "${!v:-}" ] && envs+=("$v=${!v}")
done

copy_repo() {  # copy_repo DEST-inside-root
  if [ "$worktree" = 1 ]; then
    mkdir -p "$root$1"
    (cd "$repo" && git ls-files -co --exclude-standard -z | grep -zv '^\.venv' \
       | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$root$1"
  else
    git clone --quiet "$repo" "$root$1"
  fi
}

timed() {  # timed LABEL COMMAND...: runs it, prints its wall time, keeps its log
  local label=$1 s rc=0
  shift
  s=$(date +%s.%N)
  "$@" >"$work/$label.log" 2>&1 || rc=$?
  say "$label: exit $rc in $(python3 -c "print(f'{$(date +%s.%N) - $s:.1f}')") s (log: tail below)"
  tail -n 12 "$work/$label.log" | sed 's/^/    /' >&2
  return "$rc"
}

# 1. A sudo user, no /dev/kvm: install-deps.sh asks sudo for python3-venv.
chroot "$root" useradd -m -s /bin/bash tester
echo 'tester ALL=(ALL:ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/tester"
copy_repo /home/tester/kvmharness
chroot "$root" chown -R tester: /home/tester/kvmharness
[ ! -e "$root/dev/kvm" ] || rm -f "$root/dev/kvm"
timed sudo-user chroot "$root" env -i "${envs[@]}" HOME=/home/tester \
  setpriv --reuid=tester --regid=tester --init-groups \
  bash -c "cd /home/tester/kvmharness && $main_cmd" || die "the main job as a sudo user"
grep -q "python3-venv" "$work/sudo-user.log" || say "note: python3-venv was already there"
grep -qE '^[a-z0-9-]+ +passed +sim ' "$work/sudo-user.log" || die "no guest ran on the simulator"

# 2. Root, /dev/kvm bound in when this host has one.
copy_repo /root/kvmharness
[ -e /dev/kvm ] && bind /dev/kvm /dev/kvm
timed root chroot "$root" env -i "${envs[@]}" HOME=/root \
  bash -c "cd /root/kvmharness && $main_cmd" || die "the main job as root"

# Nothing outside the venvs: no pip module, nothing in the system site directories.
if chroot "$root" python3 -c 'import pip' 2>/dev/null; then die "pip got into the system python3"; fi
extra="$(find "$root"/usr/local/lib/python3* -mindepth 2 -maxdepth 2 2>/dev/null | head -n 3)"
[ -z "$extra" ] || die "something was installed into the system python3: $extra"

if [ "$run_tests" = 1 ]; then
  timed tests chroot "$root" env -i "${envs[@]}" HOME=/root \
    KVMHARNESS_RIG_TESTS="${KVMHARNESS_RIG_TESTS:-0}" KVMHARNESS_FRESH_DEBIAN=0 \
    bash -c "cd /root/kvmharness && $test_cmd" || die "the test command as root"
fi
say "PASSED in $(( $(date +%s) - t0 )) s"
