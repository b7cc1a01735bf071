#!/usr/bin/env bash
# Boot the SVM rig in a box (building it first if the cache is empty), wait until
# its sshd answers, and write an inventory for it:
#   $KVMHARNESS_RIG_STATE/inventory.toml   (rig "svm-rig", labels svm, tcg)
#   $KVMHARNESS_RIG_STATE/known_hosts      (the rig's host key, pinned)
#   $KVMHARNESS_RIG_STATE/console.log      (serial console)
#   $KVMHARNESS_RIG_STATE/qemu.pid
# QEMU: TCG with an EPYC CPU model (+svm), ONE vCPU (two under MTTCG oopsed now
# and then in the measurements), user networking with only 127.0.0.1:PORT -> 22.
# Prints the inventory path on stdout.  Stop it with ci/rig/stop-rig.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

wait_s="${KVMHARNESS_RIG_BOOT_TIMEOUT:-180}"
"$here/build-rig.sh" >&2
command -v qemu-system-x86_64 >/dev/null || rig_die "qemu-system-x86_64 missing: run ci/rig/install-test-deps.sh"

mkdir -p "$RIG_STATE"
if [ -s "$RIG_STATE/qemu.pid" ] && kill -0 "$(cat "$RIG_STATE/qemu.pid")" 2>/dev/null; then
  rig_die "a rig is already running (pid $(cat "$RIG_STATE/qemu.pid")); run ci/rig/stop-rig.sh first"
fi
rm -f "$RIG_STATE/qemu.pid" "$RIG_STATE/console.log"

port="${KVMHARNESS_RIG_PORT:-}"
if [ -z "$port" ]; then
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

t0=$(date +%s.%N)
# -daemonize needs no stdio console, so the serial console goes to a file
# instead of -nographic's stdio; otherwise the machine is the measured one.
qemu-system-x86_64 -accel tcg -machine q35 -cpu EPYC,+svm -smp 1 -m 2048 \
  -display none -no-reboot -monitor none \
  -serial "file:$RIG_STATE/console.log" \
  -kernel "$RIG_KERNEL" -initrd "$RIG_INITRD" \
  -append "console=ttyS0 panic=-1 quiet rdinit=/init" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0 \
  -pidfile "$RIG_STATE/qemu.pid" -daemonize 2>"$RIG_STATE/qemu.log"
# (qemu.log: TCG warns about EPYC features it lacks, e.g. nrip-save; harmless.)

# The pinned host key, in OpenSSH's known_hosts format for a non-22 port.
printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1-2 "$RIG_HOSTKEY_PUB")" > "$RIG_STATE/known_hosts"
cat > "$RIG_STATE/inventory.toml" <<TOML
# Written by ci/rig/boot-rig.sh: the SVM rig in a box (QEMU TCG, EPYC,+svm).
[rigs.$RIG_NAME]
host = "127.0.0.1"
port = $port
user = "root"
key_file = "$RIG_KEY"
known_hosts = "$RIG_STATE/known_hosts"
python = "/usr/bin/python3"
labels = ["svm", "tcg", "rig-in-a-box"]
TOML
echo "$port" > "$RIG_STATE/port"

# Ready = a real SSH login runs a command (a bare TCP connect is answered by
# QEMU's forwarder even before the guest is up).
ssh_opts=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$RIG_STATE/known_hosts"
          -o ConnectTimeout=5 -o LogLevel=ERROR -i "$RIG_KEY" -p "$port")
deadline=$(( $(date +%s) + wait_s ))
until ssh "${ssh_opts[@]}" root@127.0.0.1 true 2>/dev/null; do
  if ! kill -0 "$(cat "$RIG_STATE/qemu.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
    tail -n 30 "$RIG_STATE/console.log" >&2 || true
    rig_die "QEMU exited during boot (console above)"
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    tail -n 30 "$RIG_STATE/console.log" >&2 || true
    rig_die "no SSH login within $wait_s s (console above)"
  fi
  sleep 0.5
done
rig_log "ssh ready on 127.0.0.1:$port after $(python3 -c "import time; print(f'{time.time()-$t0:.1f}')") s"
echo "$RIG_STATE/inventory.toml"
