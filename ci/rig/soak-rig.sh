#!/usr/bin/env bash
# Repeated boot-and-run cycles of the SVM rig in a box, to measure how often it
# survives: soak-rig.sh N [COMMAND...]
# Each cycle boots the rig, runs kvm-smoke.py in it over ssh (a KVM guest to
# HLT), then COMMAND if given (with KVMHARNESS_RIGS pointing at the rig's
# inventory), and stops it.  Prints one line per cycle and a summary; exit 1 if
# any cycle failed.  Uses its own state dir so it never touches another rig.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
n="${1:?usage: soak-rig.sh N [COMMAND...]}"; shift
export KVMHARNESS_RIG_STATE="${KVMHARNESS_RIG_STATE:-/tmp/kvmharness-rig-soak}"
. "$here/common.sh"
ok=0; fail=0
trap '"$here/stop-rig.sh" --keep-log; echo "soak: interrupted after $((ok+fail)) cycles: $ok ok, $fail failed"; exit 130' INT TERM
for i in $(seq 1 "$n"); do
  t0=$(date +%s.%N)
  status=ok; why=""
  if ! inv="$("$here/boot-rig.sh" 2>"$RIG_STATE.boot.log")"; then
    status=FAIL; why="boot: $(tail -n1 "$RIG_STATE.boot.log")"
  fi
  t_boot=$(python3 -c "import time; print(f'{time.time()-$t0:.1f}')")
  if [ "$status" = ok ]; then
    port="$(cat "$RIG_STATE/port")"
    if ! out="$(timeout 120 ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
          -o UserKnownHostsFile="$RIG_STATE/known_hosts" -i "$RIG_KEY" -p "$port" \
          root@127.0.0.1 python3 - < "$here/kvm-smoke.py" 2>&1)"; then
      status=FAIL; why="smoke: $(echo "$out" | tail -n1)"
    fi
  fi
  if [ "$status" = ok ] && [ "$#" -gt 0 ]; then
    if ! out="$(KVMHARNESS_RIGS="$inv" timeout 900 "$@" 2>&1)"; then
      status=FAIL; why="command: $(echo "$out" | tail -n3 | tr '\n' ' ')"
    fi
  fi
  if grep -qE 'Oops|BUG:|soft lockup|Call Trace' "$RIG_STATE/console.log" 2>/dev/null; then
    status=FAIL; why="$why kernel: $(grep -m1 -E 'Oops|BUG:|soft lockup|Call Trace' "$RIG_STATE/console.log")"
  fi
  [ "$status" = ok ] || cp "$RIG_STATE/console.log" "$RIG_STATE.fail-$i.console.log" 2>/dev/null
  "$here/stop-rig.sh" >/dev/null 2>&1
  t_all=$(python3 -c "import time; print(f'{time.time()-$t0:.1f}')")
  if [ "$status" = ok ]; then ok=$((ok+1)); else fail=$((fail+1)); fi
  echo "soak: cycle $i/$n $status ssh-ready ${t_boot}s total ${t_all}s $why"
done
echo "soak: $ok of $n cycles ok, $fail failed"
[ "$fail" = 0 ]
