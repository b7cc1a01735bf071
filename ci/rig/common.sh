# Shared settings of the SVM rig in a box scripts (sourced, not run).
#
# KVMHARNESS_RIG_CACHE  built kernel + root (kept between runs; rebuilt only when missing)
# KVMHARNESS_RIG_STATE  a booted rig's pid file, console log, inventory, known_hosts
# KVMHARNESS_RIG_PORT   127.0.0.1 port forwarded to the rig's sshd (default: a free one)
# KVMHARNESS_RIG_MIRROR Debian mirror (default: the one apt on this machine uses)
RIG_CACHE="${KVMHARNESS_RIG_CACHE:-/var/cache/kvmharness-rig}"
RIG_STATE="${KVMHARNESS_RIG_STATE:-/tmp/kvmharness-rig}"
RIG_SUITE="${KVMHARNESS_RIG_SUITE:-bookworm}"
RIG_NAME=svm-rig
RIG_KERNEL="$RIG_CACHE/vmlinuz"
RIG_INITRD="$RIG_CACHE/rig.cpio.zst"
RIG_KEY="$RIG_CACHE/rig_ed25519"          # user key: its .pub is root's authorized key
RIG_HOSTKEY_PUB="$RIG_CACHE/ssh_host_ed25519_key.pub"

rig_log() { printf '%s rig: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
rig_die() { rig_log "error: $*"; exit 1; }

# The Debian mirror apt is configured with: deb822 .sources first, then the
# one-line format.  Only a plain ".../debian" archive qualifies (not -security,
# not third-party repositories).
rig_mirror() {
  if [ -n "${KVMHARNESS_RIG_MIRROR:-}" ]; then echo "$KVMHARNESS_RIG_MIRROR"; return; fi
  local m etc="${KVMHARNESS_APT_ETC:-/etc/apt}"
  m=$( { cat "$etc"/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
         cat "$etc"/sources.list "$etc"/sources.list.d/*.list 2>/dev/null \
           | sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'
       } | grep -E '/debian/?$' | head -n1)
  [ -n "$m" ] || m=http://deb.debian.org/debian
  echo "${m%/}"
}
