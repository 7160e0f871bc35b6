#!/usr/bin/env bash
# Runs roam's coverage-guided fuzzer over the request parser and router for SECONDS (default 60):
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
target=request_router
cargo_fuzz_version=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
  echo "installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi

mkdir -p "fuzz/corpus/$target"
cd fuzz
# -s none: libFuzzer's coverage instrumentation only (stable rustc flags); debug assertions and
# overflow checks stay on (cargo-fuzz's default), so arithmetic overflow is a crash too.
cargo fuzz build -s none "$target"
echo "fuzzing $target for ${seconds}s"
# The progress lines (thousands a minute) are left out; everything else, a crash report
# included, is shown.
set +e
cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -max_len=4096 -timeout=10 -print_final_stats=1 2>&1 |
  grep -Ev '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "fuzz: $target crashed; the input is in fuzz/artifacts/$target/" >&2
  exit "$status"
fi
