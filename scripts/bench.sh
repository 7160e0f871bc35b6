#!/usr/bin/env bash
# Load tests for docs/benchmarks.md (never run by the test suite). Builds release, pins each
# server to core $SERVER_CORE and the load generator to core $LOAD_CORE, runs each case RUNS
# times and prints markdown tables of medians, with the ratio roam/nginx where it applies.
#
#   scripts/bench.sh accounting   # roam req/s with acknowledged vs written accounting
#   scripts/bench.sh small        # 1 KiB and 100 KiB downloads: roam, nginx, lighttpd (wrk, oha)
#   scripts/bench.sh large        # one 256 MiB download: GB/s and server CPU-seconds per GB
#   scripts/bench.sh conns        # 10,000 concurrent connections: req/s, errors, RSS/connection
#   scripts/bench.sh runtime      # roam multi-thread vs per-core runtime (1 KiB, 100 KiB)
#   scripts/bench.sh answers      # roam: minting IDs (GET /), repeated requests for finished files (416)
#   scripts/bench.sh all
#
# Knobs (environment): DURATION (10s), CONNECTIONS (64), RUNS (3), IDS (5000).
# Needs: wrk, nginx, lighttpd, curl, and oha (`cargo install --locked oha`) for latency.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
RUNS=${RUNS:-3}
IDS=${IDS:-5000}
SERVER_CORE=${SERVER_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"

for tool in wrk curl taskset; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
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
# nginx and lighttpd workers drop root privileges: everything they serve must be world-readable.
chmod 755 "$work"
head -c 1024 /dev/urandom >"$root/f1k"
head -c 102400 /dev/urandom >"$root/f100k"
chmod 644 "$root"/*
head -c 32 /dev/urandom >"$work/secret"

# ---- servers: each start_* sets ADDR and PID -------------------------------------------------

wait_port() { # wait until $1 (host:port) accepts connections
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "server at $1 did not start" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_roam() {
  taskset -c "$SERVER_CORE" target/release/roam serve --root "$root" --listen 127.0.0.1:0 \
    --id-secret-file "$work/secret" --max-connections 20000 "$@" >"$work/roam.out" 2>"$work/roam.err" &
  PID=$!
  pids+=("$PID")
  ADDR=""
  for _ in $(seq 200); do
    ADDR=$(sed -n 's|roam listening on http://||p' "$work/roam.out")
    [ -n "$ADDR" ] && break
    sleep 0.05
  done
  [ -n "$ADDR" ] || { echo "roam did not start: $(cat "$work/roam.err")" >&2; exit 1; }
}

start_nginx() {
  local port
  port=$(free_port)
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 1;
# One process, so its CPU time and memory are what /proc/PID shows.
master_process off;
worker_rlimit_nofile 65536;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 20000; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  open_file_cache max=1000 inactive=60s;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$port backlog=4096;
    root $root;
    # The same URLs as roam's /{id}/{file}.
    location / { rewrite ^/[^/]+/(.*)\$ /\$1 break; }
  }
}
CONF
  taskset -c "$SERVER_CORE" nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
  PID=$!
  pids+=("$PID")
  ADDR="127.0.0.1:$port"
  wait_port "$ADDR"
}

start_lighttpd() {
  local port
  port=$(free_port)
  mkdir -p "$work/lighttpd"
  cat >"$work/lighttpd/lighttpd.conf" <<CONF
server.document-root = "$root"
server.bind = "127.0.0.1"
server.port = $port
server.modules = ( "mod_rewrite" )
server.max-fds = 65536
server.max-connections = 20000
server.max-keep-alive-requests = 1000000
server.max-keep-alive-idle = 60
server.errorlog = "$work/lighttpd/error.log"
server.listen-backlog = 4096
url.rewrite-once = ( "^/[^/]+/(.*)\$" => "/\$1" )
CONF
  taskset -c "$SERVER_CORE" lighttpd -D -f "$work/lighttpd/lighttpd.conf" &
  PID=$!
  pids+=("$PID")
  ADDR="127.0.0.1:$port"
  wait_port "$ADDR"
}

stop_server() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
}

start_server() { # name [roam flags...]
  local name=$1
  shift
  case $name in
    roam) start_roam "$@" ;;
    nginx) start_nginx ;;
    lighttpd) start_lighttpd ;;
  esac
}

# Mints $IDS client IDs over one keep-alive connection into $work/ids (the secret is shared, so
# they stay valid across restarts). Other servers get the same URLs (their rewrite drops the ID).
mint_ids() {
  [ -s "$work/ids" ] && return 0
  start_roam
  local urls=()
  for _ in $(seq "$IDS"); do urls+=("http://$ADDR/"); done
  { curl -s "${urls[@]}" | fold -w 36; echo; } | grep -E '^[0-9a-f-]{36}$' >"$work/ids"
  stop_server
  [ "$(wc -l <"$work/ids")" -ge "$IDS" ] || { echo "minting failed" >&2; exit 1; }
}

# ---- load generators ------------------------------------------------------------------------

# wrk against ADDR for FILE with C connections; prints "req/s p50 p99 errors".
wrk_once() {
  local file=$1 conns=${2:-$CONNECTIONS}
  taskset -c "$LOAD_CORE" wrk -t1 -c"$conns" -d"$DURATION" --latency --timeout 10s \
    -s scripts/wrk-sessions.lua "http://$ADDR" -- "$file" "$work/ids" >"$work/wrk.txt" 2>&1 || true
  local rps p50 p99 errors
  [ -n "${BENCH_DEBUG:-}" ] && cat "$work/wrk.txt" >&2
  if grep -q "Non-2xx" "$work/wrk.txt"; then
    echo "wrk saw responses that are not 2xx: the comparison would be meaningless" >&2
    cat "$work/wrk.txt" >&2
    exit 1
  fi
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10; found=1} /Non-2xx/ {n += $NF} END {if (!found) print 0 + n}' "$work/wrk.txt")
  echo "${rps:-0} ${p50:-?} ${p99:-?} ${errors:-0}"
}

# oha latency for FILE (fixed request count, one connection per worker); prints "p50 p99" in ms.
oha_once() {
  local file=$1 id
  id=$(head -n1 "$work/ids")
  taskset -c "$LOAD_CORE" oha --no-tui --output-format json -z "$DURATION" -c "$CONNECTIONS" -H "Range: bytes=0-" \
    "http://$ADDR/$id/$file" >"$work/oha.json" 2>/dev/null
  python3 - "$work/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
print(f'{p["p50"] * 1000:.2f}ms {p["p99"] * 1000:.2f}ms')
PY
}

# Median line of RUNS runs of a command (ranked by the first number).
median_of_runs() {
  local lines=()
  for _ in $(seq "$RUNS"); do lines+=("$("$@")"); done
  printf '%s\n' "${lines[@]}" | sort -g -k1,1 | sed -n "$(((RUNS + 1) / 2))p"
}

cpu_seconds() { # utime+stime of PID in seconds
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# ---- cases ----------------------------------------------------------------------------------

bench_accounting() {
  mint_ids
  echo "### Cost of acknowledged-byte accounting (roam, wrk, $CONNECTIONS connections, $DURATION, median of $RUNS)"
  echo
  echo "| file | accounting | req/s | p50 | p99 |"
  echo "|---|---|---|---|---|"
  declare -A rps
  for file in f1k f100k; do
    for mode in written acknowledged; do
      start_roam --accounting "$mode"
      read -r r p50 p99 _ < <(median_of_runs wrk_once "$file")
      stop_server
      rps[$file-$mode]=$r
      echo "| $file | $mode | $r | $p50 | $p99 |"
    done
  done
  echo
  for file in f1k f100k; do
    awk -v a="${rps[$file-acknowledged]}" -v w="${rps[$file-written]}" -v f="$file" \
      'BEGIN { printf "- %s: acknowledged/written = %.3f (cost %.1f%%)\n", f, a / w, (1 - a / w) * 100 }'
  done
  echo
}

bench_small() {
  mint_ids
  echo "### Small files through /{id}/{file} (wrk: $CONNECTIONS connections, $DURATION, median of $RUNS; oha for latency)"
  echo
  echo "| file | server | req/s | wrk p50 | wrk p99 | oha p50 | oha p99 | roam/nginx |"
  echo "|---|---|---|---|---|---|---|---|"
  for file in f1k f100k; do
    local nginx_rps=0
    for name in nginx lighttpd roam; do
      start_server "$name"
      read -r r p50 p99 _ < <(median_of_runs wrk_once "$file")
      local lat="n/a n/a"
      command -v oha >/dev/null && lat=$(oha_once "$file")
      stop_server
      [ "$name" = nginx ] && nginx_rps=$r
      local rel=""
      [ "$name" = roam ] && rel=$(ratio "$r" "$nginx_rps")
      read -r op50 op99 <<<"$lat"
      echo "| $file | $name | $r | $p50 | $p99 | $op50 | $op99 | $rel |"
    done
  done
  echo
}

bench_large() {
  mint_ids
  head -c $((256 << 20)) /dev/urandom >"$root/f256m"
  chmod 644 "$root/f256m"
  local id
  id=$(head -n1 "$work/ids")
  echo "### One 256 MiB download (curl to /dev/null on core $LOAD_CORE, median of $RUNS)"
  echo
  echo "| server | GB/s | server CPU s/GB | roam/nginx GB/s |"
  echo "|---|---|---|---|"
  local nginx_gbs=0
  for name in nginx lighttpd roam; do
    start_server "$name"
    one_large() {
      local before after secs
      before=$(cpu_seconds "$PID")
      secs=$(taskset -c "$LOAD_CORE" curl -s -o /dev/null -H "Range: bytes=0-" -w '%{time_total}' "http://$ADDR/$id/f256m")
      after=$(cpu_seconds "$PID")
      awk -v s="$secs" -v c="$(awk -v a="$after" -v b="$before" 'BEGIN{print a-b}')" \
        'BEGIN { gb = 268435456 / 1e9; printf "%.2f %.3f\n", gb / s, c / gb }'
    }
    read -r gbs cpu < <(median_of_runs one_large)
    stop_server
    [ "$name" = nginx ] && nginx_gbs=$gbs
    local rel=""
    [ "$name" = roam ] && rel=$(ratio "$gbs" "$nginx_gbs")
    echo "| $name | $gbs | $cpu | $rel |"
  done
  rm -f "$root/f256m"
  echo
}

bench_conns() {
  mint_ids
  local n=10000
  echo "### $n concurrent connections (wrk -c$n, 1 KiB file, $DURATION)"
  echo
  echo "| server | req/s | errors | RSS growth | RSS per connection |"
  echo "|---|---|---|---|---|"
  for name in nginx lighttpd roam; do
    start_server "$name"
    local base
    base=$(rss_kb "$PID")
    taskset -c "$LOAD_CORE" wrk -t1 -c"$n" -d"$DURATION" --timeout 10s \
      -s scripts/wrk-sessions.lua "http://$ADDR" -- f1k "$work/ids" >"$work/wrk.txt" 2>&1 &
    local wrk_pid=$! peak=0
    while kill -0 "$wrk_pid" 2>/dev/null; do
      local now
      now=$(rss_kb "$PID" 2>/dev/null || echo 0)
      [ "$now" -gt "$peak" ] && peak=$now
      sleep 0.5
    done
    wait "$wrk_pid" || true
    stop_server
    local rps errors
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10; found=1} END {if (!found) print 0}' "$work/wrk.txt")
    awk -v n="$n" -v b="$base" -v p="$peak" -v name="$name" -v r="$rps" -v e="$errors" \
      'BEGIN { printf "| %s | %s | %s | %.1f MB | %.2f KB |\n", name, r, e, (p - b) / 1024, (p - b) / n }'
  done
  echo
}

bench_answers() {
  mint_ids
  echo "### roam's cheap answers (wrk, $CONNECTIONS connections, $DURATION, median of $RUNS)"
  echo
  echo "| request | req/s | p50 | p99 |"
  echo "|---|---|---|---|"
  start_roam
  answers_once() { # path lua-args...
    taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$@" >"$work/wrk.txt" 2>&1 || true
    awk '/Requests\/sec/ {r=$2} $1 == "50%" {p=$2} $1 == "99%" {q=$2} END {print r, p, q}' "$work/wrk.txt"
  }
  read -r r p50 p99 < <(median_of_runs answers_once "http://$ADDR/")
  echo "| GET / (mint an ID) | $r | $p50 | $p99 |"
  # Complete every session once, then every request is a repeat for a finished file.
  taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNECTIONS" -d2s -s scripts/wrk-sessions.lua "http://$ADDR" -- f1k "$work/ids" norange >/dev/null 2>&1 || true
  read -r r p50 p99 < <(median_of_runs answers_once -s scripts/wrk-sessions.lua "http://$ADDR" -- f1k "$work/ids" norange)
  echo "| GET /{id}/f1k, finished (416) | $r | $p50 | $p99 |"
  stop_server
  echo
}

bench_runtime() {
  mint_ids
  echo "### roam runtime shape on one core (wrk, $CONNECTIONS connections, median of $RUNS)"
  echo
  echo "| file | runtime | req/s | p50 | p99 |"
  echo "|---|---|---|---|---|"
  for file in f1k f100k; do
    for mode in multi-thread per-core; do
      start_roam --runtime "$mode"
      read -r r p50 p99 _ < <(median_of_runs wrk_once "$file")
      stop_server
      echo "| $file | $mode | $r | $p50 | $p99 |"
    done
  done
  echo
}

echo "<!-- $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), roam $(git rev-parse --short HEAD 2>/dev/null || echo '?') -->"
case "${1:-all}" in
  accounting) bench_accounting ;;
  small) bench_small ;;
  large) bench_large ;;
  conns) bench_conns ;;
  runtime) bench_runtime ;;
  answers) bench_answers ;;
  all) bench_small; bench_large; bench_conns; bench_accounting; bench_runtime; bench_answers ;;
  *) echo "usage: $0 accounting|small|large|conns|runtime|answers|all" >&2; exit 2 ;;
esac
