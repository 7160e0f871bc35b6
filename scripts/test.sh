#!/usr/bin/env bash
# Runs roam's whole test suite, first installing the real tools the tests drive (curl, wget,
# wget2, aria2c, lftp, axel, httpie, python3, nginx, ip, prlimit, setpriv, mkfifo, openssl,
# logrotate, systemd-analyze, and redis-server with redis-cli, which the fleet tests start on free
# ports of their own), then fuzzes the request parser and router and the TLS layer for a minute
# (scripts/fuzz.sh installs cargo-fuzz). Tests that need a tool fail under CI=true when it is
# missing, so this script is what makes a fresh machine able to pass.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v wget >/dev/null || missing+=(wget)
command -v wget2 >/dev/null || missing+=(wget2)
command -v aria2c >/dev/null || missing+=(aria2)
command -v lftp >/dev/null || missing+=(lftp)
command -v axel >/dev/null || missing+=(axel)
command -v http >/dev/null || missing+=(httpie)
command -v python3 >/dev/null || missing+=(python3)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing+=(iproute2)
command -v prlimit >/dev/null || missing+=(util-linux)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v mkfifo >/dev/null || missing+=(coreutils)
command -v openssl >/dev/null || missing+=(openssl)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v logrotate >/dev/null || [ -x /usr/sbin/logrotate ] || missing+=(logrotate)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
summary() {
  awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
}
if [ "$status" -ne 0 ]; then
  summary
  exit "$status"
fi
./scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
summary
