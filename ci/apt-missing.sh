# Sourced by ci/install-deps.sh and ci/rig/install-test-deps.sh.
#
# missing_debs PKG=FILE ...
#   prints (one a line) every Debian package whose proof FILE is absent.
# apt_install WHO PKG ...
#   one `apt-get update` + `apt-get install` of PKG...; does nothing without PKG.
#   --no-install-recommends keeps qemu from pulling a desktop's worth of GUI libraries.
# apt_install_missing WHO PKG=FILE ...
#   both: installs only what is missing; no apt-get update when all is present.
missing_debs() {
  local pair
  for pair in "$@"; do
    [ -e "${pair#*=}" ] || echo "${pair%%=*}"
  done
}

apt_install() {
  local who=$1
  shift
  [ "$#" -gt 0 ] || return 0
  echo "$who: apt-get install $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

apt_install_missing() {
  local who=$1 missing
  shift
  mapfile -t missing < <(missing_debs "$@")
  apt_install "$who" "${missing[@]}"
}
