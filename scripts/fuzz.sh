#!/usr/bin/env bash
# Runs roam's coverage-guided fuzzers for SECONDS in all (default 60): the request parser and
# router, then the HTTPS listener's TLS layer;
# cargo-fuzz driving libFuzzer, on the stable toolchain (no sanitizer, so no nightly flags).
# Installs cargo-fuzz when missing. Fails when the fuzzer finds a crash; the input that crashed
# is kept in fuzz/artifacts/request_router/ and must become a regression test (see
# docs/SECURITY.md) and a seed in fuzz/seeds/request_router/.
#
#   scripts/fuzz.sh [SECONDS]
#
# fuzz/seeds/ is the committed seed corpus (request heads from the tests). What the fuzzer
# learns goes to fuzz/corpus/ (not committed) and is reused by the next run on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
cargo_fuzz_version=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
  echo "installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi

# Two targets share the time: the request parser and router (two thirds: what every request
# reaches), and the HTTPS listener's TLS layer and record map (a third).
run_target() {
  local target=$1 secs=$2
  mkdir -p "corpus/$target" "seeds/$target"
  # -s none: libFuzzer's coverage instrumentation only (stable rustc flags); debug assertions
  # and overflow checks stay on (cargo-fuzz's default), so arithmetic overflow is a crash too.
  cargo fuzz build -s none "$target"
  echo "fuzzing $target for ${secs}s"
  # The progress lines (thousands a minute) are left out; everything else, a crash report
  # included, is shown.
  set +e
  cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -print_final_stats=1 2>&1 |
    grep -Ev '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)'
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $target crashed; the input is in fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
}

cd fuzz
tls_seconds=$(( seconds / 3 > 0 ? seconds / 3 : 1 ))
run_target request_router $(( seconds - tls_seconds > 0 ? seconds - tls_seconds : 1 ))
run_target tls_server "$tls_seconds"
