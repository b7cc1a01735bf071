#!/usr/bin/env bash
# Stop the rig booted by boot-rig.sh (by its pid file only) and remove its state.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"
pidfile="$RIG_STATE/qemu.pid"
if [ -s "$pidfile" ]; then
  pid="$(cat "$pidfile")"
  # Only a QEMU we started: check the command name before signalling.
  if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = qemu-system-x86 ]; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rig_log "stopped QEMU pid $pid"
  fi
fi
rm -f "$pidfile" "$RIG_STATE/port" "$RIG_STATE/inventory.toml" "$RIG_STATE/known_hosts"
[ "${1:-}" = "--keep-log" ] || rm -f "$RIG_STATE/console.log"
exit 0
