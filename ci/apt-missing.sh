# Sourced by ci/install-deps.sh and ci/rig/install-test-deps.sh.
#
# apt_install_missing WHO PKG=FILE ...
#   installs every Debian package whose proof FILE is absent, in one apt run;
#   does nothing (no apt-get update) when all are present.  --no-install-recommends
#   keeps qemu from pulling a desktop's worth of GUI libraries.
apt_install_missing() {
  local who=$1 pair missing=()
  shift
  for pair in "$@"; do
    [ -e "${pair#*=}" ] || missing+=("${pair%%=*}")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "$who: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
