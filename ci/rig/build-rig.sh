#!/usr/bin/env bash
# Build the SVM rig in a box: a Debian kernel plus a minbase root (sshd, python3,
# the kvm backend's Debian dependencies) packed as one zstd initramfs whose
# /init is a tiny shell script.  Output in $KVMHARNESS_RIG_CACHE:
#   vmlinuz  rig.cpio.zst  rig_ed25519{,.pub}  ssh_host_ed25519_key{,.pub}  KVER  BUILD_ID
# Rebuilds only when something is missing, when this script changed, or with --force.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

force=0
[ "${1:-}" = "--force" ] && force=1
# The cache is keyed by this script (its package list, /init, ...): an edit here
# rebuilds; otherwise a complete cache is used as it is.
build_id="$(cat "$here/build-rig.sh" "$here/common.sh" | sha256sum | cut -c1-16)"
if [ "$force" = 0 ] && [ -s "$RIG_KERNEL" ] && [ -s "$RIG_INITRD" ] && [ -s "$RIG_KEY" ] \
   && [ -s "$RIG_HOSTKEY_PUB" ] && [ "$(cat "$RIG_CACHE/BUILD_ID" 2>/dev/null)" = "$build_id" ]; then
  rig_log "cached build in $RIG_CACHE ($(cat "$RIG_CACHE/KVER" 2>/dev/null), build $build_id)"
  exit 0
fi

for tool in mmdebstrap zstd cpio depmod modprobe ssh-keygen apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || rig_die "$tool missing: run ci/rig/install-test-deps.sh"
done

t0=$(date +%s)
mirror="$(rig_mirror)"
mkdir -p "$RIG_CACHE"
work="$(mktemp -d "$RIG_CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"

# 1. Kernel: the image package linux-image-amd64 points at, from the host's apt.
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
fi
[ -n "$kpkg" ] || rig_die "no linux-image-amd64 candidate in apt (is a Debian mirror configured?)"
rig_log "kernel package $kpkg, mirror $mirror"
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg")
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
kver="$(ls "$work/kernel/lib/modules" 2>/dev/null || ls "$work/kernel/usr/lib/modules")"
kmoddir="$work/kernel/lib/modules/$kver"
[ -d "$kmoddir" ] || kmoddir="$work/kernel/usr/lib/modules/$kver"
depmod -b "$work/kernel" "$kver" 2>/dev/null || depmod -b "$work/kernel/usr" "$kver"

# 2. Root: minbase + what `rig run` needs remotely.  python3-pip installs the
# shipped wheel into the per-run venv (--no-index; the rig reaches no index).
# mount (in minbase, not in --variant=apt) is what /init mounts /proc with.
# python3-cryptography: the SEV code's certificate checks; python3-hypothesis: the
# property tests (the project's [test] extra).  procps: pkill -s,
# with which `rig run` stops a remote command's whole session.
pkgs=openssh-server,python3,python3-pip,python3-cffi,python3-psutil,python3-pytest,python3-cryptography
pkgs=$pkgs,python3-hypothesis,kmod,iproute2,procps
rig_log "mmdebstrap $RIG_SUITE minbase + $pkgs"
mmdebstrap --quiet --variant=minbase --include="$pkgs" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  "$RIG_SUITE" "$root" "$mirror"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log

# 3. Modules kvm_amd and virtio-net need (with their dependencies), nothing else.
mods="$(modprobe -d "$work/kernel" -S "$kver" --show-depends -a kvm_amd virtio_net virtio_pci 2>/dev/null \
        || modprobe -d "$work/kernel/usr" -S "$kver" --show-depends -a kvm_amd virtio_net virtio_pci)"
dst="$root/lib/modules/$kver"
mkdir -p "$dst"
cp "$kmoddir"/modules.order "$kmoddir"/modules.builtin* "$dst/" 2>/dev/null || true
echo "$mods" | awk '$1=="insmod"{print $2}' | while read -r ko; do
  rel="kernel/${ko#*/kernel/}"
  mkdir -p "$dst/$(dirname "$rel")"
  case "$ko" in
    *.xz)  xz -dc "$ko" > "$dst/${rel%.xz}" ;;
    *.zst) zstd -qdc "$ko" > "$dst/${rel%.zst}" ;;
    *)     cp "$ko" "$dst/$rel" ;;
  esac
done
depmod -b "$root" "$kver"
cp "$work"/kernel/boot/vmlinuz-"$kver" "$work/vmlinuz"

# 4. SSH: a throwaway user key for root and one ed25519 host key, both kept in
# the cache and reused by rebuilds, so a rig booted from an older build still
# takes the same key and matches the same known_hosts line.
if [ -s "$RIG_KEY" ] && [ -s "$RIG_CACHE/ssh_host_ed25519_key" ]; then
  cp -p "$RIG_KEY" "$RIG_KEY.pub" "$work/"
  cp -p "$RIG_CACHE/ssh_host_ed25519_key" "$RIG_HOSTKEY_PUB" "$work/"
else
  ssh-keygen -q -t ed25519 -N '' -C kvmharness-rig -f "$work/rig_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C svm-rig -f "$work/ssh_host_ed25519_key"
fi
install -d -m 700 "$root/root/.ssh"
install -m 600 "$work/rig_ed25519.pub" "$root/root/.ssh/authorized_keys"
rm -f "$root"/etc/ssh/ssh_host_*_key*
install -m 600 "$work/ssh_host_ed25519_key" "$root/etc/ssh/ssh_host_ed25519_key"
install -m 644 "$work/ssh_host_ed25519_key.pub" "$root/etc/ssh/ssh_host_ed25519_key.pub"
cat > "$root/etc/ssh/sshd_config.d/rig.conf" <<'CONF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxStartups 30:60:60
CONF
echo svm-rig > "$root/etc/hostname"

# 5. PID 1.  The kernel names the only NIC eth0 (no udev); QEMU user networking
# answers at 10.0.2.2.  nested=1 lets a KVM guest in the rig use SVM itself.
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/sshd
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
hostname svm-rig
modprobe kvm_amd nested=1 || echo "rig-init: kvm_amd did not load" > /dev/console
modprobe virtio_pci; modprobe virtio_net
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
/usr/sbin/sshd -e
echo "rig-init: sshd started" > /dev/console
# Reap orphans forever; the rig is stopped by killing QEMU.
while :; do wait; sleep 2; done
INIT
chmod 755 "$root/init"

# 6. Pack.
rig_log "packing initramfs"
(cd "$root" && find . -xdev | LC_ALL=C sort | cpio --quiet -o -H newc | zstd -q -3 -T0 > "$work/rig.cpio.zst")
echo "$kver" > "$work/KVER"
echo "$build_id" > "$work/BUILD_ID"
for f in vmlinuz rig.cpio.zst rig_ed25519 rig_ed25519.pub ssh_host_ed25519_key ssh_host_ed25519_key.pub \
         KVER BUILD_ID; do
  mv -f "$work/$f" "$RIG_CACHE/$f"
done
rig_log "built in $(( $(date +%s) - t0 )) s: kernel $kver, initramfs $(du -h "$RIG_INITRD" | cut -f1)"
