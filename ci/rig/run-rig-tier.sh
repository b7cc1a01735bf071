#!/usr/bin/env bash
# CI tier: the SVM rig in a box.  Builds the rig (or takes it from the cache),
# boots it, checks it is a real SVM host (kvm_amd loaded, svm, npt), runs a KVM
# guest to HLT in it, runs the requires_svm and requires_kvm tests there through
# `kvmharness rig run`, and tears it down.
#
# Exit 0: passed, or skipped because this host cannot build/boot the rig (the
# reason is printed as "rig tier: SKIPPED: ...").  Non-zero: a real failure.
# Results: ${KVMHARNESS_RIG_RESULTS:-results}/<run-id>/svm-rig/.
# Budget: first build ~1 min, boot ~15 s, the rest is the tests (the whole
# tier is bounded by RIG_TIER_TIMEOUT seconds, default 540).
#
# RIG_TIER_PYTEST_ARGS (shell words) overrides what pytest runs on the rig.
# KVMHARNESS_RIG_INVENTORY: a rig the caller booted already (boot-rig.sh's inventory,
# with KVMHARNESS_RIG_STATE its state dir): the tier uses it and leaves it running
# (the test session's shared rig, tests/rig_fixtures.py).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export KVMHARNESS_RIG_STATE="${KVMHARNESS_RIG_STATE:-/tmp/kvmharness-rig-tier}"
. "$here/common.sh"
py="${PYTHON:-python3}"
budget="${RIG_TIER_TIMEOUT:-540}"
results="${KVMHARNESS_RIG_RESULTS:-$repo/results}"
# Default: every test that needs real KVM or SVM; here both mean kvm_amd.
if [ -n "${RIG_TIER_PYTEST_ARGS:-}" ]; then
  mapfile -t pytest_args < <(python3 -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' \
                             "$RIG_TIER_PYTEST_ARGS")
else
  pytest_args=(-m "requires_svm or requires_kvm" -q -rs tests)
fi
t_start=$(date +%s)

skip() { echo "rig tier: SKIPPED: $*"; exit 0; }
fail() { echo "rig tier: FAILED: $*"; exit 1; }
left() { echo $(( budget - ($(date +%s) - t_start) )); }

if [ -n "${KVMHARNESS_RIG_INVENTORY:-}" ]; then
  inv="$KVMHARNESS_RIG_INVENTORY"
  [ -s "$inv" ] && [ -s "$RIG_STATE/port" ] || fail "no booted rig at $inv (state $RIG_STATE)"
  echo "rig tier: using the rig booted by the caller ($inv)"
else
  [ "$(id -u)" = 0 ] || skip "needs root (mmdebstrap, apt) to build the rig"
  [ "$(uname -m)" = x86_64 ] || skip "needs an x86_64 host"
  if ! "$here/install-test-deps.sh" >/tmp/rig-tier-install.log 2>&1; then
    tail -n 5 /tmp/rig-tier-install.log
    skip "could not install qemu-system-x86/mmdebstrap (see above)"
  fi

  trap '"$here/stop-rig.sh" --keep-log >/dev/null 2>&1' EXIT
  if ! timeout "$(left)" "$here/build-rig.sh"; then
    skip "building the rig failed (no Debian mirror reachable?)"
  fi
  t_built=$(date +%s)
  inv="$(timeout "$(left)" "$here/boot-rig.sh")" || {
    tail -n 40 "$RIG_STATE/console.log" 2>/dev/null
    fail "the rig did not boot to SSH"
  }
  t_booted=$(date +%s)
  echo "rig tier: built/cached in $((t_built - t_start)) s, ssh ready $((t_booted - t_built)) s later"
fi

# 1. A KVM guest runs to HLT inside the rig (standard library only).
echo "rig tier: kvm-smoke.py in the rig"
ssh_opts=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$RIG_STATE/known_hosts"
          -i "$RIG_KEY" -p "$(cat "$RIG_STATE/port")")
timeout 120 ssh "${ssh_opts[@]}" root@127.0.0.1 python3 - < "$here/kvm-smoke.py" \
  || fail "kvm-smoke.py: a KVM guest did not run to HLT inside the rig"

# 2. `kvmharness rig check`: must see SVM with nested paging through kvm_amd.
cd "$repo"
echo "rig tier: kvmharness rig check --ship"
check_json="$(timeout "$(left)" "$py" -m kvmharness rig check --inventory "$inv" --rig "$RIG_NAME" --ship --json)" \
  || { echo "$check_json"; fail "kvmharness rig check failed"; }
"$py" - "$check_json" <<'PY' || fail "the rig is not the SVM host it should be"
import json, sys
rig = json.loads(sys.argv[1])["svm-rig"]
cap, info = rig["capabilities"], rig["info"]
print("rig tier: capabilities", " ".join(f"{k}={v}" for k, v in cap.items()))
bad = [k for k in ("kvm", "svm", "npt") if cap[k] != "yes"]
if info.get("kvm_amd") is None:
    bad.append("kvm_amd not loaded")
sys.exit(f"missing: {', '.join(bad)}" if bad else 0)
PY

# 3. The tests that need SVM, on the rig, with the kvm backend.
echo "rig tier: kvmharness rig run -- pytest ${pytest_args[*]}"
timeout "$(left)" "$py" -m kvmharness rig run --inventory "$inv" --rig "$RIG_NAME" --backend kvm \
  --timeout "$(( $(left) - 20 ))" --results "$results" --plain -- pytest "${pytest_args[@]}"
status=$?
echo "rig tier: done in $(( $(date +%s) - t_start )) s (rig run exit $status)"
case "$status" in
  0) echo "rig tier: PASSED" ;;
  5) echo "rig tier: PASSED (no test matched '${pytest_args[*]}' on the rig: nothing to run yet)" ;;
  *) fail "rig run exited $status" ;;
esac
