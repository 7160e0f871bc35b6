#!/usr/bin/env bash
# Load tests for docs/benchmarks.md (never run by the test suite). Builds release, pins the
# server to core 0 and the load generator to core 1, runs each case RUNS times and prints a
# markdown table of medians.
#
#   scripts/bench.sh accounting   # requests/s with acknowledged vs written accounting
#
# Knobs (environment): DURATION (default 10s), CONNECTIONS (64), RUNS (3), IDS (5000).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
RUNS=${RUNS:-3}
IDS=${IDS:-5000}
SERVER_CORE=${SERVER_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}

command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
cargo build --release --locked --quiet
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"
mkdir -p "$root"
head -c 1024 /dev/urandom >"$root/f1k"
head -c 102400 /dev/urandom >"$root/f100k"
head -c 32 /dev/urandom >"$work/secret"

# Starts roam with extra flags; sets ROAM_ADDR and ROAM_PID.
start_roam() {
  taskset -c "$SERVER_CORE" target/release/roam serve --root "$root" --listen 127.0.0.1:0 \
    --id-secret-file "$work/secret" "$@" >"$work/roam.out" 2>"$work/roam.err" &
  ROAM_PID=$!
  pids+=("$ROAM_PID")
  for _ in $(seq 100); do
    ROAM_ADDR=$(sed -n 's|roam listening on http://||p' "$work/roam.out")
    [ -n "$ROAM_ADDR" ] && return 0
    sleep 0.05
  done
  echo "roam did not start: $(cat "$work/roam.err")" >&2
  exit 1
}

stop_roam() {
  kill "$ROAM_PID" 2>/dev/null || true
  wait "$ROAM_PID" 2>/dev/null || true
}

# Mints $IDS client IDs over one keep-alive connection into $work/ids (the secret is shared, so
# they stay valid across the restarts between cases).
mint_ids() {
  local urls=()
  for _ in $(seq "$IDS"); do urls+=("http://$ROAM_ADDR/"); done
  curl -s "${urls[@]}" | fold -w 36 >"$work/ids"
  [ "$(wc -l <"$work/ids")" -ge "$IDS" ] || { echo "minting failed" >&2; exit 1; }
}

# wrk against ADDR for FILE; prints "req/s p50 p99".
wrk_once() {
  local addr=$1 file=$2
  taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency \
    -s scripts/wrk-sessions.lua "http://$addr" -- "$file" "$work/ids" >"$work/wrk.txt"
  if grep -q "Non-2xx" "$work/wrk.txt"; then
    echo "wrk saw errors:" >&2
    cat "$work/wrk.txt" >&2
    exit 1
  fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
  echo "$rps $p50 $p99"
}

# Median of RUNS runs of a command printing "req/s p50 p99"; ranks runs by req/s.
median_of_runs() {
  local lines=()
  for _ in $(seq "$RUNS"); do lines+=("$("$@")"); done
  printf '%s\n' "${lines[@]}" | sort -n -k1,1 | sed -n "$(((RUNS + 1) / 2))p"
}

bench_accounting() {
  echo "### Cost of acknowledged-byte accounting"
  echo
  echo "| file | accounting | req/s (median of $RUNS) | p50 | p99 |"
  echo "|---|---|---|---|---|"
  declare -A rps
  for file in f1k f100k; do
    for mode in written acknowledged; do
      start_roam --accounting "$mode"
      [ -s "$work/ids" ] || mint_ids
      read -r r p50 p99 < <(median_of_runs wrk_once "$ROAM_ADDR" "$file")
      stop_roam
      rps[$file-$mode]=$r
      echo "| $file | $mode | $r | $p50 | $p99 |"
    done
  done
  echo
  for file in f1k f100k; do
    awk -v a="${rps[$file-acknowledged]}" -v w="${rps[$file-written]}" -v f="$file" \
      'BEGIN { printf "%s: acknowledged/written = %.3f (cost %.1f%%)\n", f, a / w, (1 - a / w) * 100 }'
  done
}

case "${1:-accounting}" in
  accounting) bench_accounting ;;
  *) echo "usage: $0 accounting" >&2; exit 2 ;;
esac
